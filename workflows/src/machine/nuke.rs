//! The pool's side of a nuke, as one explicit state.
//!
//! A nuke (`nuke/<tenant>`) pauses the pool, terminates every agent, deletes every VM and
//! resets the pool. It is asked for in two ways: `murmur pool flush --nuke` starts the nuke
//! workflow itself (its first step verifies the developer's signed request), or a `flush`
//! with `nuke` reaches the pool, which verifies and admits the request and starts the nuke
//! as a child. Either way the nuke's pause step is where the pool lets it hold the pool.
//!
//! | from | event | to | intent |
//! |---|---|---|---|
//! | `Idle` | [`Pool::request_nuke`] | `Starting` | `StartNuke` |
//! | `Starting` | [`Pool::nuke_started`]`(true)` | `Started` | — |
//! | `Starting` | [`Pool::nuke_started`]`(false)` (the previous nuke is still closing) | `RetryWait` | `NukeRetry` (a timer) |
//! | `RetryWait` | [`Pool::nuke_retry_due`] | `Starting` | `StartNuke` |
//! | `Idle`, `Starting`, `RetryWait`, `Started` | [`Pool::nuke_pause`] | `Paused` | — |
//! | `Paused` by the same request | [`Pool::nuke_pause`] (a retried pause) | `Paused` | — |
//! | `Paused` by another request | [`Pool::nuke_pause`] | refused | — |
//! | `Paused` | [`Pool::nuke_reset`] | `Idle` | backfill |
//! | any but `Idle` | [`Pool::nuke_abandoned`] (reaper: no nuke running for the grace period) | `Idle` | backfill |
//!
//! Only `Paused` stops hand-outs and backfill. A request made while a nuke is already under
//! way joins it (the caller waits for the next reset). `Starting` and `RetryWait` re-issue
//! their intent in a new run ([`Pool::resume`]); starting a nuke that already runs fails and
//! is retried until that nuke pauses the pool, so the states converge.

use serde::{Deserialize, Serialize};

use super::{Intent, Pool};
use crate::error::ApiError;
use crate::model::Millis;

/// Wait before retrying to start a nuke while the previous one is closing.
pub const NUKE_RETRY_MS: Millis = 1_000;

/// Where the pool stands with respect to a nuke. See the module's transition table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum NukeState {
    /// No nuke: hand-outs and backfill run.
    #[default]
    Idle,
    /// Starting `nuke/<tenant>` for an admitted request.
    Starting {
        /// The developer request the nuke acts for.
        request: String,
        /// Who asked.
        actor: String,
    },
    /// The previous nuke had not closed yet; a timer runs before the start is tried again.
    RetryWait {
        /// The developer request the nuke acts for.
        request: String,
        /// Who asked.
        actor: String,
    },
    /// The nuke this pool started runs and has not paused the pool yet.
    Started {
        /// The developer request it acts for.
        request: String,
    },
    /// A nuke holds the pool, from its pause until its reset.
    Paused {
        /// The developer request it acts for.
        request: String,
        /// Workflow time of the pause (for status: how long the nuke held the pool).
        since: Millis,
    },
}

impl NukeState {
    /// True while a nuke holds the pool: no hand-outs, no backfill.
    pub fn holds_pool(&self) -> bool {
        matches!(self, Self::Paused { .. })
    }

    /// True while a nuke is asked for, starting, running or holding the pool.
    pub fn under_way(&self) -> bool {
        !matches!(self, Self::Idle)
    }

    /// The request of the nuke this pool started (or is starting) itself.
    fn own_request(&self) -> Option<&str> {
        match self {
            Self::Starting { request, .. }
            | Self::RetryWait { request, .. }
            | Self::Started { request } => Some(request),
            Self::Idle | Self::Paused { .. } => None,
        }
    }
}

impl Pool {
    /// A verified, admitted `flush` with `nuke`: start the nuke, unless one is already under
    /// way (then the caller joins it).
    pub fn request_nuke(&mut self, request: &str, actor: &str) -> Vec<Intent> {
        if self.nuke.under_way() {
            return Vec::new();
        }
        self.nuke = NukeState::Starting {
            request: request.to_string(),
            actor: actor.to_string(),
        };
        vec![Intent::StartNuke {
            request: request.to_string(),
            actor: actor.to_string(),
        }]
    }

    /// The start of the nuke ended: it runs (`true`), or the previous nuke has not closed yet
    /// (`false`: wait, then try again).
    pub fn nuke_started(&mut self, started: bool) -> Vec<Intent> {
        let (request, actor) = match std::mem::take(&mut self.nuke) {
            NukeState::Starting { request, actor } => (request, actor),
            other => {
                // Paused meanwhile by the nuke that runs (its start failed because that one
                // exists): the pool stays paused by it, and its reset ends the wait of every
                // request that joined it.
                self.nuke = other;
                return Vec::new();
            }
        };
        if started {
            self.nuke = NukeState::Started { request };
            Vec::new()
        } else {
            self.nuke = NukeState::RetryWait { request, actor };
            vec![Intent::NukeRetry {
                wait_ms: NUKE_RETRY_MS,
            }]
        }
    }

