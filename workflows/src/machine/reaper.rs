//! The reaper: rounds that compare what the hosts and Temporal really hold with the
//! inventory, on a schedule, and turn the differences into the pool's ordinary intents.
//!
//! A round reads the host registry's view ([`Intent::ReadHosts`]), then lists every live
//! host ([`Intent::ListHost`], on the host's own queue) and asks Temporal about agents
//! ([`Intent::ListAgents`]). Each listing is compared through [digests](super::digest): the
//! pool sends per-bucket sums of the VM ids it places on the host (and of its claims' request
//! ids), the other side answers with the buckets that differ, so a round of a pool that
//! agrees with the world writes a few kilobytes to history whatever its size. Every listing
//! is applied as it arrives; [`Pool::reconcile`] then backfills, so what was reaped is
//! replaced by the one code path of the pool:
//!
//! - a VM a host holds and the pool does not know: if the substrate records a running
//!   agent as its owner, the VM is adopted as that agent's (a reaper never deletes a VM a
//!   running agent holds); otherwise it is a *suspect*, deleted only when consecutive rounds
//!   spanning the grace period all find it unknown (a listing races with boots and deletes
//!   the pool has in flight). A recovering pool adopts fresh warm VMs instead (see
//!   [`super::recovery`]);
//! - a warm VM that was warm before the round started but is missing or dead in its host's
//!   listing is deleted (backfill replaces it);
//! - a claim whose agent does not run, in consecutive rounds spanning the grace period
//!   (visibility lags), is released: its VM is deleted, or its place in the queue given up.
//!
//! While a nuke is under way a round also asks whether `nuke/<tenant>` still runs; after
//! rounds spanning the grace period find it gone, the pool stops waiting for it. While a nuke
//! holds the pool, rounds list nothing else.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::claims::{agent_developer_and_workspace, agent_of};
use super::digest::{Differences, Digests, bucket_of, buckets_for};
use super::{Claim, Intent, Pool};
use crate::hosts::HostView;
use crate::model::{DeleteReason, Millis, ReapPolicy, VmId, VmRecord, VmState};

/// How long an unknown VM must stay unknown before the reaper deletes it, when the worker
/// does not say otherwise.
pub const DEFAULT_REAP_GRACE_MS: Millis = 60_000;

/// Time between rounds when the worker does not say otherwise.
pub const DEFAULT_REAP_INTERVAL_MS: Millis = 30_000;

/// History length after which a pool continues as new, when the worker does not say
/// otherwise.
pub const DEFAULT_ROLL_OVER_EVENTS: u32 = 10_000;

/// Most VMs (or agents) one listing answers with; more differing buckets wait for the next
/// round.
pub const LISTING_CAP: usize = 800;

/// Rounds in a row that must list a running agent the pool holds no claim of before it is
/// told to claim again. Two: a claim on its way arrives within a round.
pub const UNCLAIMED_SIGHTINGS: u32 = 2;

/// Rounds between two reminders to an agent that stays unclaimed after it was told.
pub const UNCLAIMED_RETELL: u32 = 20;

/// The worker's reaper settings, as its listings report them (they reach the workflow as
/// activity results, so a replay sees the same).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScanSettings {
    /// Grace period for unknown VMs, in ms (0: the default).
    pub grace_ms: Millis,
    /// Time between rounds, in ms (0: the default).
    pub interval_ms: Millis,
    /// History length after which the pool continues as new (0: the default).
    pub roll_over_events: u32,
}

impl ScanSettings {
    /// Rounds in a row that must find something before it is acted on: enough to span the
    /// grace period at the round interval, and never fewer than two.
    pub fn sightings_needed(&self) -> u32 {
        let grace = if self.grace_ms == 0 {
            DEFAULT_REAP_GRACE_MS
        } else {
            self.grace_ms
        };
        u32::try_from(grace.div_ceil(self.interval()) + 1)
            .unwrap_or(u32::MAX)
            .max(2)
    }

    /// Time between rounds.
    pub fn interval(&self) -> Millis {
        if self.interval_ms == 0 {
            DEFAULT_REAP_INTERVAL_MS
        } else {
            self.interval_ms
        }
    }

    /// History length after which the pool continues as new.
    pub fn roll_over(&self) -> u32 {
        if self.roll_over_events == 0 {
            DEFAULT_ROLL_OVER_EVENTS
        } else {
            self.roll_over_events
        }
    }
}

/// What the substrate records about one VM (everything a recovering pool needs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VmLabels {
    /// Workspace it was booted for.
    pub workspace: String,
    /// Image it was booted from.
    pub image: String,
    /// Pool generation it was booted in.
    pub generation: u64,
    /// The claim request (`<agent workflow id>@<run id>`) of the agent that started on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// True when that agent's run is running (checked by the listing).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub owner_running: bool,
}

/// One VM as a host's listing found it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScannedVm {
    /// The VM.
    pub id: VmId,
    /// True when its process (or guest) is running.
    pub alive: bool,
    /// What the substrate records about it (`None`: nothing readable, an orphan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<VmLabels>,
}

/// What one host's listing answers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HostScan {
    /// The VMs of the buckets that differ from the pool's digests.
    pub diffs: Differences<ScannedVm>,
    /// The worker's settings.
    pub settings: ScanSettings,
}

