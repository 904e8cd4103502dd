//! Admission of signed developer requests: each request works once, decided without a clock.
//!
//! The `murmur.verify` local activity checks a request's credential against the worker's
//! clock (a request signed more than [`REQUEST_WINDOW_MS`] away is refused there, and its
//! verdict is recorded in history). What is left for the pool is the replay check, and it
//! compares only the signed timestamps that verified requests carry, never workflow time:
//!
//! - a request is recorded under (operation, developer, request id) with its signed time;
//! - the newest signed time admitted so far is the *mark*; a request signed more than
//!   [`REPLAY_HORIZON_MS`] before the mark is refused as stale, and records older than that
//!   are forgotten. Two requests that both passed verification were signed at most two
//!   windows apart, so a forgotten request can only come back older than its window, and the
//!   verifier refuses it;
//! - a spawn's request is consumed by the agent run that presented it: the same run may
//!   present it again (it claims again after its pool was recovered), another may not.
//!
//! Worker-internal requests (claims, releases, nuke steps) are not recorded: they are
//! verified for freshness and are idempotent by their own keys.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{MAX_DENIALS, Pool};
use crate::auth::{Denial, REQUEST_WINDOW_MS, unauthenticated};
use crate::error::ApiError;
use crate::model::Millis;

/// How far before the newest admitted request a request may have been signed.
pub const REPLAY_HORIZON_MS: u64 = 2 * REQUEST_WINDOW_MS;

/// A verified request offered for admission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admission<'a> {
    /// The operation (see [`crate::auth::ops`]).
    pub op: &'a str,
    /// The verified developer.
    pub developer: &'a str,
    /// The request id from the credential.
    pub request_id: &'a str,
    /// The signed time from the credential.
    pub signed_at: u64,
    /// What consumes it (a spawn: the agent run's claim); the same consumer may present it
    /// again.
    pub consumer: Option<&'a str>,
}

/// One request already used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Used {
    /// Its signed time.
    at: u64,
    /// Who consumed it, for requests that may be presented again by the same consumer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    by: Option<String>,
}

/// The replay records: bounded by the rate of developer requests over
/// [`REPLAY_HORIZON_MS`], carried across continue-as-new.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReplayGuard {
    /// Newest signed time admitted.
    mark: u64,
    /// `op developer request-id` → the record.
    used: BTreeMap<String, Used>,
    /// The records by signed time, oldest first, so forgetting the old ones does not walk
    /// every record on each admission. Derived from `used`: not carried, not compared,
    /// rebuilt when it does not match it.
    #[serde(skip)]
    by_time: ByTime,
}

/// `(signed time, key)` of every record (see [`ReplayGuard`]).
#[derive(Clone, Debug, Default)]
struct ByTime(std::collections::BTreeSet<(u64, String)>);

impl PartialEq for ByTime {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for ByTime {}

impl ReplayGuard {
    /// Admits a request once; refuses a replay or a request older than the horizon.
    pub fn admit(&mut self, a: &Admission<'_>) -> Result<(), ApiError> {
        let key = format!("{} {} {}", a.op, a.developer, a.request_id);
        if let Some(used) = self.used.get(&key) {
            return match (&used.by, a.consumer) {
                (Some(by), Some(consumer)) if by == consumer => Ok(()),
                _ => Err(unauthenticated(format!(
                    "request {} was already used; sign a new request",
                    a.request_id
                ))),
            };
        }
        if a.signed_at.saturating_add(REPLAY_HORIZON_MS) < self.mark {
            return Err(unauthenticated(format!(
                "request {} was signed more than {}s before a newer one was accepted; sign a new request",
                a.request_id,
                REPLAY_HORIZON_MS / 1000
            )));
        }
        self.mark = self.mark.max(a.signed_at);
        if self.by_time.0.len() != self.used.len() {
            self.by_time.0 = self.used.iter().map(|(k, u)| (u.at, k.clone())).collect();
        }
        self.by_time.0.insert((a.signed_at, key.clone()));
        self.used.insert(
            key,
            Used {
                at: a.signed_at,
                by: a.consumer.map(str::to_string),
            },
        );
        // Forget what is older than the horizon, oldest first.
        while let Some((at, _)) = self.by_time.0.first()
            && at.saturating_add(REPLAY_HORIZON_MS) < self.mark
        {
            if let Some((_, key)) = self.by_time.0.pop_first() {
                self.used.remove(&key);
            }
        }
        Ok(())
    }

