//! VM hosts: the workers that own VMs, the registry that knows which of them live, and the
//! view a pool places its VMs by.
//!
//! Every `murmur-worker` is a host. It polls its own task queue (`murmur-host-<id>`) for the
//! activities that must run where a VM lives, and registers with the registry workflow
//! (`murmur-hosts`). Both names derive from the deployment's shared task queue (`murmur`), so
//! deployments sharing a namespace (the tests' workers, say) never see each other's hosts. Liveness is Temporal's own: the registry keeps one long *lease* activity
//! running on each live host's queue, with a heartbeat timeout. When the host dies, the lease
//! fails on that timeout (or on its schedule-to-start timeout, when no worker polls the queue)
//! and the host is marked lost. Nothing here compares clocks; every decision is an event.
//!
//! [`Registry`] is the pure part: registrations, lease outcomes and drains in, intents out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::model::{Millis, is_dns_label};

/// How long a host may go without a lease heartbeat before it is lost, unless its worker
/// says otherwise (`--host-lease-timeout`).
pub const DEFAULT_LEASE_TIMEOUT_MS: u64 = 15_000;

/// Workflow id of the host registry of the deployment whose shared task queue is
/// `shared_queue`: `murmur-hosts` for the default queue `murmur`.
pub fn registry_workflow_id(shared_queue: &str) -> String {
    format!("{shared_queue}-hosts")
}

/// The task queue of `host`'s activities in the deployment whose shared task queue is
/// `shared_queue`: `murmur-host-<host>` for the default queue `murmur`.
pub fn host_task_queue(shared_queue: &str, host: &str) -> String {
    format!("{shared_queue}-host-{host}")
}

/// Checks a host id (`[a-z][a-z0-9-]{0,62}`, so it is a task queue name and a DNS label).
pub fn validate_host_id(host: &str) -> Result<(), ApiError> {
    if is_dns_label(host) {
        Ok(())
    } else {
        Err(ApiError::invalid_argument(format!(
            "invalid host id {host:?}: must match [a-z][a-z0-9-]{{0,62}}"
        )))
    }
}

/// What a worker tells the registry when it starts (the `register` signal).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HostRegistration {
    /// The host id.
    pub host: String,
    /// Unique per worker process: a new one means the worker restarted.
    pub instance: String,
    /// Most VMs the host runs at once.
    pub max_vms: u32,
    /// Memory the host gives its VMs, in MiB (0: not limited).
    pub memory_mb: u64,
    /// `process` or `qemu`.
    pub substrate: String,
    /// How long the host may go without a lease heartbeat before it is lost, in ms (0: the
    /// default, [`DEFAULT_LEASE_TIMEOUT_MS`]).
    pub lease_timeout_ms: u64,
    /// Where the host's gateway answers (`http://10.0.0.7:7450`, `https://...`): what
    /// `murmur logs`, `exec` and `shell` connect to. Empty: the host serves none.
    pub gateway: String,
}

/// Longest gateway address a host may register.
const MAX_GATEWAY_ADDRESS: usize = 255;

impl HostRegistration {
    /// Checks the fields a worker sends.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_host_id(&self.host)?;
        if self.instance.is_empty() {
            return Err(ApiError::invalid_argument(
                "a registration needs an instance",
            ));
        }
        if self.max_vms == 0 {
            return Err(ApiError::invalid_argument("max_vms must be positive"));
        }
        if !self.gateway.is_empty()
            && (self.gateway.len() > MAX_GATEWAY_ADDRESS
                || !(self.gateway.starts_with("http://") || self.gateway.starts_with("https://"))
                || self
                    .gateway
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(ApiError::invalid_argument(format!(
                "gateway must be an http:// or https:// address of at most \
                 {MAX_GATEWAY_ADDRESS} bytes"
            )));
        }
        if self.lease_timeout_ms != 0 && !(1_000..=3_600_000).contains(&self.lease_timeout_ms) {
            return Err(ApiError::invalid_argument(
                "lease_timeout_ms must be between 1000 and 3600000",
            ));
        }
        Ok(())
    }
}