/// What the pool asks Temporal in a round.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentScanRequest {
    /// Digests of the claims' request ids (empty buckets: do not compare claims).
    pub claims: Digests,
    /// What to do with stranded agent workflows.
    pub stranded: ReapPolicy,
    /// Continue the stranded check after this workflow id (a bounded number per round).
    pub stranded_after: Option<String>,
    /// Whether to ask if `nuke/<tenant>` runs.
    pub check_nuke: bool,
}

/// What Temporal answers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentScan {
    /// Running agent runs (`<workflow id>@<run id>`) of the buckets that differ from the
    /// claims' digests (`None`: claims were not compared).
    pub running: Option<Differences<String>>,
    /// Stranded agent workflows seen by this round's share of the check.
    pub stranded_found: u32,
    /// Of those, how many it terminated.
    pub stranded_terminated: u32,
    /// Where the next round's share of the stranded check starts (`None`: from the start).
    pub stranded_cursor: Option<String>,
    /// Whether `nuke/<tenant>` runs, when asked.
    pub nuke_running: Option<bool>,
    /// The worker's settings.
    pub settings: ScanSettings,
}

impl HostScan {
    /// The host's side of a listing: `vms` (every VM of the tenant the host holds) compared
    /// with the pool's `digests`. Dead VMs do not count in the host's sums, so they are
    /// always reported.
    pub fn answer(digests: &Digests, vms: Vec<ScannedVm>, settings: ScanSettings) -> Self {
        let items = vms.into_iter().map(|v| (v.id.0.clone(), v)).collect();
        Self {
            diffs: Differences::between_flagging(digests, items, LISTING_CAP, |v| !v.alive),
            settings,
        }
    }
}

/// Temporal's side of the claims comparison: the running agent runs (`<workflow id>@<run
/// id>`) compared with the pool's digests of its claims (`None` when the pool did not ask).
pub fn running_differences(
    claims: &Digests,
    running: impl IntoIterator<Item = String>,
) -> Option<Differences<String>> {
    (claims.buckets > 0).then(|| {
        Differences::between(
            claims,
            running.into_iter().map(|r| (r.clone(), r)).collect(),
            LISTING_CAP,
        )
    })
}

/// Where the reaper's current round is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Round {
    /// No round runs and none is scheduled (a run that has not started one yet).
    #[default]
    Idle,
    /// The timer before round `next` runs.
    Waiting {
        /// The round the timer starts.
        next: u64,
    },
    /// Reading the host view.
    ReadingHosts,
    /// Waiting for these hosts' listings and, when `agents`, for Temporal's answer.
    Listing {
        /// Hosts whose listing has not arrived.
        hosts: BTreeSet<String>,
        /// Temporal's answer has not arrived.
        agents: bool,
    },
}

/// An unknown VM waiting out its grace period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspect {
    /// The host it was found on.
    pub host: String,
    /// Rounds in a row that found it.
    pub seen: u32,
}

/// The reaper's memory and its totals, shown in `murmur pool status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReaperState {
    /// Rounds completed.
    pub scans: u64,
    /// Workflow time of the last round completed.
    pub last_scan_at: Option<Millis>,
    /// Unknown VMs deleted after their grace period.
    pub orphans_deleted: u64,
    /// Claims of agents that ended without releasing them, released.
    pub agent_claims_released: u64,
    /// Warm VMs found dead or missing in the substrate, deleted and replaced.
    pub dead_vms_replaced: u64,
    /// VMs found held by a running agent the pool did not know, adopted.
    pub adopted: u64,
    /// Stranded agent workflows seen by the last round.
    pub stranded_found: u32,
    /// Stranded agent workflows terminated, in total.
    pub stranded_terminated: u64,
    /// Nukes the pool stopped waiting for because they ended without resetting it.
    pub abandoned_nukes: u64,
    /// Unknown VMs waiting out their grace period.
    pub suspects: BTreeMap<VmId, Suspect>,
    /// Claims whose agent was not found running, with how many rounds in a row.
    pub claim_suspects: BTreeMap<String, u32>,
    /// Running agent runs (`<workflow id>@<run id>`) the pool holds no claim of, with how
    /// many rounds in a row found them so.
    pub unclaimed_agents: BTreeMap<String, u32>,
    /// Running agents the pool told to claim again because it held no claim of theirs (a
    /// waiting claim lost with a pool run that ended), in total.
    pub agents_told_to_claim: u64,
    /// Rounds in a row that found no nuke running while one was under way.
    pub nuke_missing: u32,
    /// The current round.
    pub round: Round,
    /// Rounds started (the current round's number).
    pub rounds: u64,
    /// The claim arrival counter when the current round started (later claims are not
    /// judged by it).
    pub claims_before_round: u64,
    /// Bucket counts of the current round, per host.
    pub host_buckets: BTreeMap<String, u32>,
    /// Bucket count of the current round's claim digests.
    pub claim_buckets: u32,
    /// VMs each host last said it holds (sizes the next round's buckets).
    pub host_totals: BTreeMap<String, u32>,
    /// Running agents Temporal last counted.
    pub agents_total: u32,
    /// Where the next round's share of the stranded check starts.
    pub stranded_cursor: Option<String>,
    /// A listing of the current round left differing buckets out, or failed.
    pub incomplete: bool,
    /// VMs the pool forgot (deleted, written off) since the current round started: its
    /// listings may still show them, and must not bring them back.
    pub forgotten: BTreeSet<VmId>,
    /// The worker's settings, from the latest listing.
    pub settings: ScanSettings,
}