    /// Requests remembered now.
    pub fn len(&self) -> usize {
        self.used.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

impl Pool {
    /// Admits a verified developer request once; a refusal is recorded in the denials.
    pub fn admit(&mut self, a: &Admission<'_>, now: Millis) -> Result<(), ApiError> {
        let who = format!("{}@{}", a.developer, self.tenant);
        self.replays
            .admit(a)
            .inspect_err(|e| self.record_denial(a.op, &who, e, now))
    }

    /// Records a refused request (who, what, why) for `murmur pool status`; keeps the latest
    /// [`MAX_DENIALS`]. `who` must come from a verified identity, or be `unknown`.
    pub fn record_denial(&mut self, op: &str, who: &str, why: &ApiError, now: Millis) {
        self.denials.push(Denial {
            at: now,
            op: op.to_string(),
            who: who.to_string(),
            why: why.to_string(),
        });
        let excess = self.denials.len().saturating_sub(MAX_DENIALS);
        self.denials.drain(..excess);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(op: &'a str, dev: &'a str, id: &'a str, at: u64) -> Admission<'a> {
        Admission {
            op,
            developer: dev,
            request_id: id,
            signed_at: at,
            consumer: None,
        }
    }

    #[test]
    fn a_request_works_once_whatever_time_passes() {
        let mut g = ReplayGuard::default();
        g.admit(&req("pool.nuke", "ana", "r1", 1_000)).unwrap();
        assert!(g.admit(&req("pool.nuke", "ana", "r1", 1_000)).is_err());
        // Other requests come and go; r1 is refused as long as it is remembered, and once it
        // is forgotten it is older than the horizon, which is refused too.
        for i in 0..100u64 {
            let id = format!("x{i}");
            g.admit(&req("pool.flush", "bo", &id, 1_000 + i * 10_000))
                .unwrap();
            let again = g.admit(&req("pool.nuke", "ana", "r1", 1_000));
            assert!(again.is_err(), "r1 admitted again after {i} more requests");
        }
        assert!(
            g.len() <= (REPLAY_HORIZON_MS / 10_000 + 2) as usize,
            "{} remembered",
            g.len()
        );
    }

    #[test]
    fn records_are_scoped_by_operation_and_developer() {
        let mut g = ReplayGuard::default();
        g.admit(&req("pool.flush", "ana", "r1", 5)).unwrap();
        g.admit(&req("pool.flush", "bo", "r1", 5)).unwrap();
        g.admit(&req("config.apply", "ana", "r1", 5)).unwrap();
        assert!(g.admit(&req("pool.flush", "ana", "r1", 5)).is_err());
    }

    #[test]
    fn the_consumer_of_a_spawn_may_present_it_again() {
        let mut g = ReplayGuard::default();
        let mut a = req("agent.spawn", "ana", "s1", 9);
        a.consumer = Some("agent/t/w/ana/x@run1");
        g.admit(&a).unwrap();
        g.admit(&a).unwrap();
        a.consumer = Some("agent/t/w/ana/x@run2");
        assert!(g.admit(&a).is_err(), "another run used a spawn request");
    }

    #[test]
    fn requests_signed_within_the_window_of_each_other_are_all_admitted() {
        let mut g = ReplayGuard::default();
        // Two developers whose clocks are a full window apart in each direction.
        g.admit(&req(
            "pool.flush",
            "ana",
            "a",
            1_000_000 + REQUEST_WINDOW_MS,
        ))
        .unwrap();
        g.admit(&req("pool.flush", "bo", "b", 1_000_000 - REQUEST_WINDOW_MS))
            .unwrap();
    }
}
