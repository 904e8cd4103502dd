//! What the activities measure for the worker's `/metrics`: how long claims take, and how
//! many boots a full host refused. Each is a `prometheus` collector the worker registers in
//! its registry; the activities only record.

use prometheus::core::Collector;
use prometheus::{HistogramOpts, HistogramVec, IntCounter};

/// Upper bounds (seconds) of the claim latency histogram buckets.
const CLAIM_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Claim latency (from the agent's first claim to its VM being assigned) as measured by this
/// worker, warm (served at once from the warm pool) and cold (booted for it, or queued):
/// `murmur_claim_latency_seconds{kind}`.
#[derive(Clone, Debug)]
pub struct ClaimLatencies(HistogramVec);

impl Default for ClaimLatencies {
    fn default() -> Self {
        let opts = HistogramOpts::new(
            "murmur_claim_latency_seconds",
            "From an agent's first claim to its VM being assigned, measured by this worker.",
        )
        .buckets(CLAIM_BUCKETS.to_vec());
        let histogram =
            HistogramVec::new(opts, &["kind"]).expect("constant histogram options are valid");
        // Both series exist from the start, so "no cold claim yet" reads 0, not absent.
        for kind in ["warm", "cold"] {
            histogram.with_label_values(&[kind]);
        }
        Self(histogram)
    }
}

impl ClaimLatencies {
    /// Records one claim.
    pub fn record(&self, warm: bool, seconds: f64) {
        let kind = if warm { "warm" } else { "cold" };
        self.0.with_label_values(&[kind]).observe(seconds);
    }

    /// The histogram, to register in a registry.
    pub fn collector(&self) -> Box<dyn Collector> {
        Box::new(self.0.clone())
    }
}

/// Boots refused because the host already ran its `max_vms`:
/// `murmur_host_boots_refused_total`.
#[derive(Clone, Debug)]
pub struct RefusedBoots(IntCounter);

impl Default for RefusedBoots {
    fn default() -> Self {
        Self(
            IntCounter::new(
                "murmur_host_boots_refused_total",
                "Boots this host refused because it already ran its max_vms VMs (every tenant's).",
            )
            .expect("constant counter options are valid"),
        )
    }
}

impl RefusedBoots {
    /// Counts one refusal.
    pub fn count(&self) {
        self.0.inc();
    }

    /// The counter, to register in a registry.
    pub fn collector(&self) -> Box<dyn Collector> {
        Box::new(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_counted_by_kind() {
        let claims = ClaimLatencies::default();
        claims.record(true, 0.02);
        claims.record(false, 3.0);
        claims.record(false, 4.0);
        let families = claims.collector().collect();
        let metrics = families[0].get_metric();
        let count = |kind: &str| {
            metrics
                .iter()
                .find(|m| m.get_label()[0].value() == kind)
                .map(|m| m.get_histogram().get_sample_count())
        };
        assert_eq!((count("warm"), count("cold")), (Some(1), Some(2)));
    }
}