impl ReaperState {
    /// The pool forgot `vm`: a listing of a round under way may still show it.
    pub(super) fn forgot(&mut self, vm: &VmId) {
        if matches!(self.round, Round::Listing { .. }) {
            self.forgotten.insert(vm.clone());
        }
    }
}

impl Pool {
    /// True when [`Self::request_scan`] would start a round now.
    pub fn scan_would_start(&self) -> bool {
        self.config_known() && matches!(self.reaper.round, Round::Idle | Round::Waiting { .. })
    }

    /// Asks for a round now (the host registry rang its doorbell, say). A round in flight
    /// absorbs it: whatever order a timer and a doorbell arrive in, the same rounds run.
    pub fn request_scan(&mut self) -> Vec<Intent> {
        if !self.config_known() {
            // A recovering pool lists its hosts only once its config is read back (the
            // listing is judged against it); reading the record starts the first round.
            return Vec::new();
        }
        match self.reaper.round {
            Round::Idle | Round::Waiting { .. } => self.start_round(),
            Round::ReadingHosts | Round::Listing { .. } => Vec::new(),
        }
    }

    /// The timer before round `next` fired.
    pub fn scan_due(&mut self, next: u64) -> Vec<Intent> {
        match self.reaper.round {
            Round::Waiting { next: n } if n == next && self.config_known() => self.start_round(),
            _ => Vec::new(),
        }
    }

    /// A new run: whatever round was in flight did not carry over; start one at once.
    pub(super) fn restart_rounds(&mut self) -> Vec<Intent> {
        self.reaper.round = Round::Idle;
        self.start_round()
    }

    fn start_round(&mut self) -> Vec<Intent> {
        self.reaper.round = Round::ReadingHosts;
        vec![Intent::ReadHosts]
    }

    /// The host view read at the start of a round (`None`: the registry could not be read;
    /// the view held is used). Starts the round's listings.
    pub fn hosts_read(&mut self, view: Option<HostView>, now: Millis) -> Vec<Intent> {
        if self.reaper.round != Round::ReadingHosts {
            return Vec::new();
        }
        let mut out = match view.filter(|v| v.version > 0) {
            Some(view) => self.hosts_changed(view, now),
            None => Vec::new(),
        };
        self.reaper.rounds += 1;
        self.reaper.incomplete = false;
        self.reaper.forgotten.clear();
        self.reaper.claims_before_round = self.claim_seq;
        let holds = self.nuke.holds_pool();
        let mut hosts = BTreeSet::new();
        self.reaper.host_buckets.clear();
        if !holds {
            for host in self.hosts.live() {
                let ids: Vec<&str> = self
                    .vms
                    .values()
                    .filter(|v| v.host.as_deref() == Some(host.as_str()))
                    .map(|v| v.id.0.as_str())
                    .collect();
                let known = self.reaper.host_totals.get(&host).copied().unwrap_or(0);
                let buckets = buckets_for(ids.len().max(known as usize));
                self.reaper.host_buckets.insert(host.clone(), buckets);
                out.push(Intent::ListHost {
                    round: self.reaper.rounds,
                    host: host.clone(),
                    digests: Digests::of(ids, buckets),
                });
                hosts.insert(host);
            }
        }
        let claims = if holds || self.recovery.is_some() {
            Digests::default()
        } else {
            let buckets = buckets_for(self.claims.len().max(self.reaper.agents_total as usize));
            self.reaper.claim_buckets = buckets;
            Digests::of(self.claims.keys().map(String::as_str), buckets)
        };
        out.push(Intent::ListAgents {
            round: self.reaper.rounds,
            request: AgentScanRequest {
                claims,
                stranded: if holds {
                    ReapPolicy::Disabled
                } else {
                    self.config.spec.reap_stranded_workflows
                },
                stranded_after: self.reaper.stranded_cursor.clone(),
                check_nuke: self.nuke.under_way(),
            },
        });
        self.reaper.round = Round::Listing {
            hosts,
            agents: true,
        };
        out
    }

    /// One host's listing of round `round` arrived (`Err`: it could not be taken; nothing on
    /// that host is judged this round). A listing of an earlier round (one a nuke's reset
    /// made stale) changes nothing.
    pub fn host_listed(
        &mut self,
        round: u64,
        host: &str,
        scan: Result<HostScan, String>,
        now: Millis,
    ) -> Vec<Intent> {
        if round != self.reaper.rounds {
            return Vec::new();
        }
        let Round::Listing { hosts, .. } = &mut self.reaper.round else {
            return Vec::new();
        };
        if !hosts.remove(host) {
            return Vec::new();
        }
        let mut out = match scan {
            // While a nuke holds the pool it wipes every host anyway.
            Ok(_) if self.nuke.holds_pool() => Vec::new(),
            Ok(scan) => self.apply_host_scan(host, scan, now),
            Err(_) => {
                self.reaper.incomplete = true;
                Vec::new()
            }
        };
        out.extend(self.round_progress(now));
        out
    }

