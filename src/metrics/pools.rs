//! The deployment-level series: what each pool's `status` query says, and what the host
//! registry says, as metric families. Pure: the snapshot refresher calls these with what it
//! read, and keeps the families they return.

use std::collections::BTreeMap;

use murmur_workflows::hosts::HostView;
use murmur_workflows::model::VmState;
use murmur_workflows::status::{PoolStatus, WorkspaceStatus};
use prometheus::proto::MetricFamily;
use prometheus::{CounterVec, GaugeVec, Opts, Registry};

/// One family being filled: a gauge or a counter with its label names.
enum Family {
    Gauge(GaugeVec),
    Counter(CounterVec),
}

/// Collects families into a registry of their own (one per refresh), so a pool that is gone
/// is gone from the next snapshot instead of lingering as a stale series.
struct Builder {
    registry: Registry,
}

impl Builder {
    fn family(
        &self,
        name: &str,
        kind: Kind,
        help: &str,
        labels: &[&str],
        rows: Rows,
    ) -> Result<(), prometheus::Error> {
        let opts = Opts::new(name, help);
        let family = match kind {
            Kind::Gauge => Family::Gauge(GaugeVec::new(opts, labels)?),
            Kind::Counter => Family::Counter(CounterVec::new(opts, labels)?),
        };
        for (values, value) in rows {
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            match &family {
                Family::Gauge(g) => g.get_metric_with_label_values(&values)?.set(value),
                Family::Counter(c) => c.get_metric_with_label_values(&values)?.inc_by(value),
            }
        }
        match family {
            Family::Gauge(g) => self.registry.register(Box::new(g)),
            Family::Counter(c) => self.registry.register(Box::new(c)),
        }
    }
}

/// A family's samples: label values, then the value.
type Rows = Vec<(Vec<String>, f64)>;

#[derive(Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

/// The pool-level families for `pools`: each tenant with its status, or `None` when its
/// pool did not answer (it still gets `murmur_pool_up 0`, so a wedged pool is visible, not
/// missing).
pub fn pool_families(
    pools: &[(String, Option<PoolStatus>)],
) -> Result<Vec<MetricFamily>, prometheus::Error> {
    let b = Builder {
        registry: Registry::new(),
    };
    b.family(
        "murmur_pool_up",
        Kind::Gauge,
        "1 when the tenant's pool answered its status query, 0 when it did not (wedged, or no worker runs it).",
        &["tenant"],
        pools
            .iter()
            .map(|(t, st)| (vec![t.clone()], f64::from(u8::from(st.is_some()))))
            .collect(),
    )?;
    let answered: Vec<&PoolStatus> = pools.iter().filter_map(|(_, st)| st.as_ref()).collect();
    status_families(&b, &answered)?;
    Ok(b.registry.gather())
}

/// `murmur_hosts{state}`: the deployment's hosts by `live`, `draining` and `lost`, as the
/// registry says (exported by one worker of the deployment, like a pool).
pub fn host_families(view: &HostView) -> Result<Vec<MetricFamily>, prometheus::Error> {
    let b = Builder {
        registry: Registry::new(),
    };
    let mut by_state: BTreeMap<&str, f64> = ["live", "draining", "lost"]
        .into_iter()
        .map(|s| (s, 0.0))
        .collect();
    for h in view.hosts.values() {
        *by_state.entry(h.state_label()).or_default() += 1.0;
    }
    b.family(
        "murmur_hosts",
        Kind::Gauge,
        "The deployment's VM hosts by state, as the host registry says (lost: its lease ran out).",
        &["state"],
        by_state
            .into_iter()
            .map(|(s, n)| (vec![s.to_string()], n))
            .collect(),
    )?;
    Ok(b.registry.gather())
}

