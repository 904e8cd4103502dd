//! A fault-injecting wrapper around any [`Provider`], for chaos tests and benchmarks.
//!
//! Off unless asked for explicitly (`murmur-worker run --faults <spec>` or `MURMUR_FAULTS`);
//! the worker says loudly at start that it is on, and every injected fault is logged with
//! `injected fault` and its kind, so a test can count them.
//!
//! The spec is a comma-separated list of `key=value`:
//!
//! | key | meaning |
//! |---|---|
//! | `create_fail=P` | a create fails (nothing created) with probability P |
//! | `leak=P` | a create creates the VM, then reports a permanent failure (the classic leak) |
//! | `delete_fail=P` | a delete fails (nothing deleted) |
//! | `ghost=P` | a delete reports success but leaves the VM running (only a reaper finds it) |
//! | `hang=P` | a create or delete hangs for `hang_for` (past the activity's timeout) |
//! | `hang_for=D` | how long a hang lasts (default `120s`) |
//! | `latency=A..B` | every create and delete first waits a uniform time in [A, B] |
//! | `stuck_deletes=N` | the first N distinct VMs asked to be deleted can never be deleted (every delete of them fails) |
//! | `seed=N` | seed of the fault dice (default: from the clock) |
//!
//! Durations take `ms`, `s` or `m`. Example: `create_fail=0.2,leak=0.1,latency=5ms..50ms`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use murmur_workflows::machine::BootSpec;
use murmur_workflows::model::VmId;

use super::{CommandSpec, CommandStatus, Provider, Ready, Seal, SubstrateError, VmInfo};

/// A fault spec that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid fault spec {spec:?}: {reason}")]
pub struct FaultSpecError {
    /// The part that is wrong.
    pub spec: String,
    /// Why.
    pub reason: String,
}

/// What faults to inject, and how often.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultConfig {
    /// Probability that a create fails before creating anything.
    pub create_fail: f64,
    /// Probability that a create creates the VM and then reports a permanent failure.
    pub leak: f64,
    /// Probability that a delete fails before deleting anything.
    pub delete_fail: f64,
    /// Probability that a delete reports success without deleting.
    pub ghost: f64,
    /// Probability that a create or delete hangs for [`FaultConfig::hang_for`].
    pub hang: f64,
    /// Length of a hang.
    pub hang_for: Duration,
    /// Extra latency of every create and delete, drawn uniformly from this range.
    pub latency: (Duration, Duration),
    /// How many VMs (the first distinct ones asked to be deleted) can never be deleted.
    pub stuck_deletes: usize,
    /// Seed of the dice.
    pub seed: u64,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            create_fail: 0.0,
            leak: 0.0,
            delete_fail: 0.0,
            ghost: 0.0,
            hang: 0.0,
            hang_for: Duration::from_secs(120),
            latency: (Duration::ZERO, Duration::ZERO),
            stuck_deletes: 0,
            seed: 0,
        }
    }
}

impl std::str::FromStr for FaultConfig {
    type Err = FaultSpecError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut config = FaultConfig {
            seed: clock_seed(),
            ..FaultConfig::default()
        };
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = |reason: &str| FaultSpecError {
                spec: part.to_string(),
                reason: reason.to_string(),
            };
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad("expected key=value"))?;
            match key.trim() {
                "create_fail" => config.create_fail = probability(value).map_err(|r| bad(&r))?,
                "leak" => config.leak = probability(value).map_err(|r| bad(&r))?,
                "delete_fail" => config.delete_fail = probability(value).map_err(|r| bad(&r))?,
                "ghost" => config.ghost = probability(value).map_err(|r| bad(&r))?,
                "hang" => config.hang = probability(value).map_err(|r| bad(&r))?,
                "hang_for" => config.hang_for = duration(value).map_err(|r| bad(&r))?,
                "latency" => {
                    let (a, b) = value
                        .split_once("..")
                        .ok_or_else(|| bad("expected latency=MIN..MAX, e.g. 5ms..50ms"))?;
                    let (a, b) = (
                        duration(a).map_err(|r| bad(&r))?,
                        duration(b).map_err(|r| bad(&r))?,
                    );
                    if a > b {
                        return Err(bad("the minimum latency is above the maximum"));
                    }
                    config.latency = (a, b);
                }
                "stuck_deletes" => {
                    config.stuck_deletes = value
                        .trim()
                        .parse()
                        .map_err(|_| bad("expected a whole number"))?
                }
                "seed" => {
                    config.seed = value
                        .trim()
                        .parse()
                        .map_err(|_| bad("expected a whole number"))?
                }
                _ => {
                    return Err(bad(
                        "unknown key (expected create_fail, leak, delete_fail, ghost, hang, \
                         hang_for, latency, stuck_deletes or seed)",
                    ));
                }
            }
        }
        Ok(config)
    }
}

fn probability(value: &str) -> Result<f64, String> {
    match value.trim().parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err("expected a probability between 0 and 1".into()),
    }
}