    /// Temporal's answer of round `round` arrived (`Err`: it could not be had). With
    /// `tell_unclaimed`, running agents the pool holds no claim of are told to claim again
    /// ([`Pool::tell_unclaimed`]); pool runs recorded before that existed pass `false`.
    pub fn agents_listed(
        &mut self,
        round: u64,
        scan: Result<AgentScan, String>,
        now: Millis,
        tell_unclaimed: bool,
    ) -> Vec<Intent> {
        if round != self.reaper.rounds {
            return Vec::new();
        }
        let Round::Listing { agents, .. } = &mut self.reaper.round else {
            return Vec::new();
        };
        if !*agents {
            return Vec::new();
        }
        *agents = false;
        let mut out = match scan {
            Ok(scan) => self.apply_agent_scan(scan, now, tell_unclaimed),
            Err(_) => Vec::new(),
        };
        out.extend(self.round_progress(now));
        out
    }

    /// Ends the round once every listing arrived, and sets the timer of the next one (at
    /// once while the pool recovers).
    fn round_progress(&mut self, now: Millis) -> Vec<Intent> {
        let Round::Listing { hosts, agents } = &self.reaper.round else {
            return Vec::new();
        };
        if !hosts.is_empty() || *agents {
            return Vec::new();
        }
        self.reaper.scans += 1;
        self.reaper.last_scan_at = Some(now);
        let mut out = self.round_finished_recovery(now);
        let next = self.reaper.rounds + 1;
        self.reaper.round = Round::Waiting { next };
        let wait_ms = if self.recovery.is_some() {
            1
        } else {
            self.reaper.settings.interval()
        };
        out.push(Intent::NextScan {
            round: next,
            wait_ms,
        });
        out.extend(self.reconcile(now));
        out
    }

    fn apply_host_scan(&mut self, host: &str, scan: HostScan, now: Millis) -> Vec<Intent> {
        self.reaper.settings = scan.settings;
        let diffs = scan.diffs;
        self.reaper
            .host_totals
            .insert(host.to_string(), diffs.total);
        if diffs.truncated {
            self.reaper.incomplete = true;
        }
        if self.hosts.is_lost(host) {
            // Lost since the round started: nothing there can be asked to change.
            return Vec::new();
        }
        let buckets = self.reaper.host_buckets.get(host).copied().unwrap_or(1);
        let reported: BTreeSet<u32> = diffs.reported.iter().copied().collect();
        // A bucket is known to agree when it was not reported by a complete listing.
        let agrees = |b: u32| !diffs.truncated && !reported.contains(&b);
        let judged = |id: &VmId| reported.contains(&bucket_of(&id.0, buckets));
        let needed = self.reaper.settings.sightings_needed();
        let listed: BTreeMap<&VmId, &ScannedVm> = diffs.items.iter().map(|v| (&v.id, v)).collect();
        let mut out = Vec::new();

        // Unknown VMs: adopted when a running agent owns them (or, recovering, when fresh);
        // otherwise suspects, deleted once the grace period has passed.
        let forgotten = &self.reaper.forgotten;
        let unknown: Vec<&ScannedVm> = diffs
            .items
            .iter()
            .filter(|v| !self.vms.contains_key(&v.id) && !forgotten.contains(&v.id))
            .collect();
        self.reaper.suspects.retain(|id, s| {
            s.host != host
                || listed.contains_key(id)
                || !(agrees(bucket_of(&id.0, buckets)) || judged(id))
        });
        for vm in unknown {
            if let Some(intents) = self.adopt(host, vm, now) {
                self.reaper.suspects.remove(&vm.id);
                out.extend(intents);
                continue;
            }
            if self.recovery.is_some() {
                // Recovery rounds run back to back: sightings count only in ordinary
                // rounds, which span the grace period.
                continue;
            }
            let s = self
                .reaper
                .suspects
                .entry(vm.id.clone())
                .or_insert(Suspect {
                    host: host.to_string(),
                    seen: 0,
                });
            s.seen += 1;
            if s.seen >= needed {
                self.reaper.suspects.remove(&vm.id);
                self.reaper.orphans_deleted += 1;
                out.push(self.adopt_orphan(&vm.id, Some(host.to_string()), now));
            }
        }

        // Warm VMs of this host that died (or vanished) since they came up, among those that
        // were warm before the round started.
        let round = self.reaper.rounds;
        let dead: Vec<VmId> = self
            .vms
            .values()
            .filter(|v| v.host.as_deref() == Some(host) && v.state == VmState::Warm)
            .filter(|v| v.warm_round < round && judged(&v.id))
            .filter(|v| listed.get(&v.id).is_none_or(|l| !l.alive))
            .map(|v| v.id.clone())
            .collect();
        for id in dead {
            self.reaper.dead_vms_replaced += 1;
            out.push(self.mark_deleting(&id, DeleteReason::Died));
        }
        out
    }