/// Every family read from the pools that answered.
fn status_families(b: &Builder, pools: &[&PoolStatus]) -> Result<(), prometheus::Error> {
    b.family(
        "murmur_vms",
        Kind::Gauge,
        "VMs by tenant, workspace, image, whether of the pool's current generation (older ones are never handed out), and state.",
        &["tenant", "workspace", "image", "current_generation", "state"],
        vm_rows(pools),
    )?;
    let per_pool = |f: &dyn Fn(&PoolStatus) -> f64| -> Rows {
        pools
            .iter()
            .map(|p| (vec![p.tenant.clone()], f(p)))
            .collect()
    };
    let tenant = &["tenant"];
    let gauges: [(&str, &str, Rows); 13] = [
        (
            "murmur_vms_in_use",
            "VMs counting against max_vms (booting + warm + assigned + deleting).",
            per_pool(&|p| f64::from(p.in_use)),
        ),
        (
            "murmur_max_vms",
            "The pool-config max_vms in force.",
            per_pool(&|p| f64::from(p.config.max_vms)),
        ),
        (
            "murmur_creates_in_flight",
            "VM creates asked for and not finished (booting VMs).",
            per_pool(&|p| {
                p.workspaces
                    .iter()
                    .flat_map(|w| &w.groups)
                    .map(|g| f64::from(g.booting))
                    .sum()
            }),
        ),
        (
            "murmur_vms_stuck_deleting",
            "VMs whose delete keeps failing (they count against max_vms; retried on a back-off).",
            per_pool(&|p| f64::from(p.stuck_deleting_total)),
        ),
        (
            "murmur_pool_recovering",
            "1 while the pool rebuilds its state from the hosts and Temporal after a run that ended.",
            per_pool(&|p| f64::from(u8::from(p.recovery.is_some()))),
        ),
        (
            "murmur_agents",
            "Agents holding or waiting for a VM.",
            per_pool(&|p| f64::from(p.claims_total)),
        ),
        (
            "murmur_claims_waiting",
            "Agents waiting for room under max_vms.",
            per_pool(&|p| f64::from(p.claims_waiting)),
        ),
        (
            "murmur_last_flush_seconds",
            "How long the last flush took, from the request to its VMs being gone.",
            per_pool(&|p| p.last_flush_ms.unwrap_or(0) as f64 / 1000.0),
        ),
        (
            "murmur_last_nuke_seconds",
            "How long the last nuke took, from its pause to its reset.",
            per_pool(&|p| p.last_nuke_ms.unwrap_or(0) as f64 / 1000.0),
        ),
        (
            "murmur_denials_recent",
            "Refused requests kept in the pool's status (at most 20).",
            per_pool(&|p| p.denials.len() as f64),
        ),
        (
            "murmur_pool_paused",
            "1 while a nuke holds the pool.",
            per_pool(&|p| f64::from(u8::from(p.nuke_in_progress))),
        ),
        (
            "murmur_pool_generation",
            "The pool's generation (each flush starts a new one).",
            per_pool(&|p| p.generation as f64),
        ),
        (
            "murmur_pool_hosts",
            "Hosts the pool has VMs on.",
            per_pool(&|p| p.hosts.len() as f64),
        ),
    ];
    for (name, help, rows) in gauges {
        b.family(name, Kind::Gauge, help, tenant, rows)?;
    }
    let counters: [(&str, &str, Rows); 7] = [
        (
            "murmur_boots_total",
            "VM boots asked for.",
            per_pool(&|p| p.counters.boots as f64),
        ),
        (
            "murmur_boot_failures_total",
            "VM boots that failed (all images).",
            per_pool(&|p| p.counters.boot_failures as f64),
        ),
        (
            "murmur_vms_deleted_total",
            "VMs confirmed deleted.",
            per_pool(&|p| p.counters.deleted as f64),
        ),
        (
            "murmur_flushes_total",
            "Flushes performed.",
            per_pool(&|p| p.counters.flushes as f64),
        ),
        (
            "murmur_flushed_vms_total",
            "Warm VMs destroyed by flushes.",
            per_pool(&|p| p.counters.flushed_vms as f64),
        ),
        (
            "murmur_nukes_total",
            "Nukes completed.",
            per_pool(&|p| p.nukes as f64),
        ),
        (
            "murmur_rejected_messages_total",
            "Malformed signals rejected since the pool's run started (resets when a run continues as new).",
            per_pool(&|p| p.rejected_messages as f64),
        ),
    ];
    for (name, help, rows) in counters {
        b.family(name, Kind::Counter, help, tenant, rows)?;
    }
    let per_workspace = |f: &dyn Fn(&WorkspaceStatus) -> u32| {
        pools
            .iter()
            .flat_map(|p| {
                p.workspaces
                    .iter()
                    .map(move |w| (vec![p.tenant.clone(), w.name.clone()], f64::from(f(w))))
            })
            .collect::<Vec<_>>()
    };
    b.family(
        "murmur_warm_ready",
        Kind::Gauge,
        "Warm VMs that can be handed out now (current image and generation), by workspace.",
        &["tenant", "workspace"],
        per_workspace(&|w| w.ready),
    )?;
    b.family(
        "murmur_min_idle",
        Kind::Gauge,
        "Warm VMs wanted, by workspace.",
        &["tenant", "workspace"],
        per_workspace(&|w| w.min_idle),
    )?;
    b.family(
        "murmur_image_consecutive_boot_failures",
        Kind::Gauge,
        "Boot failures of an image since its last success (backfill holds back at 3).",
        &["tenant", "image"],
        pools
            .iter()
            .flat_map(|p| {
                p.failing_images.iter().map(move |(image, h)| {
                    (
                        vec![p.tenant.clone(), image.clone()],
                        f64::from(h.consecutive_failures),
                    )
                })
            })
            .collect(),
    )?;
    Ok(())
}

