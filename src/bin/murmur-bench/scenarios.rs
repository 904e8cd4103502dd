//! The scenarios. Each makes its own tenant, measures, and cleans up what it started.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use murmur::agents::AgentClient;
use murmur::client::PoolClient;
use murmur_activities::auth::KeyStore;
use murmur_activities::claim_batch::ClaimBatcher;
use murmur_activities::substrate::Provider;
use murmur_activities::substrate::process::{ProcessProvider, SupervisorLaunch};
use murmur_activities::temporal_ops::update_pool;
use murmur_workflows::agent::{OnIdle, Phase};
use murmur_workflows::auth::{ops, unsigned_body};
use murmur_workflows::machine::{BootSpec, ClaimRequest, ClaimState, ConfigChange};
use murmur_workflows::messages::ReleaseRequest;
use murmur_workflows::model::{Environment, VmId, VmState};
use murmur_workflows::pool_workflow::{PoolWorkflow, pool_workflow_id};
use temporalio_client::{UntypedWorkflow, WorkflowListOptions, WorkflowTerminateOptions};

use crate::{Bench, Figure};

/// Every scenario, in the order `all` runs them, with what it measures.
pub const SCENARIOS: &[(&str, &str)] = &[
    ("spawn", "spawn → PHASE_RUNNING, warm pool vs cold boot"),
    (
        "spawn-streaming",
        "spawn-warm while another agent streams 50 MB to a `murmur logs -f` follower",
    ),
    (
        "flush-10",
        "flush of 10 warm VMs: CLI answer and back at min_idle",
    ),
    ("flush-100", "flush of 100 warm VMs (at most 5 runs)"),
    (
        "delete",
        "deleting 10 sandboxes one at a time vs in parallel",
    ),
    (
        "claim-throughput",
        "400 claims from 50 concurrent clients on one pool: hand-out only, then with backfill",
    ),
    (
        "cli-latency",
        "murmur pool status vs temporal workflow query",
    ),
    (
        "nuke",
        "nuke of 100 keep-alive agents + 50 warm VMs (1 run)",
    ),
    ("footprint", "worker RSS and CPU with 1,000 agent workflows"),
    (
        "sleep-wake",
        "murmur sleep → VM stopped and murmur wake → VM started of a running agent",
    ),
    (
        "qemu-sleep-wake",
        "murmur sleep and wake of a running agent on a qemu guest (run it alone; not part of \
         all)",
    ),
    (
        "qemu-snapshot",
        "qemu guest: fresh boot → ready vs restore from the image's snapshot → ready (run it \
         alone; not part of all)",
    ),
    (
        "qemu-spawn",
        "spawn → PHASE_RUNNING on the qemu substrate, warm guest vs cold boot (run it alone; \
         not part of all)",
    ),
];

/// Scenarios that `all` leaves out (they run for minutes), run only when named.
pub const ON_REQUEST: &[(&str, &str)] = &[(
    "soak",
    "thousands of claims, hundreds of flushes: history, continue-as-new, RSS, invariants",
)];
/// Scenarios that need the qemu substrate (the bench's worker then runs qemu).
pub const QEMU_SCENARIOS: &[&str] = &["qemu-spawn", "qemu-sleep-wake", "qemu-snapshot"];