    fn apply_agent_scan(
        &mut self,
        scan: AgentScan,
        now: Millis,
        tell_unclaimed: bool,
    ) -> Vec<Intent> {
        self.reaper.settings = scan.settings;
        self.reaper.stranded_found = scan.stranded_found;
        self.reaper.stranded_terminated += u64::from(scan.stranded_terminated);
        self.reaper.stranded_cursor = scan.stranded_cursor;
        let needed = self.reaper.settings.sightings_needed();
        let mut out = Vec::new();
        if self.nuke.under_way() {
            match scan.nuke_running {
                Some(false) => {
                    self.reaper.nuke_missing += 1;
                    if self.reaper.nuke_missing >= needed {
                        self.reaper.nuke_missing = 0;
                        out.extend(self.nuke_abandoned(now));
                    }
                }
                _ => self.reaper.nuke_missing = 0,
            }
        } else {
            self.reaper.nuke_missing = 0;
        }
        let Some(running) = scan.running else {
            return out;
        };
        self.reaper.agents_total = running.total;
        if self.nuke.holds_pool() {
            return out;
        }
        let buckets = self.reaper.claim_buckets.max(1);
        let reported: BTreeSet<u32> = running.reported.iter().copied().collect();
        let listed: BTreeSet<&str> = running.items.iter().map(String::as_str).collect();
        let before = self.reaper.claims_before_round;
        let judged: Vec<(String, bool)> = self
            .claims
            .values()
            .filter(|c| c.seq <= before)
            .filter_map(|c| {
                let b = bucket_of(&c.request, buckets);
                if reported.contains(&b) {
                    Some((c.request.clone(), listed.contains(c.request.as_str())))
                } else if !running.truncated {
                    Some((c.request.clone(), true))
                } else {
                    None
                }
            })
            .collect();
        for (request, runs) in judged {
            if runs {
                self.reaper.claim_suspects.remove(&request);
                continue;
            }
            let seen = self
                .reaper
                .claim_suspects
                .entry(request.clone())
                .or_insert(0);
            *seen += 1;
            if *seen >= needed {
                self.reaper.claim_suspects.remove(&request);
                self.reaper.agent_claims_released += 1;
                let (_, intents) = self.release(&request, now);
                out.extend(intents);
            }
        }
        let claims = &self.claims;
        self.reaper
            .claim_suspects
            .retain(|r, _| claims.contains_key(r));
        if tell_unclaimed {
            out.extend(self.tell_unclaimed(&running.items));
        }
        out
    }

    /// The sweep that serves waiting claims a pool run lost: a running agent whose claim the
    /// pool does not hold (it was queued in a run that ended, and the pool recovered without
    /// it) waits for a `claim_settled` signal nobody would send. Once
    /// [`UNCLAIMED_SIGHTINGS`] rounds in a row list it so, it is told to claim again (and
    /// again every [`UNCLAIMED_RETELL`] rounds while it stays so). An agent whose first
    /// claim is still on its way is listed once at most; telling it is harmless (it asks
    /// where its claim stands).
    fn tell_unclaimed(&mut self, listed: &[String]) -> Vec<Intent> {
        let mut seen = BTreeMap::new();
        let mut out = Vec::new();
        for request in listed.iter().filter(|r| !self.claims.contains_key(*r)) {
            let agent = agent_of(request);
            let rounds = self
                .reaper
                .unclaimed_agents
                .get(request)
                .copied()
                .unwrap_or(0)
                + 1;
            if rounds >= UNCLAIMED_SIGHTINGS
                && (rounds - UNCLAIMED_SIGHTINGS).is_multiple_of(UNCLAIMED_RETELL)
            {
                self.reaper.agents_told_to_claim += 1;
                out.push(Intent::Notify {
                    agent: agent.to_string(),
                });
            }
            seen.insert(request.clone(), rounds);
        }
        self.reaper.unclaimed_agents = seen;
        out
    }

    /// Adopts an unknown VM a host listed, when someone owns it: a running agent that
    /// started on it (any time), or — while the pool recovers — the pool itself, for a warm
    /// VM of a workspace's current image and the pool's generation (it is booted again,
    /// which for a VM that is up is only its readiness handshake). A recovering pool deletes
    /// what nobody owns at once. `None`: not adopted (a suspect).
    fn adopt(&mut self, host: &str, vm: &ScannedVm, now: Millis) -> Option<Vec<Intent>> {
        let labels = vm.labels.as_ref()?;
        if let Some(owner) = &labels.owner
            && labels.owner_running
            && vm.alive
        {
            return Some(self.adopt_assigned(host, vm, labels, owner, now));
        }
        self.recovery.as_ref()?;
        let fresh = vm.alive
            && labels.owner.is_none()
            && labels.generation == self.generation
            && self
                .workspaces
                .get(&labels.workspace)
                .is_some_and(|w| w.spec.image_ref == labels.image);
        if let Some(r) = self.recovery.as_mut() {
            if fresh {
                r.adopted_warm += 1;
            } else {
                r.deleted += 1;
            }
        }
        if !fresh {
            return Some(vec![self.adopt_orphan(&vm.id, Some(host.to_string()), now)]);
        }
        let rec = self.adopted_record(host, vm, labels, VmState::Booting, now);
        let boot = Intent::Boot(self.boot_spec(&rec));
        self.vms.insert(vm.id.clone(), rec);
        Some(vec![boot])
    }