    /// The retry timer of a nuke start fired.
    pub fn nuke_retry_due(&mut self) -> Vec<Intent> {
        match std::mem::take(&mut self.nuke) {
            NukeState::RetryWait { request, actor } => {
                self.nuke = NukeState::Starting {
                    request: request.clone(),
                    actor: actor.clone(),
                };
                vec![Intent::StartNuke { request, actor }]
            }
            other => {
                self.nuke = other;
                Vec::new()
            }
        }
    }

    /// True when `request` is the one of the nuke this pool started itself (its pause needs
    /// no admission: the pool admitted the request when it was asked).
    pub fn is_own_nuke(&self, request: &str) -> bool {
        self.nuke.own_request() == Some(request)
            || matches!(&self.nuke, NukeState::Paused { request: r, .. } if r == request)
    }

    /// Nuke step 1 for `request` (already admitted, or [`Pool::is_own_nuke`]): the pool stops
    /// hand-outs and backfill. Returns whether nothing boots any more (the pause answers once
    /// that is so, so the nuke sees every VM the pool will have created).
    pub fn nuke_pause(&mut self, request: &str, now: Millis) -> Result<bool, ApiError> {
        match &self.nuke {
            NukeState::Paused { request: r, .. } if r != request => {
                return Err(ApiError::failed_precondition(format!(
                    "another nuke of tenant {} holds the pool",
                    self.tenant
                )));
            }
            NukeState::Paused { .. } => {}
            _ => {
                self.nuke = NukeState::Paused {
                    request: request.to_string(),
                    since: now,
                };
            }
        }
        Ok(self.booting() == 0)
    }

    /// Nuke, last step: every agent was terminated and every VM of the tenant deleted from
    /// the substrate, so the pool forgets its inventory and claims, bumps the generation and
    /// resumes backfill (empty). `deleted` counts towards the totals. A reset of a pool no
    /// nuke holds (a retried reset) changes nothing.
    pub fn nuke_reset(&mut self, deleted: u64, now: Millis) -> Vec<Intent> {
        let NukeState::Paused { since, .. } = self.nuke else {
            return Vec::new();
        };
        self.nuke = NukeState::Idle;
        self.vms.clear();
        self.claims.clear();
        self.claims_changed();
        self.generation += 1;
        self.record_changed();
        self.last_nuke_ms = Some(now.saturating_sub(since));
        self.nukes += 1;
        self.counters.deleted += deleted;
        // Listings taken before the wipe describe a world that is gone: a new round.
        let mut out = self.restart_rounds();
        out.extend(self.reconcile(now));
        out
    }

    /// The reaper found no nuke running for the whole grace period while one was under way
    /// (it was terminated by hand, or died before its pause): the pool stops waiting for it.
    pub fn nuke_abandoned(&mut self, now: Millis) -> Vec<Intent> {
        if !self.nuke.under_way() {
            return Vec::new();
        }
        self.nuke = NukeState::Idle;
        self.reaper.abandoned_nukes += 1;
        self.reconcile(now)
    }

    /// Intents that re-issue the nuke's pending step in a new run.
    pub(super) fn resume_nuke(&self) -> Vec<Intent> {
        match &self.nuke {
            NukeState::Starting { request, actor } => vec![Intent::StartNuke {
                request: request.clone(),
                actor: actor.clone(),
            }],
            NukeState::RetryWait { .. } => vec![Intent::NukeRetry {
                wait_ms: NUKE_RETRY_MS,
            }],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A nuke asked through the pool while another nuke (started directly) runs: the pool's
    /// own start fails because that nuke exists, and the failure arrives after that nuke
    /// paused the pool. The pool must stay paused, and the running nuke's reset must count
    /// (the joined request waits for exactly that). It used to drop the pause here, so the
    /// reset was ignored and the joined request never got its answer.
    #[test]
    fn a_start_that_fails_after_the_running_nuke_paused_the_pool_keeps_it_paused() {
        let mut pool = Pool::new("t", 1, 0);
        let start = pool.request_nuke("joined", "dev");
        assert!(matches!(start.as_slice(), [Intent::StartNuke { .. }]));
        assert_eq!(pool.nuke_pause("running", 10), Ok(true));
        assert_eq!(pool.nuke_started(false), Vec::new());
        assert!(
            pool.nuke.holds_pool(),
            "the pause was dropped: {:?}",
            pool.nuke
        );
        let before = pool.nukes;
        pool.nuke_reset(0, 20);
        assert_eq!(
            pool.nukes,
            before + 1,
            "the running nuke's reset did not count"
        );
        assert!(!pool.nuke.under_way());
    }
}