/// Runs one scenario.
pub async fn run(name: &str, b: &Bench) -> anyhow::Result<Vec<Figure>> {
    match name {
        "spawn" => spawn(b).await,
        "spawn-streaming" => spawn_streaming(b).await,
        "flush-10" => flush(b, 10, b.runs).await,
        "flush-100" => flush(b, 100, b.runs.min(5)).await,
        "delete" => delete(b).await,
        "claim-throughput" => claims(b).await,
        "cli-latency" => cli_latency(b).await,
        "nuke" => nuke(b).await,
        "footprint" => footprint(b).await,
        "soak" => soak(b).await,
        "qemu-spawn" => spawn_qemu(b).await,
        "sleep-wake" | "qemu-sleep-wake" => sleep_wake(b).await,
        "qemu-snapshot" => snapshot_boot(b).await,
        other => anyhow::bail!("unknown scenario {other}"),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

fn figure(
    name: &str,
    samples: Vec<f64>,
    unit: &'static str,
    goal: &str,
    met: Option<bool>,
) -> Figure {
    Figure {
        name: name.to_string(),
        samples,
        unit,
        goal: goal.to_string(),
        met,
    }
}

async fn set_pool(pool: &PoolClient, max_vms: u32, min_idle: u32) -> anyhow::Result<()> {
    let patch = |k: &str, v: u32| ConfigChange::Patch {
        set: vec![(k.to_string(), v.to_string())],
    };
    pool.apply_config("pool-config", "default", patch("max_vms", max_vms))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let spec = serde_json::json!({ "min_idle": min_idle });
    pool.apply_config(
        "workspace",
        "default",
        ConfigChange::Set {
            spec,
            expected_generation: None,
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn settled_with(ready: u32) -> impl Fn(&murmur_workflows::status::PoolStatus) -> bool {
    move |s| {
        s.workspaces.first().is_some_and(|w| w.ready == ready)
            && s.vms
                .iter()
                .all(|v| matches!(v.state, VmState::Warm | VmState::Assigned))
    }
}

/// Leaves the bench host as the scenario found it: no VM and no running workflow of the
/// tenant, so the next scenario is measured on a clean host (earlier scenarios once filled the
/// host's admission limit with VMs whose pool had only been terminated). `min_idle` goes to 0
/// first (a nuke keeps the config and the pool would refill), the nuke terminates every agent
/// and deletes every VM the substrate holds for the tenant, then the idle pool's run is
/// terminated. A VM of the tenant still on the host afterwards is an error.
async fn cleanup(b: &Bench, pool: &PoolClient, tenant: &str) -> anyhow::Result<()> {
    pool.apply_config(
        "workspace",
        "default",
        ConfigChange::Set {
            spec: serde_json::json!({ "min_idle": 0 }),
            expected_generation: None,
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("cleanup of {tenant}: min_idle 0: {e}"))?;
    pool.nuke(|_| {})
        .await
        .map_err(|e| anyhow::anyhow!("cleanup of {tenant}: nuke: {e}"))?;
    let client = murmur::client::connect("murmur-bench")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let query = format!("MurmurTenant = '{tenant}' AND ExecutionStatus = 'Running'");
    let mut ids = Vec::new();
    let mut stream = client.list_workflows(query, WorkflowListOptions::default());
    while let Some(item) = stream.next().await {
        ids.push(item.map_err(|e| anyhow::anyhow!("{e}"))?.id().to_string());
    }
    for id in ids {
        let _ = client
            .get_workflow_handle::<UntypedWorkflow>(id)
            .terminate(
                WorkflowTerminateOptions::builder()
                    .reason("bench scenario done")
                    .build(),
            )
            .await;
    }
    let left = b.vms_of(tenant);
    anyhow::ensure!(
        left == 0,
        "cleanup of {tenant}: {left} VMs are still on the bench host after the nuke"
    );
    Ok(())
}

/// `murmur spawn` → the agent's command runs, with a warm VM and with a cold boot.
async fn spawn(b: &Bench) -> anyhow::Result<Vec<Figure>> {
    let (ctx, pool, agents) = b.tenant("bench-spawn").await?;
    let mut out = Vec::new();
    let mut medians = Vec::new();
    for (label, min_idle) in [("spawn-warm (process)", 5), ("spawn-cold (process)", 0)] {
        set_pool(&pool, 30, min_idle).await?;
        let ready = settled_with(min_idle);
        let prefix = format!("s{min_idle}");
        let patience = Duration::from_secs(60);
        let samples = sample_spawns(b, &pool, &agents, b.runs, &prefix, patience, ready).await?;
        medians.push(median(&samples));
        out.push(figure(label, samples, "ms", "", None));
    }
    let (warm, cold) = (medians[0], medians[1]);
    out[0].goal = "≤ 100 ms".into();
    out[0].met = Some(warm <= 100.0);
    out[1].goal = format!("(warm is {:.0}% of cold)", 100.0 * warm / cold.max(0.001));
    cleanup(b, &pool, &ctx.tenant).await?;
    Ok(out)
}

/// Bytes the streaming agent writes: 2,000 bursts of 25,000 bytes (lines of 50), 10 ms apart.
const STREAMED_BYTES: u64 = 2_000 * 25_000;

/// spawn-warm (as in `spawn`) while a keep-alive agent writes [`STREAMED_BYTES`] of output as
/// fast as a shell loop goes and a follower reads it through the host gateway, as `murmur
/// logs -f` does: the data path must not slow the pool. Also the follower's throughput.
async fn spawn_streaming(b: &Bench) -> anyhow::Result<Vec<Figure>> {
    let (ctx, pool, agents) = b.tenant("bench-stream").await?;
    set_pool(&pool, 30, 5).await?;
    let client = murmur::client::connect("murmur-bench")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let writer = "line=0123456789012345678901234567890123456789012345678; i=0; \
                  while [ $i -lt 2000 ]; do yes $line | head -c 25000; i=$((i+1)); sleep 0.01; \
                  done; sleep 600";
    agents
        .spawn("streamer", vec![writer.into()], OnIdle::KeepAlive)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let t0 = Instant::now();
    let located = loop {
        match murmur::gateway::client::locate(&agents, &client, "streamer").await {
            Ok(at) => break at,
            Err(e) if t0.elapsed() > Duration::from_secs(60) => anyhow::bail!("streamer: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    // The follower: reads until the writer's bytes are all there (the command goes on
    // sleeping, so `follow` alone would not end).
    let follower = {
        let (ctx, at) = (ctx.clone(), located.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let mut got = 0u64;
            let mut all_read_at = Instant::now();
            let options = murmur::gateway::client::LogsOptions {
                tail_lines: 0,
                follow: true,
            };
            let read = murmur::gateway::client::logs(&ctx, &at, options, |bytes| {
                got += bytes.len() as u64;
                if got >= STREAMED_BYTES {
                    all_read_at = Instant::now();
                    return Err(std::io::Error::other("all read"));
                }
                Ok(())
            })
            .await;
            (read.err(), got, all_read_at.duration_since(started))
        })
    };
    let samples = sample_spawns(
        b,
        &pool,
        &agents,
        b.runs,
        "st",
        Duration::from_secs(60),
        settled_with(5),
    )
    .await?;
    let (_, got, took) = follower.await?;
    anyhow::ensure!(
        got >= STREAMED_BYTES,
        "the follower read {got} of {STREAMED_BYTES} bytes"
    );
    let mb_per_s = STREAMED_BYTES as f64 / 1e6 / took.as_secs_f64().max(0.001);
    let warm = median(&samples);
    let mut out = vec![figure(
        "spawn-warm while another agent streams (process)",
        samples,
        "ms",
        "≤ 100 ms (as without the stream)",
        Some(warm <= 100.0),
    )];
    out.push(figure(
        "streamed through the gateway (50 MB, written in 10 ms bursts)",
        vec![mb_per_s],
        "MB/s",
        "",
        None,
    ));
    agents
        .kill("streamer")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    cleanup(b, &pool, &ctx.tenant).await?;
    Ok(out)
}

/// Spawns `b.warmup + runs` agents (`<prefix>-<i>`) one after another, each once the pool
/// is `ready` (waiting up to `patience`), and kills each once it runs: the spawn → running
/// latency of the runs after the warm-up, in ms.
async fn sample_spawns(
    b: &Bench,
    pool: &PoolClient,
    agents: &AgentClient,
    runs: usize,
    prefix: &str,
    patience: Duration,
    ready: impl Fn(&murmur_workflows::status::PoolStatus) -> bool,
) -> anyhow::Result<Vec<f64>> {
    let mut samples = Vec::new();
    for i in 0..b.warmup + runs {
        Bench::wait_pool(pool, patience, &ready).await?;
        let slug = format!("{prefix}-{i}");
        let dt = ms(spawn_until_running(agents, &slug).await?);
        if i >= b.warmup {
            samples.push(dt);
        }
        agents
            .kill(&slug)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(samples)
}

/// Spawns `slug` (`sleep 300`) and polls every 2 ms until it runs: how long that took.
async fn spawn_until_running(agents: &AgentClient, slug: &str) -> anyhow::Result<Duration> {
    spawn_until_running_with(agents, slug, "sleep 300").await
}

/// Spawns `slug` running `command` and polls every 2 ms until it runs: how long that took.
async fn spawn_until_running_with(
    agents: &AgentClient,
    slug: &str,
    command: &str,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    agents
        .spawn(slug, vec![command.into()], OnIdle::Terminate)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    loop {
        let st = agents
            .status(slug)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if st.phase == Some(Phase::Running) {
            return Ok(t0.elapsed());
        }
        anyhow::ensure!(
            !st.phase.is_some_and(Phase::is_terminal),
            "agent {slug} ended: {st:?}"
        );
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(120),
            "agent {slug} not running after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `murmur sleep` until it answers `VM stopped`, and `murmur wake` until `VM started`, of
/// one running agent (a counter), on the bench worker's substrate. At least 10 of each.
async fn sleep_wake(b: &Bench) -> anyhow::Result<Vec<Figure>> {
    let (ctx, pool, agents) = b.tenant(&format!("bench-sleep-{}", b.substrate)).await?;
    set_pool(&pool, 4, 1).await?;
    Bench::wait_pool(&pool, Duration::from_secs(300), settled_with(1)).await?;
    let counter = "i=0; while true; do i=$((i+1)); echo $i; sleep 1; done";
    spawn_until_running_with(&agents, "sleeper", counter).await?;
    let (mut slept, mut woke) = (Vec::new(), Vec::new());
    for i in 0..b.warmup + b.runs.max(10) {
        let t0 = Instant::now();
        let st = agents
            .sleep("sleeper")
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let t_sleep = t0.elapsed();
        anyhow::ensure!(
            st.asleep && st.phase == Some(Phase::Sleeping),
            "not asleep: {st:?}"
        );
        let t0 = Instant::now();
        let st = agents
            .wake("sleeper")
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let t_wake = t0.elapsed();
        anyhow::ensure!(
            !st.asleep && st.phase == Some(Phase::Running),
            "not awake: {st:?}"
        );
        if i >= b.warmup {
            slept.push(ms(t_sleep));
            woke.push(ms(t_wake));
        }
    }
    agents
        .kill("sleeper")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    cleanup(b, &pool, &ctx.tenant).await?;
    let sub = b.substrate;
    let wake_goal = (sub == "qemu").then(|| median(&woke) <= 1000.0);
    Ok(vec![
        figure(
            &format!("murmur sleep → VM stopped ({sub})"),
            slept,
            "ms",
            "",
            None,
        ),
        figure(
            &format!("murmur wake → VM started ({sub})"),
            woke,
            "ms",
            if sub == "qemu" {
                "≤ 1000 ms (TCG)"
            } else {
                ""
            },
            wake_goal,
        ),
    ])
}

/// A qemu guest (192 MB, the substrate's own calls, no Temporal): `create` → ready handshake
/// booting afresh (snapshot boot off), and restored from the image's snapshot (the first
/// boot of the restoring provider saves it and is not counted). At least 10 of each.
async fn snapshot_boot(b: &Bench) -> anyhow::Result<Vec<Figure>> {
    use murmur_activities::substrate::qemu::QemuProvider;
    anyhow::ensure!(
        b.substrate == "qemu",
        "qemu-snapshot needs the qemu substrate: run it alone (murmur-bench qemu-snapshot)"
    );
    let restoring = QemuProvider::new(&b.state_dir)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_niceness(0);
    anyhow::ensure!(
        restoring.snapshot_boot(),
        "snapshot boot is off (MURMUR_QEMU_SNAPSHOT_BOOT=0?)"
    );
    let fresh = restoring.clone().without_snapshot_boot();
    let tenant = "bench-snapshot";
    let runs = b.runs.max(10);
    let mut out = Vec::new();
    let mut medians = Vec::new();
    for (label, provider) in [
        ("qemu: fresh boot → ready (192 MB, TCG)", &fresh),
        ("qemu: snapshot restore → ready (192 MB, TCG)", &restoring),
    ] {
        let mut samples = Vec::new();
        for i in 0..b.warmup.max(1) + runs {
            let spec = BootSpec {
                vm: VmId::from_bits(0x0c00_0000 + (medians.len() * 1000 + i) as u32),
                tenant: tenant.into(),
                workspace: "default".into(),
                image: "default".into(),
                environment: Environment {
                    vcpus: 1,
                    memory_mb: 192,
                },
                host: None,
                generation: 1,
            };
            let t0 = Instant::now();
            provider.create(&spec).await?;
            provider
                .wait_ready(tenant, &spec.vm, Duration::from_secs(120))
                .await?;
            let took = t0.elapsed();
            provider.delete(tenant, &spec.vm).await?;
            if i >= b.warmup.max(1) {
                samples.push(ms(took));
            }
        }
        medians.push(median(&samples));
        out.push(figure(label, samples, "ms", "", None));
    }
    let share = 100.0 * medians[1] / medians[0].max(0.001);
    out[1].goal = format!("≤ 20% of a fresh boot ({share:.0}%)");
    out[1].met = Some(share <= 20.0);
    Ok(out)
}

/// `murmur spawn` → `PHASE_RUNNING` on real qemu guests: with 2 warm guests, with none
/// (every spawn cold-boots a guest), and with 2 warm guests at `max_vms` (no backfill boot
/// competes with the spawn). At least 10 measured runs each.
async fn spawn_qemu(b: &Bench) -> anyhow::Result<Vec<Figure>> {
    anyhow::ensure!(
        b.substrate == "qemu",
        "qemu-spawn needs the bench worker on the qemu substrate: run it alone (murmur-bench qemu-spawn)"
    );
    let (ctx, pool, agents) = b.tenant("bench-qemu").await?;
    let runs = b.runs.max(10);
    let mut out = Vec::new();
    let mut medians = Vec::new();
    // The second warm figure runs at max_vms = min_idle: the claim cannot start a backfill
    // boot, so it shows what a guest booting next to the spawn costs it.
    // The worker reads MURMUR_QEMU_SNAPSHOT_BOOT: the cold figure says which cold path ran.
    let snapshot_boot =
        std::env::var("MURMUR_QEMU_SNAPSHOT_BOOT").map_or(true, |v| v.trim() != "0");
    let cold_label = if snapshot_boot {
        "spawn-cold (qemu, snapshot boot)"
    } else {
        "spawn-cold (qemu, fresh boot: MURMUR_QEMU_SNAPSHOT_BOOT=0)"
    };
    for (label, min_idle, max_vms) in [
        ("spawn-warm (qemu)", 2, 6),
        (cold_label, 0, 6),
        ("spawn-warm (qemu, at max_vms: no backfill boot)", 2, 2),
    ] {
        set_pool(&pool, max_vms, min_idle).await?;
        let settled = settled_with(min_idle);
        let ready = |s: &murmur_workflows::status::PoolStatus| {
            settled(s) && s.vms.len() == min_idle as usize
        };
        let prefix = format!("q{min_idle}-{max_vms}");
        let patience = Duration::from_secs(120);
        let samples = sample_spawns(b, &pool, &agents, runs, &prefix, patience, ready).await?;
        medians.push(median(&samples));
        out.push(figure(label, samples, "ms", "", None));
    }
    let cold = medians[1];
    for (i, warm) in [(0, medians[0]), (2, medians[2])] {
        let share = 100.0 * warm / cold.max(0.001);
        out[i].goal = format!("≤ 5% of cold ({share:.1}%)");
        out[i].met = Some(share <= 5.0);
    }
    set_pool(&pool, 6, 0).await?;
    cleanup(b, &pool, &ctx.tenant).await?;
    Ok(out)
}

/// Flush of `n` warm VMs: until the CLI has its answer, and until the pool is back at min_idle.
async fn flush(b: &Bench, n: u32, runs: usize) -> anyhow::Result<Vec<Figure>> {
    let (ctx, pool, _agents) = b.tenant(&format!("bench-flush{n}")).await?;
    set_pool(&pool, n + 10, n).await?;
    let (mut answer, mut refill) = (Vec::new(), Vec::new());
    for i in 0..b.warmup.min(1) + runs {
        Bench::wait_pool(&pool, Duration::from_secs(300), settled_with(n)).await?;
        let t0 = Instant::now();
        let reply = pool.flush().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let t_answer = t0.elapsed();
        anyhow::ensure!(reply.flushed == n, "flushed {} of {n}", reply.flushed);
        Bench::wait_pool(&pool, Duration::from_secs(300), settled_with(n)).await?;
        if i >= b.warmup.min(1) {
            answer.push(ms(t_answer));
            refill.push(ms(t0.elapsed()));
        }
    }
    cleanup(b, &pool, &ctx.tenant).await?;
    let goal_answer = if n >= 100 { "≤ 1000 ms" } else { "" };
    let met = (n >= 100).then(|| median(&answer) <= 1000.0);
    Ok(vec![
        figure(
            &format!("flush-{n}: CLI answer"),
            answer,
            "ms",
            goal_answer,
            met,
        ),
        figure(
            &format!("flush-{n}: back at min_idle"),
            refill,
            "ms",
            if n >= 100 { "≤ 2 s + one boot" } else { "" },
            None,
        ),
    ])
}

/// Deleting sandboxes one after the other vs all at once (what the pool does).
async fn delete(b: &Bench) -> anyhow::Result<Vec<Figure>> {
    let dir = b.state_dir.join("delete-bench");
    let provider = ProcessProvider::new(
        &dir,
        SupervisorLaunch {
            program: b.bin_dir.join("murmur-worker"),
            args: vec!["sandbox".into()],
        },
    )?;
    let tenant = "bench-delete";
    let (mut seq, mut par) = (Vec::new(), Vec::new());
    for round in 0..b.runs.min(5) * 2 {
        let vms: Vec<VmId> = (0..10)
            .map(|i| VmId::from_bits((round * 100 + i) as u32 + 0x0b00_0000))
            .collect();
        let boots = vms.iter().map(|vm| {
            let spec = BootSpec {
                vm: vm.clone(),
                tenant: tenant.into(),
                workspace: "default".into(),
                image: "default".into(),
                environment: Environment::default(),
                host: None,
                generation: 1,
            };
            let p = &provider;
            async move {
                p.create(&spec).await?;
                p.wait_ready(tenant, &spec.vm, Duration::from_secs(30))
                    .await
            }
        });
        for r in futures::future::join_all(boots).await {
            r?;
        }
        let t0 = Instant::now();
        if round % 2 == 0 {
            for vm in &vms {
                provider.delete(tenant, vm).await?;
            }
            seq.push(ms(t0.elapsed()));
        } else {
            let deletes = vms.iter().map(|vm| provider.delete(tenant, vm));
            for r in futures::future::join_all(deletes).await {
                r?;
            }
            par.push(ms(t0.elapsed()));
        }
    }
    Ok(vec![
        figure("delete-10: one at a time", seq, "ms", "", None),
        figure("delete-10: in parallel", par, "ms", "", None),
    ])
}

/// Claims per second one pool workflow sustains from 50 concurrent clients, and their latency
/// at that rate, in two settings (each on its own tenant, [`CLAIMS`] claims, all served warm):
///
/// - **hand-out only**: `max_vms` is the warm VMs, so nothing boots while the claims take them
///   (a resource pool's job, as in Temporal's resource-pool sample);
/// - **with backfill**: `max_vms` leaves room for as many again, so every claim also makes the
///   pool boot a replacement while the claims go on (what a warm pool does in production).
///
/// The claims go the way every agent's claim goes: through a worker's batcher.
async fn claims(b: &Bench) -> anyhow::Result<Vec<Figure>> {
    let total = std::env::var("MURMUR_BENCH_CLAIMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CLAIMS);
    let mut out = Vec::new();
    for (label, room) in [("hand-out only", 0), ("with backfill", total)] {
        let (ctx, pool, _agents) = b.tenant("bench-claims").await?;
        let max_vms = total + room;
        set_pool(&pool, max_vms as u32, total as u32).await?;
        Bench::wait_pool(&pool, Duration::from_secs(600), settled_with(total as u32)).await?;
        // `max_vms` must hold on the substrate while the claims go on, not only after.
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = tokio::task::spawn_blocking({
            let (sampling, count) = (sampling.clone(), b.vm_counter(&ctx.tenant));
            move || {
                let mut peak = 0;
                while sampling.load(Ordering::Relaxed) {
                    peak = peak.max(count());
                    std::thread::sleep(Duration::from_millis(10));
                }
                peak
            }
        });
        let burst = claim_burst(b, &ctx, total, CLAIM_CLIENTS).await;
        sampling.store(false, Ordering::Relaxed);
        let peak = sampler.await?;
        let (rate, latencies) = burst?;
        anyhow::ensure!(
            peak <= max_vms,
            "claim-throughput ({label}): {peak} VMs on the substrate at once, max_vms is {max_vms}"
        );
        eprintln!("claim-throughput ({label}): at most {peak} VMs at once (max_vms {max_vms})");
        cleanup(b, &pool, &ctx.tenant).await?;
        out.push(figure(
            &format!("claim-throughput ({label}): claims/s ({CLAIM_CLIENTS} clients)"),
            vec![rate],
            "/s",
            "≥ 300/s",
            Some(rate >= 300.0),
        ));
        let mut latency = figure(
            &format!("claim-throughput ({label}): claim latency"),
            latencies,
            "ms",
            "p95 ≤ 250 ms",
            None,
        );
        latency.met = Some(latency.stats().1 <= 250.0);
        out.push(latency);
    }
    Ok(out)
}

/// Claims of one burst (see [`claims`]); at most the host's 500 VMs.
const CLAIMS: usize = 400;
/// Concurrent clients of a burst.
const CLAIM_CLIENTS: usize = 50;

/// `total` claims from `clients` concurrent clients, each claiming in turn, all through one
/// batcher; every claim must find a warm VM, and no VM may be given twice. Returns claims per
/// second and each latency (ms).
async fn claim_burst(
    b: &Bench,
    ctx: &murmur::config::Context,
    total: usize,
    clients: usize,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let batcher = ClaimBatcher::new(KeyStore::open(&b.state_dir)?);
    let client = murmur::client::connect("murmur-bench")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let t0 = Instant::now();
    let tasks = (0..clients).map(|c| {
        let (client, batcher, ctx) = (client.clone(), batcher.clone(), ctx.clone());
        let tq = b.task_queue.clone();
        async move {
            let (mut lat, mut vms) = (Vec::new(), Vec::new());
            for i in (c..total).step_by(clients) {
                let req = ClaimRequest {
                    request: format!("bench-{i}@run"),
                    agent: format!("bench-agent-{i}"),
                    developer: format!("dev{c}"),
                    workspace: "default".into(),
                    wait: false,
                    spawn_request_id: format!("bench-spawn-{i}"),
                    spawn_signed_at: murmur_activities::auth::now_ms(),
                    taken_by: None,
                    auth: None,
                };
                let t = Instant::now();
                let state = batcher
                    .claim(&client, &ctx.tenant, &tq, req)
                    .await
                    .map_err(|e| anyhow::anyhow!("claim {i}: {e}"))?;
                let ClaimState::Assigned { vm, .. } = state else {
                    anyhow::bail!("claim {i} found no warm VM: {state:?}");
                };
                lat.push(ms(t.elapsed()));
                vms.push((vm, i));
            }
            anyhow::Ok((lat, vms))
        }
    });
    let mut latencies = Vec::new();
    let mut owners = std::collections::HashMap::new();
    for r in futures::future::join_all(tasks).await {
        let (lat, vms) = r?;
        latencies.extend(lat);
        for (vm, claim) in vms {
            if let Some(other) = owners.insert(vm.clone(), claim) {
                anyhow::bail!("claims {other} and {claim} were both given VM {vm}");
            }
        }
    }
    Ok((total as f64 / t0.elapsed().as_secs_f64(), latencies))
}

/// `murmur pool status` end to end vs `temporal workflow query` of the same query.
async fn cli_latency(b: &Bench) -> anyhow::Result<Vec<Figure>> {
    let (ctx, pool, _agents) = b.tenant("bench-cli").await?;
    set_pool(&pool, 10, 2).await?;
    Bench::wait_pool(&pool, Duration::from_secs(60), settled_with(2)).await?;
    let project = b.state_dir.join("cli-project");
    std::fs::create_dir_all(project.join(".murmur"))?;
    std::fs::write(
        project.join(".murmur/murmur.yaml"),
        format!("tenant: {}\nworkspace: default\n", ctx.tenant),
    )?;
    let wf = pool_workflow_id(&ctx.tenant);
    let temporal = b.root.join(".venv/bin/temporal");
    let time = |cmd: &mut Command| -> anyhow::Result<f64> {
        let t0 = Instant::now();
        let out = cmd.output()?;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(ms(t0.elapsed()))
    };
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..b.warmup + b.runs {
        let a = time(
            Command::new(b.bin_dir.join("murmur"))
                .args(["pool", "status", "--json"])
                .current_dir(&project),
        )?;
        let t = time(Command::new(&temporal).args([
            "workflow",
            "query",
            "--workflow-id",
            &wf,
            "--name",
            "status",
            "-o",
            "json",
        ]))?;
        if i >= b.warmup {
            ours.push(a);
            theirs.push(t);
        }
    }
    let ratio = median(&ours) / median(&theirs).max(0.001);
    cleanup(b, &pool, &ctx.tenant).await?;
    Ok(vec![
        figure(
            "cli-latency: murmur pool status",
            ours,
            "ms",
            &format!("≤ 1.0× temporal ({ratio:.2}×)"),
            Some(ratio <= 1.0),
        ),
        figure(
            "cli-latency: temporal workflow query",
            theirs,
            "ms",
            "",
            None,
        ),
    ])
}

/// Spawns `n` agents, `batch` at a time.
async fn spawn_many(
    agents: &AgentClient,
    prefix: &str,
    n: usize,
    command: &str,
    on_idle: OnIdle,
) -> anyhow::Result<()> {
    let slugs: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let mut stream = futures::stream::iter(
        slugs
            .iter()
            .map(|slug| agents.spawn(slug, vec![command.to_string()], on_idle)),
    )
    .buffer_unordered(16);
    while let Some(r) = stream.next().await {
        r.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}

/// Nuke of 100 keep-alive agents and 50 warm VMs.
async fn nuke(b: &Bench) -> anyhow::Result<Vec<Figure>> {
    let (ctx, pool, agents) = b.tenant("bench-nuke").await?;
    set_pool(&pool, 160, 50).await?;
    Bench::wait_pool(&pool, Duration::from_secs(300), settled_with(50)).await?;
    spawn_many(&agents, "k", 100, "true", OnIdle::KeepAlive).await?;
    Bench::wait_pool(&pool, Duration::from_secs(300), |s| {
        s.vms
            .iter()
            .filter(|v| v.state == VmState::Assigned)
            .count()
            == 100
            && settled_with(50)(s)
    })
    .await?;
    let t0 = Instant::now();
    let report = pool
        .nuke(|_| {})
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let dt = ms(t0.elapsed());
    cleanup(b, &pool, &ctx.tenant).await?;
    Ok(vec![figure(
        &format!(
            "nuke 100 agents + 50 warm ({} terminated/deleted)",
            report.total()
        ),
        vec![dt],
        "ms",
        "≤ 5000 ms",
        Some(dt <= 5000.0),
    )])
}

/// Worker memory and CPU with 1,000 agent workflows. Lighter mode: 10 agents run on VMs and
/// 990 wait for room at max_vms (their workflows, claims and timers are live; their
/// sandboxes do not exist), because 1,000 sandboxes would measure the sandboxes.
async fn footprint(b: &Bench) -> anyhow::Result<Vec<Figure>> {
    // Lighter mode: 10 agents run on sandboxes, the rest wait for room under max_vms (their
    // workflows and claims are all live; their VMs are not). MURMUR_FOOTPRINT_AGENTS sets the
    // count (default 1,000; the scale goal is 10,000).
    let n: usize = std::env::var("MURMUR_FOOTPRINT_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    let (ctx, pool, agents) = b.tenant("bench-footprint").await?;
    set_pool(&pool, 10, 0).await?;
    let rss_before = rss_mb(b.worker_pid());
    let t0 = Instant::now();
    spawn_many(&agents, "f", n, "sleep 600", OnIdle::Terminate).await?;
    let limit = Duration::from_secs(300 + n as u64 / 10);
    Bench::wait_pool(&pool, limit, |s| s.claims_total as usize == n).await?;
    let spawned_in = t0.elapsed();
    let cpu0 = cpu_ticks(b.worker_pid());
    let t1 = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let cpu = (cpu_ticks(b.worker_pid()) - cpu0) as f64 / 100.0 / t1.elapsed().as_secs_f64();
    let rss = rss_mb(b.worker_pid());
    // The pool still answers with every claim, across however many runs it took.
    let st = Bench::wait_pool(&pool, Duration::from_secs(60), |s| {
        s.claims_total as usize == n
    })
    .await?;
    let client = murmur::client::connect("murmur-bench")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let runs = run_history_lengths(&client, &pool_workflow_id(&ctx.tenant)).await?;
    eprintln!(
        "footprint: {n} agents ({} waiting) spawned and claimed in {:.0} s; pool runs {} \
         (continue-as-new {} times), history lengths {runs:?}; worker RSS {rss_before:.0} → \
         {rss:.0} MB",
        st.claims_waiting,
        spawned_in.as_secs_f64(),
        runs.len(),
        runs.len().saturating_sub(1)
    );
    cleanup(b, &pool, &ctx.tenant).await?;
    let goal_mb = if n >= 10_000 { 300.0 } else { 150.0 };
    let queued = n.saturating_sub(10);
    Ok(vec![
        figure(
            &format!("footprint: worker RSS, {n} agents ({queued} queued)"),
            vec![rss],
            "MB",
            &format!("≤ {goal_mb:.0} MB (idle worker {rss_before:.0} MB)"),
            Some(rss <= goal_mb),
        ),
        figure(
            &format!("footprint: worker CPU, {n} agents ({queued} queued)"),
            vec![cpu * 100.0],
            "%",
            "",
            None,
        ),
        figure(
            &format!("footprint: pool continue-as-new count, {n} agents"),
            vec![runs.len().saturating_sub(1) as f64],
            "",
            "works with every claim carried",
            None,
        ),
    ])
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = after.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// Soak: thousands of claims and releases and hundreds of flushes through one pool (sizes from
/// `MURMUR_SOAK_CLAIMS`, default 2,000, and `MURMUR_SOAK_FLUSHES`, default 200), checking
/// after every round that no VM is held twice and `max_vms` holds, and at the end that the
/// substrate equals the inventory. Reports history length per run, continue-as-new count
/// and worker RSS. Not part of `all` (it runs for minutes).
async fn soak(b: &Bench) -> anyhow::Result<Vec<Figure>> {
    let env_number = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let total_claims = env_number("MURMUR_SOAK_CLAIMS", 2_000);
    let flushes = env_number("MURMUR_SOAK_FLUSHES", 200).max(1);
    let clients = 10usize;
    let (ctx, pool, _agents) = b.tenant("bench-soak").await?;
    set_pool(&pool, 20, 5).await?;
    Bench::wait_pool(&pool, Duration::from_secs(120), settled_with(5)).await?;
    let keys = KeyStore::open(&b.state_dir)?;
    let client = murmur::client::connect("murmur-bench")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let target = pool_workflow_id(&ctx.tenant);
    let rss_start = rss_mb(b.worker_pid());
    let mut violations: Vec<String> = Vec::new();
    let rounds = flushes;
    let per_round = total_claims.div_ceil(rounds);
    let t0 = Instant::now();
    let mut done = 0usize;
    for round in 0..rounds {
        // A round: `per_round` claim→release cycles from `clients` concurrent agents, then
        // one flush.
        let tasks = (0..clients).map(|c| {
            let (client, keys, target, tenant) = (
                client.clone(),
                keys.clone(),
                target.clone(),
                ctx.tenant.clone(),
            );
            let tq = b.task_queue.clone();
            let n = per_round / clients + usize::from(c < per_round % clients);
            async move {
                for i in 0..n {
                    let id = format!("soak-{round}-{c}-{i}");
                    cycle(&client, &keys, &tenant, &tq, &target, &id).await?;
                }
                anyhow::Ok(n)
            }
        });
        for r in futures::future::join_all(tasks).await {
            done += r?;
        }
        pool.flush().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let st = pool.status().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        if st.in_use > st.config.max_vms {
            violations.push(format!("round {round}: {} VMs over max_vms", st.in_use));
        }
        let mut held = std::collections::BTreeSet::new();
        for c in &st.claims {
            if let Some(vm) = &c.vm
                && !held.insert(vm.clone())
            {
                violations.push(format!("round {round}: {vm} held twice"));
            }
        }
    }
    let elapsed = t0.elapsed();
    let st = Bench::wait_pool(&pool, Duration::from_secs(120), settled_with(5)).await?;
    let provider = ProcessProvider::inspector(&b.state_dir);
    let substrate: std::collections::BTreeSet<String> = provider
        .list(&ctx.tenant)
        .await?
        .into_iter()
        .map(|v| v.id.0)
        .collect();
    let inventory: std::collections::BTreeSet<String> =
        st.vms.iter().map(|v| v.id.0.clone()).collect();
    if substrate != inventory {
        violations.push(format!(
            "substrate {} VMs vs inventory {} VMs at the end",
            substrate.len(),
            inventory.len()
        ));
    }
    let history = run_history_lengths(&client, &target).await?;
    let rss_end = rss_mb(b.worker_pid());
    for v in &violations {
        eprintln!("soak: INVARIANT VIOLATION: {v}");
    }
    eprintln!(
        "soak: {done} claims, {rounds} flushes in {:.0} s; {} runs (continue-as-new {} times), \
         history lengths {history:?}; worker RSS {rss_start:.0} → {rss_end:.0} MB; {} violations",
        elapsed.as_secs_f64(),
        history.len(),
        history.len().saturating_sub(1),
        violations.len()
    );
    cleanup(b, &pool, &ctx.tenant).await?;
    let longest = history.iter().copied().max().unwrap_or(0) as f64;
    Ok(vec![
        figure(
            &format!("soak: {done} claims + {rounds} flushes, wall time"),
            vec![elapsed.as_secs_f64()],
            "s",
            "",
            None,
        ),
        figure(
            "soak: longest pool history of one run",
            vec![longest],
            "events",
            "≤ 11,000 (rolls over at 10,000)",
            Some(longest <= 11_000.0),
        ),
        figure(
            "soak: continue-as-new count",
            vec![history.len().saturating_sub(1) as f64],
            "",
            "",
            None,
        ),
        figure(
            "soak: worker RSS at the end",
            vec![rss_end],
            "MB",
            &format!("≤ 150 MB (start {rss_start:.0} MB)"),
            Some(rss_end <= 150.0),
        ),
        figure(
            "soak: invariant violations",
            vec![violations.len() as f64],
            "",
            "0",
            Some(violations.is_empty()),
        ),
    ])
}

/// One agent's life without an agent workflow: claim (until served), then release.
async fn cycle(
    client: &temporalio_client::Client,
    keys: &KeyStore,
    tenant: &str,
    tq: &str,
    target: &str,
    id: &str,
) -> anyhow::Result<()> {
    let mut req = ClaimRequest {
        request: format!("{id}@run"),
        agent: id.to_string(),
        developer: "soak".into(),
        workspace: "default".into(),
        wait: false,
        spawn_request_id: format!("{id}-spawn"),
        spawn_signed_at: murmur_activities::auth::now_ms(),
        taken_by: None,
        auth: None,
    };
    req.auth = Some(keys.sign_service(ops::CLAIM, target, &unsigned_body(&req))?);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match update_admitted(
            client,
            tenant,
            tq,
            || PoolWorkflow::claim,
            req.clone().into(),
        )
        .await
        {
            Ok(ClaimState::Assigned { .. }) => break,
            Ok(ClaimState::Failed { reason }) => anyhow::bail!("claim {id} failed: {reason}"),
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => anyhow::bail!("claim {id}: {e}"),
        }
        anyhow::ensure!(Instant::now() < deadline, "claim {id} never served");
    }
    let mut release = ReleaseRequest {
        request: req.request.clone(),
        auth: None,
    };
    release.auth = Some(keys.sign_service(ops::RELEASE, target, &unsigned_body(&release))?);
    update_admitted(client, tenant, tq, || PoolWorkflow::release, release.into())
        .await
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("release {id}: {e}"))
}

/// Sends a pool update, retrying while the server refuses it for having too many updates in
/// flight on the workflow (10 on the dev server; like the claim activity, the client retries).
/// `update` makes the update's marker (the markers cannot be copied).
async fn update_admitted<U>(
    client: &temporalio_client::Client,
    tenant: &str,
    tq: &str,
    update: impl Fn() -> U,
    input: U::Input,
) -> anyhow::Result<U::Output>
where
    U: temporalio_common::UpdateDefinition<
            Workflow = <PoolWorkflow as temporalio_common::HasWorkflowDefinition>::Run,
        >,
    U::Input: Clone + Send,
{
    loop {
        match update_pool(client, tenant, tq, update(), input.clone()).await {
            Ok(out) => return Ok(out),
            Err(e) if e.message.contains("in-flight updates") => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(e) => anyhow::bail!("{e}"),
        }
    }
}

/// History length of every run of a workflow id, oldest first.
async fn run_history_lengths(
    client: &temporalio_client::Client,
    id: &str,
) -> anyhow::Result<Vec<u64>> {
    let query = format!("WorkflowId = '{id}'");
    let mut stream = client.list_workflows(query, WorkflowListOptions::default());
    let mut runs = Vec::new();
    while let Some(item) = stream.next().await {
        let wf = item.map_err(|e| anyhow::anyhow!("{e}"))?;
        runs.push((
            wf.start_time(),
            u64::try_from(wf.history_length()).unwrap_or(0),
        ));
    }
    runs.sort_by_key(|r| r.0);
    let mut lengths: Vec<u64> = runs.into_iter().map(|r| r.1).collect();
    // Visibility reports no length for the run still open; ask the run itself.
    if lengths.last() == Some(&0) {
        let desc = client
            .get_workflow_handle::<UntypedWorkflow>(id.to_string())
            .describe(temporalio_client::WorkflowDescribeOptions::default())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if let (Some(last), Some(info)) = (
            lengths.last_mut(),
            desc.raw_description.workflow_execution_info.as_ref(),
        ) {
            *last = u64::try_from(info.history_length).unwrap_or(0);
        }
    }
    Ok(lengths)
}