    fn adopt_assigned(
        &mut self,
        host: &str,
        vm: &ScannedVm,
        labels: &VmLabels,
        owner: &str,
        now: Millis,
    ) -> Vec<Intent> {
        let agent = agent_of(owner).to_string();
        match self.claims.get_mut(owner) {
            // The agent holds another VM already: this one is not its.
            Some(c) if c.vm.as_ref().is_some_and(|v| v != &vm.id) => return Vec::new(),
            Some(c) => c.vm = Some(vm.id.clone()),
            None => {
                self.claim_seq += 1;
                self.claims_changed();
                let (developer, workspace) = agent_developer_and_workspace(&agent);
                self.claims.insert(
                    owner.to_string(),
                    Claim {
                        request: owner.to_string(),
                        agent: agent.clone(),
                        developer,
                        workspace: workspace.unwrap_or_else(|| labels.workspace.clone()),
                        seq: self.claim_seq,
                        vm: Some(vm.id.clone()),
                        failed: None,
                        requested_at: now,
                    },
                );
            }
        }
        let mut rec = self.adopted_record(host, vm, labels, VmState::Assigned, now);
        rec.agent = Some(agent.clone());
        rec.claim = Some(owner.to_string());
        self.vms.insert(vm.id.clone(), rec);
        self.reaper.adopted += 1;
        if let Some(r) = self.recovery.as_mut() {
            r.adopted_assigned += 1;
        }
        // The agent may be waiting for the claim it made before the pool recovered.
        vec![Intent::Notify { agent }]
    }