/// What a worker tells the registry when it stops (the `leave` signal): the host is lost at
/// once, whether or not a lease of it runs at that moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HostLeave {
    /// The host id.
    pub host: String,
    /// The instance that registered (a newer instance of the host is not affected).
    pub instance: String,
    /// Why, as the host says it (`host h3 is shutting down`).
    pub reason: String,
}

/// Longest reason a `leave` may give.
const MAX_LEAVE_REASON: usize = 200;

impl HostLeave {
    /// Checks the fields a worker sends.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_host_id(&self.host)?;
        if self.instance.is_empty() {
            return Err(ApiError::invalid_argument("a leave needs an instance"));
        }
        if self.reason.is_empty() || self.reason.len() > MAX_LEAVE_REASON {
            return Err(ApiError::invalid_argument(format!(
                "a leave needs a reason of at most {MAX_LEAVE_REASON} bytes"
            )));
        }
        Ok(())
    }
}

/// Whether a host can be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Its lease runs: the host polls its queue and heartbeats.
    #[default]
    Live,
    /// Its lease failed: the host is gone until it registers again.
    Lost,
}

impl HostState {
    /// Lower-case name for output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Lost => "lost",
        }
    }
}

/// One host as the registry knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HostInfo {
    /// The host id.
    pub host: String,
    /// Most VMs it runs at once.
    pub max_vms: u32,
    /// Memory for VMs, in MiB (0: not limited).
    pub memory_mb: u64,
    /// Its substrate.
    pub substrate: String,
    /// Live or lost.
    pub state: HostState,
    /// Set by `murmur host drain`: nothing new is placed here, warm VMs go.
    pub draining: bool,
    /// The worker process behind the current lease.
    pub instance: String,
    /// Which lease is current (an outcome of an older one changes nothing).
    pub lease: u64,
    /// When it last registered.
    pub registered_at: Millis,
    /// When it was last marked lost.
    pub lost_at: Option<Millis>,
    /// Times it was lost.
    pub losses: u64,
    /// Why it was last lost (the lease's failure: a heartbeat timeout, a shutdown, ...).
    pub last_loss: Option<String>,
    /// How long it may go without a lease heartbeat before it is lost, in ms (0: default).
    pub lease_timeout_ms: u64,
    /// Where its gateway answers (empty: none); see [`HostRegistration::gateway`].
    pub gateway: String,
}

impl HostInfo {
    /// How long this host may go without a lease heartbeat before it is lost.
    pub fn lease_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(if self.lease_timeout_ms == 0 {
            DEFAULT_LEASE_TIMEOUT_MS
        } else {
            self.lease_timeout_ms
        })
    }

    /// True when new VMs may be placed here.
    pub fn placeable(&self) -> bool {
        self.state == HostState::Live && !self.draining
    }

    /// `live`, `draining` or `lost`, as `murmur host ls` shows it.
    pub fn state_label(&self) -> &'static str {
        match (self.state, self.draining) {
            (HostState::Lost, _) => "lost",
            (HostState::Live, true) => "draining",
            (HostState::Live, false) => "live",
        }
    }
}

/// The hosts as the registry last said, versioned so a pool keeps the newest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HostView {
    /// Goes up with every change (it starts at the registry's start time, so a registry
    /// created again still counts up).
    pub version: u64,
    /// Hosts by id.
    pub hosts: BTreeMap<String, HostInfo>,
}

impl HostView {
    /// True when `host` is known and lost.
    pub fn is_lost(&self, host: &str) -> bool {
        self.hosts
            .get(host)
            .is_some_and(|h| h.state == HostState::Lost)
    }

    /// True when `host` is known, live and draining.
    pub fn is_draining(&self, host: &str) -> bool {
        self.hosts
            .get(host)
            .is_some_and(|h| h.state == HostState::Live && h.draining)
    }

    /// Ids of the live hosts.
    pub fn live(&self) -> Vec<String> {
        self.hosts
            .values()
            .filter(|h| h.state == HostState::Live)
            .map(|h| h.host.clone())
            .collect()
    }
}

/// Something the registry workflow must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryIntent {
    /// Run lease `seq` of `host` on the host's queue.
    StartLease {
        /// The host.
        host: String,
        /// The lease.
        seq: u64,
    },
    /// Tell every pool the new view.
    Announce,
}