fn duration(value: &str) -> Result<Duration, String> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, unit) = v.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("expected a duration like 50ms, 2s or 1m, got {v:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!(
            "expected a duration like 50ms, 2s or 1m, got {v:?}"
        )),
    }
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

/// SplitMix64: small, fast, seedable dice (not for anything but fault injection).
#[derive(Debug)]
struct Dice(u64);

impl Dice {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// How many faults of each kind were injected.
#[derive(Debug, Default)]
pub struct FaultCounts {
    /// Creates failed before creating.
    pub create_fail: AtomicU64,
    /// VMs created, then reported failed.
    pub leak: AtomicU64,
    /// Deletes failed before deleting.
    pub delete_fail: AtomicU64,
    /// Deletes reported done without deleting.
    pub ghost: AtomicU64,
    /// Calls that hung.
    pub hang: AtomicU64,
    /// Deletes refused because their VM is one of the undeletable ones.
    pub stuck: AtomicU64,
}

/// A [`Provider`] that injects faults into another one's creates and deletes. Everything
/// else (readiness, listing, commands, sleep and wake) passes straight through.
pub struct FaultyProvider<P: ?Sized> {
    inner: std::sync::Arc<P>,
    config: FaultConfig,
    dice: Mutex<Dice>,
    /// The VMs made undeletable (`stuck_deletes`), as they were first asked to be deleted.
    stuck: Mutex<Vec<VmId>>,
    /// Faults injected so far.
    pub counts: FaultCounts,
}

impl<P: Provider + ?Sized> FaultyProvider<P> {
    /// Wraps `inner`.
    pub fn new(inner: std::sync::Arc<P>, config: FaultConfig) -> Self {
        let dice = Mutex::new(Dice(config.seed));
        Self {
            inner,
            config,
            dice,
            stuck: Mutex::new(Vec::new()),
            counts: FaultCounts::default(),
        }
    }

    fn roll(&self, p: f64) -> bool {
        p > 0.0 && self.dice.lock().is_ok_and(|mut d| d.unit() < p)
    }

    async fn delay(&self, op: &str, vm: &VmId) {
        let (lo, hi) = self.config.latency;
        if hi > Duration::ZERO {
            let span = (hi - lo).as_micros() as f64;
            let extra = self.dice.lock().map_or(0.0, |mut d| d.unit()) * span;
            tokio::time::sleep(lo + Duration::from_micros(extra as u64)).await;
        }
        if self.roll(self.config.hang) {
            self.counts.hang.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(fault = "hang", op, vm = %vm, hang_for = ?self.config.hang_for,
                "injected fault");
            tokio::time::sleep(self.config.hang_for).await;
        }
    }
}

impl<P: ?Sized> FaultyProvider<P> {
    /// True when `vm` is one of the VMs made undeletable: the first `stuck_deletes` distinct
    /// VMs whose delete was asked for.
    fn undeletable(&self, vm: &VmId) -> bool {
        let Ok(mut stuck) = self.stuck.lock() else {
            return false;
        };
        if stuck.contains(vm) {
            return true;
        }
        if stuck.len() < self.config.stuck_deletes {
            stuck.push(vm.clone());
            return true;
        }
        false
    }
}

fn injected(what: &str) -> SubstrateError {
    SubstrateError::io(
        format!("injected fault: {what}"),
        std::io::Error::other("fault injection"),
    )
}

#[async_trait]
impl<P: Provider + ?Sized> Provider for FaultyProvider<P> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn create(&self, spec: &BootSpec) -> Result<(), SubstrateError> {
        self.delay("create", &spec.vm).await;
        if self.roll(self.config.create_fail) {
            self.counts.create_fail.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(fault = "create_fail", vm = %spec.vm, "injected fault");
            return Err(injected("create failed"));
        }
        self.inner.create(spec).await?;
        if self.roll(self.config.leak) {
            self.counts.leak.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(fault = "leak", vm = %spec.vm, "injected fault");
            return Err(SubstrateError::BootFailed {
                vm: spec.vm.clone(),
                reason: "injected fault: created, then reported failed".into(),
            });
        }
        Ok(())
    }

    async fn wait_ready(
        &self,
        tenant: &str,
        vm: &VmId,
        timeout: Duration,
    ) -> Result<Ready, SubstrateError> {
        self.inner.wait_ready(tenant, vm, timeout).await
    }

    async fn delete(&self, tenant: &str, vm: &VmId) -> Result<(), SubstrateError> {
        if self.undeletable(vm) {
            self.counts.stuck.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(fault = "stuck_delete", vm = %vm, "injected fault");
            return Err(injected("this VM cannot be deleted"));
        }
        self.delay("delete", vm).await;
        if self.roll(self.config.delete_fail) {
            self.counts.delete_fail.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(fault = "delete_fail", vm = %vm, "injected fault");
            return Err(injected("delete failed"));
        }
        if self.roll(self.config.ghost) {
            self.counts.ghost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(fault = "ghost", vm = %vm, "injected fault");
            return Ok(());
        }
        self.inner.delete(tenant, vm).await
    }