/// `murmur_vms` rows, keyed by whether the VMs are of the pool's current generation, not by
/// the generation itself: a label value per flush would start new series at every flush.
fn vm_rows(pools: &[&PoolStatus]) -> Rows {
    let states = [
        VmState::Booting,
        VmState::Warm,
        VmState::Assigned,
        VmState::Deleting,
    ];
    let mut rows: BTreeMap<Vec<String>, f64> = BTreeMap::new();
    for p in pools {
        for ws in &p.workspaces {
            for g in &ws.groups {
                for state in states {
                    let n = match state {
                        VmState::Booting => g.booting,
                        VmState::Warm => g.warm,
                        VmState::Assigned => g.assigned,
                        VmState::Deleting => g.deleting,
                    };
                    let labels = vec![
                        p.tenant.clone(),
                        ws.name.clone(),
                        g.image.clone(),
                        (g.generation == p.generation).to_string(),
                        state_name(state).to_string(),
                    ];
                    *rows.entry(labels).or_default() += f64::from(n);
                }
            }
        }
    }
    rows.into_iter().collect()
}

fn state_name(state: VmState) -> &'static str {
    match state {
        VmState::Booting => "booting",
        VmState::Warm => "warm",
        VmState::Assigned => "assigned",
        VmState::Deleting => "deleting",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(families: &[MetricFamily], name: &str, tenant: &str) -> Option<f64> {
        let family = families.iter().find(|f| f.name() == name)?;
        family
            .get_metric()
            .iter()
            .find(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "tenant" && l.value() == tenant)
            })
            .map(|m| m.get_gauge().get_value())
    }

    #[test]
    fn a_pool_that_does_not_answer_is_reported_down_not_dropped() {
        let up = PoolStatus {
            tenant: "a".into(),
            ..PoolStatus::default()
        };
        let families = pool_families(&[("a".into(), Some(up)), ("b".into(), None)]).unwrap();
        assert_eq!(value(&families, "murmur_pool_up", "a"), Some(1.0));
        assert_eq!(value(&families, "murmur_pool_up", "b"), Some(0.0));
        // The pool that did not answer has no other series: nothing is made up for it.
        assert_eq!(value(&families, "murmur_vms_in_use", "b"), None);
        assert_eq!(value(&families, "murmur_vms_in_use", "a"), Some(0.0));
    }

    #[test]
    fn every_family_follows_the_naming_conventions() {
        let families = pool_families(&[("a".into(), Some(PoolStatus::default()))]).unwrap();
        for f in &families {
            let counter = f.get_field_type() == prometheus::proto::MetricType::COUNTER;
            assert_eq!(
                counter,
                f.name().ends_with("_total"),
                "{}: counters and only counters end in _total",
                f.name()
            );
            assert!(f.name().starts_with("murmur_"), "{}", f.name());
            assert!(!f.help().is_empty(), "{}", f.name());
        }
    }
}