    fn adopted_record(
        &self,
        host: &str,
        vm: &ScannedVm,
        labels: &VmLabels,
        state: VmState,
        now: Millis,
    ) -> VmRecord {
        VmRecord {
            id: vm.id.clone(),
            workspace: labels.workspace.clone(),
            image: labels.image.clone(),
            generation: labels.generation,
            state,
            agent: None,
            claim: None,
            created_at: now,
            ready_at: None,
            delete_reason: None,
            host: Some(host.to_string()),
            memory_mb: self
                .workspaces
                .get(&labels.workspace)
                .map_or(0, |w| w.spec.environment.memory_mb),
            delete_failures: 0,
            delete_error: None,
            warm_round: 0,
            dormant: false,
            wake_seq: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::HostInfo;
    use crate::machine::ClaimRequest;
    use crate::model::{Resource, WorkspaceSpec};

    const HOST: &str = "h1";

    fn view() -> HostView {
        HostView {
            version: 1,
            hosts: [(
                HOST.to_string(),
                HostInfo {
                    host: HOST.into(),
                    max_vms: 100,
                    ..Default::default()
                },
            )]
            .into_iter()
            .collect(),
        }
    }

    fn pool_with_warm(n: u32) -> (Pool, Vec<VmId>) {
        let mut pool = Pool::new("t", 7, 0);
        pool.hosts_changed(view(), 0);
        pool.workspaces.insert(
            "default".into(),
            Resource {
                meta: Default::default(),
                spec: WorkspaceSpec {
                    min_idle: n,
                    image_ref: "default".into(),
                    ..WorkspaceSpec::default()
                },
            },
        );
        let boots = pool.reconcile(0);
        let ids: Vec<VmId> = boots
            .iter()
            .filter_map(|c| match c {
                Intent::Boot(s) => Some(s.vm.clone()),
                _ => None,
            })
            .collect();
        for id in &ids {
            pool.boot_succeeded(id, 10);
        }
        (pool, ids)
    }

    fn settings(grace_ms: Millis) -> ScanSettings {
        ScanSettings {
            grace_ms,
            interval_ms: 1_000,
            roll_over_events: 0,
        }
    }

    /// Runs one round in which the host holds `vms` (alive unless listed in `dead`) and
    /// the running agents are `running`.
    fn round(
        pool: &mut Pool,
        vms: &[ScannedVm],
        running: &[String],
        grace_ms: Millis,
        now: Millis,
    ) -> Vec<Intent> {
        round_with(pool, vms, running, grace_ms, now, true)
    }

    /// [`round`], with the sweep of unclaimed agents on or (pool runs recorded before it) off.
    fn round_with(
        pool: &mut Pool,
        vms: &[ScannedVm],
        running: &[String],
        grace_ms: Millis,
        now: Millis,
        tell_unclaimed: bool,
    ) -> Vec<Intent> {
        let mut out = pool.request_scan();
        out.extend(pool.hosts_read(Some(view()), now));
        let mut list_host = None;
        let mut list_agents = None;
        let round = pool.reaper.rounds;
        for c in &out {
            match c {
                Intent::ListHost { host, digests, .. } => {
                    list_host = Some((host.clone(), digests.clone()))
                }
                Intent::ListAgents { request, .. } => list_agents = Some(request.clone()),
                _ => {}
            }
        }
        let mut intents = Vec::new();
        if let Some((host, digests)) = list_host {
            let scan = HostScan::answer(&digests, vms.to_vec(), settings(grace_ms));
            intents.extend(pool.host_listed(round, &host, Ok(scan), now));
        }
        let req = list_agents.expect("a round asks Temporal");
        intents.extend(pool.agents_listed(
            round,
            Ok(AgentScan {
                running: running_differences(&req.claims, running.iter().cloned()),
                settings: settings(grace_ms),
                ..AgentScan::default()
            }),
            now,
            tell_unclaimed,
        ));
        intents
    }

    fn alive(ids: &[VmId]) -> Vec<ScannedVm> {
        ids.iter()
            .map(|id| ScannedVm {
                id: id.clone(),
                alive: true,
                labels: None,
            })
            .collect()
    }

    fn deletes(intents: &[Intent]) -> Vec<VmId> {
        intents
            .iter()
            .filter_map(|c| match c {
                Intent::Delete { vm, .. } => Some(vm.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_unknown_vm_is_deleted_only_after_the_grace_period() {
        let (mut pool, mut ids) = pool_with_warm(2);
        let orphan = VmId("murmur-0a0a0a0a".into());
        ids.push(orphan.clone());
        // Grace 2 s at 1 s per round: three sightings in a row.
        assert_eq!(settings(2_000).sightings_needed(), 3);
        assert!(deletes(&round(&mut pool, &alive(&ids), &[], 2_000, 100)).is_empty());
        assert!(pool.reaper.suspects.contains_key(&orphan));
        assert!(deletes(&round(&mut pool, &alive(&ids), &[], 2_000, 1_100)).is_empty());
        let due = round(&mut pool, &alive(&ids), &[], 2_000, 2_100);
        assert_eq!(deletes(&due), vec![orphan.clone()]);
        assert_eq!(pool.vms[&orphan].state, VmState::Deleting);
        assert_eq!(pool.reaper.orphans_deleted, 1);
        assert!(pool.reaper.suspects.is_empty());
    }

    #[test]
    fn a_round_of_a_pool_that_agrees_lists_nothing() {
        let (mut pool, ids) = pool_with_warm(5);
        let mut out = pool.request_scan();
        out.extend(pool.hosts_read(Some(view()), 50));
        let Some(Intent::ListHost { digests, .. }) =
            out.iter().find(|c| matches!(c, Intent::ListHost { .. }))
        else {
            panic!("no listing asked for");
        };
        let diffs = Differences::between(
            digests,
            alive(&ids)
                .into_iter()
                .map(|v| (v.id.0.clone(), v))
                .collect(),
            LISTING_CAP,
        );
        assert!(diffs.items.is_empty() && diffs.reported.is_empty());
    }

    #[test]
    fn a_suspect_that_disappears_is_forgotten() {
        let (mut pool, ids) = pool_with_warm(1);
        let mut with_stray = ids.clone();
        with_stray.push(VmId("murmur-57a70000".into()));
        round(&mut pool, &alive(&with_stray), &[], 1_000, 100);
        assert_eq!(pool.reaper.suspects.len(), 1);
        let intents = round(&mut pool, &alive(&ids), &[], 1_000, 5_000);
        assert!(deletes(&intents).is_empty());
        assert!(pool.reaper.suspects.is_empty());
    }

    #[test]
    fn a_dead_warm_vm_is_replaced() {
        let (mut pool, ids) = pool_with_warm(2);
        // ids[0] is missing from the listing; ids[1] is listed but dead.
        let mut listing = alive(&ids[1..]);
        listing[0].alive = false;
        let intents = round(&mut pool, &listing, &[], 1_000, 60);
        let (mut gone, mut want) = (deletes(&intents), ids.clone());
        gone.sort();
        want.sort();
        assert_eq!(gone, want);
        assert_eq!(pool.reaper.dead_vms_replaced, 2);
        let boots = intents
            .iter()
            .filter(|c| matches!(c, Intent::Boot(_)))
            .count();
        assert_eq!(boots, 2, "backfill replaces what was reaped");
    }

    #[test]
    fn a_vm_warm_only_since_the_round_started_is_not_judged() {
        let (mut pool, ids) = pool_with_warm(1);
        let mut out = pool.request_scan();
        out.extend(pool.hosts_read(Some(view()), 20));
        // A new VM comes up after the listing was asked for.
        pool.workspaces.get_mut("default").unwrap().spec.min_idle = 2;
        let boot = pool
            .reconcile(21)
            .into_iter()
            .find_map(|c| match c {
                Intent::Boot(s) => Some(s.vm),
                _ => None,
            })
            .unwrap();
        pool.boot_succeeded(&boot, 22);
        let Some(Intent::ListHost { digests, .. }) =
            out.iter().find(|c| matches!(c, Intent::ListHost { .. }))
        else {
            panic!()
        };
        // The listing was taken before the boot: it holds only the first VM.
        let diffs = Differences::between(
            digests,
            alive(&ids)
                .into_iter()
                .map(|v| (v.id.0.clone(), v))
                .collect(),
            LISTING_CAP,
        );
        let intents = pool.host_listed(
            pool.reaper.rounds,
            HOST,
            Ok(HostScan {
                diffs,
                settings: settings(1_000),
            }),
            23,
        );
        assert!(
            !deletes(&intents).contains(&boot),
            "judged a VM newer than the round"
        );
    }

    #[test]
    fn the_claim_of_a_finished_agent_is_released_after_the_grace_period() {
        let (mut pool, ids) = pool_with_warm(1);
        let req = ClaimRequest {
            request: "agent/t/default/dev/a@run1".into(),
            agent: "agent/t/default/dev/a".into(),
            developer: "dev".into(),
            workspace: "default".into(),
            ..ClaimRequest::default()
        };
        pool.claim(&req, 20);
        assert_eq!(pool.vms[&ids[0]].state, VmState::Assigned);
        let running = vec![req.request.clone()];
        assert!(deletes(&round(&mut pool, &alive(&ids), &running, 1_000, 30)).is_empty());
        // The agent ends without releasing: two rounds without it.
        assert!(deletes(&round(&mut pool, &alive(&ids), &[], 1_000, 40)).is_empty());
        let intents = round(&mut pool, &alive(&ids), &[], 1_000, 50);
        assert_eq!(deletes(&intents), vec![ids[0].clone()]);
        assert!(pool.claims.is_empty());
        assert_eq!(pool.reaper.agent_claims_released, 1);
    }

    /// The claim agent run `request` (`<workflow id>@<run id>`) makes.
    fn claim_of(request: &str) -> ClaimRequest {
        ClaimRequest {
            request: request.into(),
            agent: agent_of(request).into(),
            developer: "dev".into(),
            workspace: "default".into(),
            ..ClaimRequest::default()
        }
    }

    fn told(intents: &[Intent]) -> Vec<String> {
        intents
            .iter()
            .filter_map(|c| match c {
                Intent::Notify { agent } => Some(agent.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_running_agent_the_pool_holds_no_claim_of_is_told_to_claim_again() {
        let (mut pool, ids) = pool_with_warm(1);
        // Queued in a pool run that ended: the pool recovered without its claim.
        let lost = "agent/t/default/dev/lost@run1".to_string();
        let running = vec![lost.clone()];
        assert!(told(&round(&mut pool, &alive(&ids), &running, 1_000, 10)).is_empty());
        let intents = round(&mut pool, &alive(&ids), &running, 1_000, 20);
        assert_eq!(told(&intents), vec!["agent/t/default/dev/lost".to_string()]);
        assert_eq!(pool.reaper.agents_told_to_claim, 1);
        // Told once; reminded only after UNCLAIMED_RETELL more rounds.
        let mut reminders = 0;
        for r in 0..UNCLAIMED_RETELL {
            let now = 30 + u64::from(r) * 10;
            reminders += told(&round(&mut pool, &alive(&ids), &running, 1_000, now)).len();
        }
        assert_eq!(reminders, 1);
        // It claims again: the pool holds the claim, and nobody is told any more.
        pool.claim(&claim_of(&lost), 1_000);
        assert!(told(&round(&mut pool, &alive(&ids), &running, 1_000, 2_000)).is_empty());
        assert!(pool.reaper.unclaimed_agents.is_empty());
    }

    #[test]
    fn an_agent_whose_claim_arrives_within_a_round_is_not_told() {
        let (mut pool, ids) = pool_with_warm(1);
        let new = "agent/t/default/dev/new@run1";
        let running = [new.to_string()];
        assert!(told(&round(&mut pool, &alive(&ids), &running, 1_000, 10)).is_empty());
        pool.claim(&claim_of(new), 15);
        assert!(told(&round(&mut pool, &alive(&ids), &running, 1_000, 20)).is_empty());
        assert_eq!(pool.reaper.agents_told_to_claim, 0);
    }

    #[test]
    fn pool_runs_recorded_before_the_sweep_tell_nobody() {
        let (mut pool, ids) = pool_with_warm(1);
        let lost = ["agent/t/default/dev/lost@run1".to_string()];
        for now in [10, 20, 30] {
            let intents = round_with(&mut pool, &alive(&ids), &lost, 1_000, now, false);
            assert!(told(&intents).is_empty());
        }
    }

    #[test]
    fn a_vm_a_running_agent_holds_is_adopted_never_deleted() {
        let (mut pool, ids) = pool_with_warm(1);
        let held = VmId("murmur-4e1d0000".into());
        let owner = "agent/t/default/dev/a@run1".to_string();
        let mut listing = alive(&ids);
        listing.push(ScannedVm {
            id: held.clone(),
            alive: true,
            labels: Some(VmLabels {
                workspace: "default".into(),
                image: "default".into(),
                generation: 1,
                owner: Some(owner.clone()),
                owner_running: true,
            }),
        });
        for now in [100, 1_100, 2_100, 3_100] {
            let intents = round(
                &mut pool,
                &listing,
                std::slice::from_ref(&owner),
                1_000,
                now,
            );
            assert!(
                !deletes(&intents).contains(&held),
                "deleted a VM its agent holds"
            );
        }
        assert_eq!(pool.vms[&held].state, VmState::Assigned);
        assert_eq!(pool.claims[&owner].vm.as_ref(), Some(&held));
        assert_eq!(pool.reaper.adopted, 1);
    }

    #[test]
    fn a_pool_a_dead_nuke_left_waiting_stops_waiting_after_the_grace_period() {
        let (mut pool, ids) = pool_with_warm(2);
        pool.nuke_pause("r1", 0).unwrap();
        let nuke_gone = |pool: &mut Pool, now| {
            let mut out = pool.request_scan();
            out.extend(pool.hosts_read(Some(view()), now));
            assert!(
                !out.iter().any(|c| matches!(c, Intent::ListHost { .. })),
                "a held pool lists hosts"
            );
            pool.agents_listed(
                pool.reaper.rounds,
                Ok(AgentScan {
                    nuke_running: Some(false),
                    settings: settings(2_000),
                    ..AgentScan::default()
                }),
                now,
                true,
            )
        };
        assert!(deletes(&nuke_gone(&mut pool, 1_000)).is_empty());
        assert!(deletes(&nuke_gone(&mut pool, 2_000)).is_empty());
        assert!(
            pool.nuke.holds_pool(),
            "stopped waiting before the grace period"
        );
        nuke_gone(&mut pool, 3_000);
        assert!(!pool.nuke.holds_pool());
        assert_eq!(pool.reaper.abandoned_nukes, 1);
        // The next round judges the substrate again: the VM the nuke deleted is replaced.
        let intents = round(&mut pool, &alive(&ids[1..]), &[], 2_000, 4_000);
        assert_eq!(deletes(&intents), vec![ids[0].clone()]);
    }
}