/// How a lease activity ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseEnd {
    /// It ran its term: start the next one.
    Renew,
    /// It failed (heartbeat or schedule-to-start timeout, the worker stopped): the host is
    /// gone. Carries why.
    Failed(String),
}

/// The pure host registry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Registry {
    /// The current view.
    pub view: HostView,
}

impl Registry {
    /// A new registry; versions start at `now` so they keep rising across registries.
    pub fn new(now: Millis) -> Self {
        Self {
            view: HostView {
                version: now,
                hosts: BTreeMap::new(),
            },
        }
    }

    /// Leases to start in a new run (continue-as-new): one per live host.
    pub fn resume(&self) -> Vec<RegistryIntent> {
        self.view
            .hosts
            .values()
            .filter(|h| h.state == HostState::Live)
            .map(|h| RegistryIntent::StartLease {
                host: h.host.clone(),
                seq: h.lease,
            })
            .collect()
    }

    /// A worker (re)registered. A new host, a lost one coming back, or a restarted worker (new
    /// instance) gets a new lease; a repeated registration of a live worker changes nothing
    /// but its capacity.
    pub fn register(&mut self, reg: &HostRegistration, now: Millis) -> Vec<RegistryIntent> {
        let entry = self
            .view
            .hosts
            .entry(reg.host.clone())
            .or_insert_with(|| HostInfo {
                host: reg.host.clone(),
                state: HostState::Lost,
                ..Default::default()
            });
        let capacity_changed = entry.max_vms != reg.max_vms
            || entry.memory_mb != reg.memory_mb
            || entry.substrate != reg.substrate
            || entry.lease_timeout_ms != reg.lease_timeout_ms
            || entry.gateway != reg.gateway;
        entry.max_vms = reg.max_vms;
        entry.memory_mb = reg.memory_mb;
        entry.substrate = reg.substrate.clone();
        entry.lease_timeout_ms = reg.lease_timeout_ms;
        entry.gateway = reg.gateway.clone();
        let mut out = Vec::new();
        if entry.state == HostState::Lost || entry.instance != reg.instance {
            entry.state = HostState::Live;
            entry.instance = reg.instance.clone();
            entry.lease += 1;
            entry.registered_at = now;
            out.push(RegistryIntent::StartLease {
                host: reg.host.clone(),
                seq: entry.lease,
            });
        }
        if !out.is_empty() || capacity_changed {
            self.view.version += 1;
            out.push(RegistryIntent::Announce);
        }
        out
    }

    /// Lease `seq` of `host` ended. Only the current lease of a live host counts.
    pub fn lease_ended(
        &mut self,
        host: &str,
        seq: u64,
        end: LeaseEnd,
        now: Millis,
    ) -> Vec<RegistryIntent> {
        let Some(info) = self.view.hosts.get_mut(host) else {
            return Vec::new();
        };
        if info.lease != seq || info.state != HostState::Live {
            return Vec::new();
        }
        match end {
            LeaseEnd::Renew => vec![RegistryIntent::StartLease {
                host: host.to_string(),
                seq,
            }],
            LeaseEnd::Failed(why) => self.lose(host, why, now),
        }
    }

    /// The live instance `leave.instance` of a host stops: the host is lost now (its lease,
    /// if one runs, ends later and changes nothing). A leave of an earlier instance, or of a
    /// host that is not live, changes nothing.
    pub fn leave(&mut self, leave: &HostLeave, now: Millis) -> Vec<RegistryIntent> {
        match self.view.hosts.get(&leave.host) {
            Some(info) if info.state == HostState::Live && info.instance == leave.instance => {
                self.lose(&leave.host, leave.reason.clone(), now)
            }
            _ => Vec::new(),
        }
    }

    /// Marks `host` lost for `why` and announces the view.
    fn lose(&mut self, host: &str, why: String, now: Millis) -> Vec<RegistryIntent> {
        let Some(info) = self.view.hosts.get_mut(host) else {
            return Vec::new();
        };
        info.state = HostState::Lost;
        info.lost_at = Some(now);
        info.losses += 1;
        info.last_loss = Some(why);
        self.view.version += 1;
        vec![RegistryIntent::Announce]
    }