    async fn list(&self, tenant: &str) -> Result<Vec<VmInfo>, SubstrateError> {
        self.inner.list(tenant).await
    }

    fn claim_owner(&self, tenant: &str, vm: &VmId, owner: &str) -> Result<(), SubstrateError> {
        self.inner.claim_owner(tenant, vm, owner)
    }

    fn seal_for_delete(
        &self,
        tenant: &str,
        vm: &VmId,
        expected: Option<&str>,
    ) -> Result<Seal, SubstrateError> {
        self.inner.seal_for_delete(tenant, vm, expected)
    }

    fn accelerator(&self) -> Option<String> {
        self.inner.accelerator()
    }

    fn has_image(&self, image: &str) -> bool {
        self.inner.has_image(image)
    }

    fn host_vms(&self) -> Vec<(String, VmId)> {
        self.inner.host_vms()
    }

    async fn snapshot(
        &self,
        tenant: &str,
        vm: &VmId,
        base: &str,
        image: &str,
    ) -> Result<(), SubstrateError> {
        self.inner.snapshot(tenant, vm, base, image).await
    }

    async fn start_command(
        &self,
        tenant: &str,
        vm: &VmId,
        spec: &CommandSpec,
    ) -> Result<(), SubstrateError> {
        self.inner.start_command(tenant, vm, spec).await
    }

    async fn command_status(
        &self,
        tenant: &str,
        vm: &VmId,
        run: &str,
    ) -> Result<CommandStatus, SubstrateError> {
        self.inner.command_status(tenant, vm, run).await
    }

    async fn command_output_tail(
        &self,
        tenant: &str,
        vm: &VmId,
        run: &str,
        max_bytes: usize,
    ) -> Result<String, SubstrateError> {
        self.inner
            .command_output_tail(tenant, vm, run, max_bytes)
            .await
    }

    async fn cancel_command(
        &self,
        tenant: &str,
        vm: &VmId,
        run: &str,
    ) -> Result<(), SubstrateError> {
        self.inner.cancel_command(tenant, vm, run).await
    }

    async fn read_output(
        &self,
        tenant: &str,
        vm: &VmId,
        run: &str,
        offset: u64,
        max: usize,
    ) -> Result<super::session::OutputChunk, SubstrateError> {
        self.inner.read_output(tenant, vm, run, offset, max).await
    }

    fn forget_kept_output(&self, tenant: &str) {
        self.inner.forget_kept_output(tenant)
    }

    async fn exec(
        &self,
        tenant: &str,
        vm: &VmId,
        spec: &super::session::ExecSpec,
    ) -> Result<super::session::ExecSession, SubstrateError> {
        self.inner.exec(tenant, vm, spec).await
    }

    async fn sleep(&self, tenant: &str, vm: &VmId) -> Result<(), SubstrateError> {
        self.inner.sleep(tenant, vm).await
    }

    async fn wake(&self, tenant: &str, vm: &VmId) -> Result<(), SubstrateError> {
        self.inner.wake(tenant, vm).await
    }

    fn is_asleep(&self, tenant: &str, vm: &VmId) -> bool {
        self.inner.is_asleep(tenant, vm)
    }

    fn sleep_frees_memory(&self) -> bool {
        self.inner.sleep_frees_memory()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_sets_every_knob() {
        let c: FaultConfig =
            "create_fail=0.2, leak=0.1,delete_fail=0.3,ghost=0.05,hang=0.01,hang_for=90s,latency=5ms..50ms,seed=7"
                .parse()
                .unwrap();
        assert_eq!(c.create_fail, 0.2);
        assert_eq!(c.leak, 0.1);
        assert_eq!(c.delete_fail, 0.3);
        assert_eq!(c.ghost, 0.05);
        assert_eq!(c.hang, 0.01);
        assert_eq!(c.hang_for, Duration::from_secs(90));
        assert_eq!(
            c.latency,
            (Duration::from_millis(5), Duration::from_millis(50))
        );
        assert_eq!(c.seed, 7);
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (spec, fragment) in [
            ("create_fail=2", "probability"),
            ("create_fail", "key=value"),
            ("explode=0.1", "unknown key"),
            ("latency=50ms..5ms", "above the maximum"),
            ("latency=5ms", "MIN..MAX"),
            ("hang_for=soon", "duration"),
            ("seed=-1", "whole number"),
        ] {
            let err = spec.parse::<FaultConfig>().unwrap_err();
            assert!(
                err.to_string().contains(fragment),
                "{spec}: {err} lacks {fragment}"
            );
        }
    }

    #[test]
    fn the_dice_follow_the_probability() {
        let mut d = Dice(42);
        let hits = (0..100_000).filter(|_| d.unit() < 0.2).count();
        assert!((19_000..21_000).contains(&hits), "{hits} of 100000");
    }
}