    /// The host `host`, or `NOT_FOUND` naming the command that lists hosts.
    pub fn host(&self, host: &str) -> Result<&HostInfo, ApiError> {
        self.view.hosts.get(host).ok_or_else(|| {
            ApiError::not_found(format!(
                "no host {host}; murmur host ls lists the registered hosts"
            ))
        })
    }

    /// Starts (`draining`) or ends a drain of `host`.
    pub fn set_draining(
        &mut self,
        host: &str,
        draining: bool,
    ) -> Result<(HostInfo, Vec<RegistryIntent>), ApiError> {
        let mut info = self.host(host)?.clone();
        if info.draining == draining {
            return Ok((info, Vec::new()));
        }
        info.draining = draining;
        self.view.hosts.insert(host.to_string(), info.clone());
        self.view.version += 1;
        Ok((info, vec![RegistryIntent::Announce]))
    }

    /// Checks that `host` may be forgotten: known, and lost. A live host cannot be forgotten:
    /// drain it and stop its worker first.
    pub fn check_forget(&self, host: &str) -> Result<&HostInfo, ApiError> {
        let info = self.host(host)?;
        if info.state != HostState::Lost {
            return Err(ApiError::failed_precondition(format!(
                "host {host} is live; drain it, stop its worker, and forget it once it is lost"
            )));
        }
        Ok(info)
    }

    /// Forgets a lost host (a machine that will not come back), so views stop carrying it.
    pub fn forget(&mut self, host: &str) -> Result<(HostInfo, Vec<RegistryIntent>), ApiError> {
        self.check_forget(host)?;
        let info = self.view.hosts.remove(host).unwrap_or_default();
        self.view.version += 1;
        Ok((info, vec![RegistryIntent::Announce]))
    }
}

/// Input of the `drain` and `forget` updates of the registry (`undo` only means something to
/// `drain`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DrainRequest {
    /// The host.
    pub host: String,
    /// End the drain instead of starting it.
    pub undo: bool,
    /// Who asks, for the log.
    pub actor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(host: &str, instance: &str) -> HostRegistration {
        HostRegistration {
            host: host.into(),
            instance: instance.into(),
            max_vms: 4,
            memory_mb: 0,
            substrate: "process".into(),
            lease_timeout_ms: 0,
            gateway: String::new(),
        }
    }

    #[test]
    fn a_gateway_address_is_kept_and_checked() {
        let mut r = Registry::new(0);
        let mut with_gateway = reg("h1", "i1");
        with_gateway.gateway = "http://127.0.0.1:7450".into();
        assert!(with_gateway.validate().is_ok());
        r.register(&with_gateway, 1);
        assert_eq!(r.host("h1").unwrap().gateway, "http://127.0.0.1:7450");
        // A new address is announced like a change of capacity.
        with_gateway.gateway = "http://127.0.0.1:7451".into();
        assert_eq!(r.register(&with_gateway, 2), vec![RegistryIntent::Announce]);
        for bad in ["127.0.0.1:7450", "http://a b", "ftp://x"] {
            with_gateway.gateway = bad.into();
            assert!(with_gateway.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_new_host_gets_a_lease_and_is_announced() {
        let mut r = Registry::new(1000);
        let intents = r.register(&reg("h1", "a"), 5);
        assert_eq!(
            intents,
            vec![
                RegistryIntent::StartLease {
                    host: "h1".into(),
                    seq: 1
                },
                RegistryIntent::Announce
            ]
        );
        assert_eq!(r.view.version, 1001);
        assert!(r.view.hosts["h1"].placeable());
        // The same worker registering again changes nothing.
        assert!(r.register(&reg("h1", "a"), 6).is_empty());
    }

    #[test]
    fn a_host_that_leaves_is_lost_at_once_but_not_its_next_instance() {
        let leave = |instance: &str| HostLeave {
            host: "h1".into(),
            instance: instance.into(),
            reason: "host h1 is shutting down".into(),
        };
        let mut r = Registry::new(0);
        r.register(&reg("h1", "a"), 0);
        // An earlier instance's leave, arriving late after a restart, changes nothing.
        r.register(&reg("h1", "b"), 1);
        assert!(r.leave(&leave("a"), 2).is_empty());
        assert_eq!(r.view.hosts["h1"].state, HostState::Live);
        assert_eq!(r.leave(&leave("b"), 3), vec![RegistryIntent::Announce]);
        assert!(r.view.is_lost("h1"));
        assert_eq!(
            r.view.hosts["h1"].last_loss.as_deref(),
            Some("host h1 is shutting down")
        );
        // The lease that still ran ends later: no second loss.
        assert!(
            r.lease_ended("h1", 2, LeaseEnd::Failed("heartbeat timeout".into()), 4)
                .is_empty()
        );
        assert_eq!(r.view.hosts["h1"].losses, 1);
        assert!(leave("").validate().is_err());
    }

    #[test]
    fn a_failed_lease_loses_the_host_and_a_stale_one_does_not() {
        let mut r = Registry::new(0);
        r.register(&reg("h1", "a"), 0);
        // The worker restarted before its lease timed out: new lease, same host.
        let intents = r.register(&reg("h1", "b"), 1);
        assert!(intents.contains(&RegistryIntent::StartLease {
            host: "h1".into(),
            seq: 2
        }));
        // The old lease's timeout arrives late: ignored.
        assert!(
            r.lease_ended("h1", 1, LeaseEnd::Failed("heartbeat".into()), 2)
                .is_empty()
        );
        assert_eq!(r.view.hosts["h1"].state, HostState::Live);
        assert_eq!(
            r.lease_ended("h1", 2, LeaseEnd::Renew, 3),
            vec![RegistryIntent::StartLease {
                host: "h1".into(),
                seq: 2
            }]
        );
        let intents = r.lease_ended("h1", 2, LeaseEnd::Failed("heartbeat timeout".into()), 4);
        assert_eq!(intents, vec![RegistryIntent::Announce]);
        assert!(r.view.is_lost("h1"));
        assert_eq!(r.view.hosts["h1"].losses, 1);
        // It comes back (same instance even): a new lease.
        let intents = r.register(&reg("h1", "b"), 5);
        assert!(intents.contains(&RegistryIntent::StartLease {
            host: "h1".into(),
            seq: 3
        }));
        assert!(!r.view.is_lost("h1"));
    }

    #[test]
    fn drain_is_announced_once_and_unknown_hosts_are_not_found() {
        let mut r = Registry::new(0);
        r.register(&reg("h1", "a"), 0);
        let (info, intents) = r.set_draining("h1", true).unwrap();
        assert_eq!(info.state_label(), "draining");
        assert_eq!(intents, vec![RegistryIntent::Announce]);
        assert!(r.set_draining("h1", true).unwrap().1.is_empty());
        assert!(!r.view.hosts["h1"].placeable());
        let e = r.set_draining("nope", true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "NOT_FOUND: no host nope; murmur host ls lists the registered hosts"
        );
    }

    #[test]
    fn only_lost_hosts_are_forgotten() {
        let mut r = Registry::new(0);
        r.register(&reg("h1", "a"), 0);
        assert_eq!(
            r.forget("h1").unwrap_err().code,
            crate::error::Code::FailedPrecondition
        );
        r.lease_ended("h1", 1, LeaseEnd::Failed("gone".into()), 1);
        let (info, intents) = r.forget("h1").unwrap();
        assert_eq!(info.host, "h1");
        assert_eq!(intents, vec![RegistryIntent::Announce]);
        assert!(r.view.hosts.is_empty());
        assert_eq!(
            r.forget("h1").unwrap_err().code,
            crate::error::Code::NotFound
        );
        // It may register again later, as a new host.
        assert!(!r.register(&reg("h1", "b"), 2).is_empty());
    }

    #[test]
    fn resume_restarts_leases_of_live_hosts_only() {
        let mut r = Registry::new(0);
        r.register(&reg("h1", "a"), 0);
        r.register(&reg("h2", "a"), 0);
        r.lease_ended("h2", 1, LeaseEnd::Failed("gone".into()), 1);
        assert_eq!(
            r.resume(),
            vec![RegistryIntent::StartLease {
                host: "h1".into(),
                seq: 1
            }]
        );
    }

    #[test]
    fn registrations_are_checked() {
        assert!(reg("h1", "a").validate().is_ok());
        assert!(reg("H1", "a").validate().is_err());
        assert!(reg("h1", "").validate().is_err());
        let mut r = reg("h1", "a");
        r.max_vms = 0;
        assert!(r.validate().is_err());
    }
}
