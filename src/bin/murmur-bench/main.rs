//! `murmur-bench`: measures what a warm pool is for, against a real dev server and a real
//! worker, and appends the figures to BENCHMARKS.md.
//!
//! ```text
//! cargo run --release --bin murmur-bench -- all            # every scenario
//! cargo run --release --bin murmur-bench -- spawn flush-10 # some of them
//! ```
//!
//! It starts the dev server (`./devserver.sh start`) and its own `murmur-worker` (the binary
//! next to this one) on a private task queue and state directory, gives every scenario its
//! own tenant, runs each scenario after a warm-up, prints median / p95 / max and appends one
//! dated row per figure to BENCHMARKS.md with the machine and commit. Benchmarks are not
//! tests: nothing here asserts a timing.

mod scenarios;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clap::Parser;
use murmur::agents::AgentClient;
use murmur::client::{PoolClient, connect};
use murmur::config::{Context, StoredIdentity};
use murmur_activities::auth::{KeyStore, split_credential};
use murmur_workflows::status::PoolStatus;

/// Benchmarks of murmur against a real dev server and worker.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    /// Measured runs per scenario (some scenarios cap it: see their description).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Unmeasured runs first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Print only; do not append to BENCHMARKS.md.
    #[arg(long)]
    no_record: bool,
    /// Scenarios: all, spawn, spawn-streaming, flush-10, flush-100, delete, claim-throughput,
    /// cli-latency, nuke, footprint, sleep-wake; qemu-spawn, qemu-sleep-wake and qemu-snapshot
    /// (alone: their worker runs the qemu substrate); and soak (not in all: minutes long;
    /// sizes from MURMUR_SOAK_CLAIMS and MURMUR_SOAK_FLUSHES).
    #[arg(required = true)]
    scenarios: Vec<String>,
}

/// One measured figure.
pub struct Figure {
    /// Scenario and what was measured.
    pub name: String,
    /// Samples, in milliseconds (or the unit in `unit`).
    pub samples: Vec<f64>,
    /// Unit of the samples.
    pub unit: &'static str,
    /// The goal, as text.
    pub goal: String,
    /// Whether the median met the goal, when there is one.
    pub met: Option<bool>,
}

impl Figure {
    /// Median, p95 and max of the samples.
    pub fn stats(&self) -> (f64, f64, f64) {
        let mut s = self.samples.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        if s.is_empty() {
            return (0.0, 0.0, 0.0);
        }
        let pick = |q: f64| s[((s.len() as f64 - 1.0) * q).round() as usize];
        (pick(0.5), pick(0.95), s[s.len() - 1])
    }
}

/// Everything a scenario needs: the worker, its state dir, a client.
pub struct Bench {
    /// Where the worker keeps sandboxes and keys.
    pub state_dir: PathBuf,
    /// The worker's task queue.
    pub task_queue: String,
    /// The worker process.
    worker: Child,
    /// Directory of the murmur binaries.
    pub bin_dir: PathBuf,
    /// The repository root.
    pub root: PathBuf,
    /// Measured runs.
    pub runs: usize,
    /// Warm-up runs.
    pub warmup: usize,
    /// The worker's substrate (`process`, or `qemu` for the qemu scenarios).
    pub substrate: &'static str,
}

impl Bench {
    /// A tenant with an admin credential: pool and agent clients acting for it.
    pub async fn tenant(&self, name: &str) -> anyhow::Result<(Context, PoolClient, AgentClient)> {
        let tenant = format!("{name}-{:x}", std::process::id() & 0xffff);
        let store = KeyStore::open(&self.state_dir)?;
        let credential = store.issue(
            &tenant,
            "bench",
            "murmur-tenant-admin",
            Duration::from_secs(4 * 3600),
        )?;
        let (token, key) = split_credential(&credential)?;
        let ctx = Context {
            tenant,
            workspace: "default".into(),
            developer: "bench".into(),
            project_dir: None,
            identity: Some(StoredIdentity {
                token: token.to_string(),
                key: key.to_string(),
            }),
        };
        let client = connect("murmur-bench")
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok((
            ctx.clone(),
            PoolClient::new(client.clone(), ctx.clone()),
            AgentClient::new(client, ctx),
        ))
    }

    /// Waits until `pred` holds for the pool's status (polling every 5 ms), at most `limit`.
    pub async fn wait_pool(
        pool: &PoolClient,
        limit: Duration,
        pred: impl Fn(&PoolStatus) -> bool,
    ) -> anyhow::Result<PoolStatus> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Ok(st) = pool.status().await
                && pred(&st)
            {
                return Ok(st);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the pool did not get there within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// How many VMs of `tenant` the bench host's substrate holds.
    pub fn vms_of(&self, tenant: &str) -> usize {
        self.vm_counter(tenant)()
    }

    /// A counter of `tenant`'s VMs on the bench host's substrate that a sampling thread can
    /// own (see [`Bench::vms_of`]).
    pub fn vm_counter(&self, tenant: &str) -> impl Fn() -> usize + Send + 'static {
        let (state_dir, qemu, tenant) = (
            self.state_dir.clone(),
            self.substrate == "qemu",
            tenant.to_string(),
        );
        move || {
            use murmur_activities::substrate::Provider as _;
            let vms = if qemu {
                murmur_activities::substrate::qemu::QemuProvider::inspector(&state_dir).host_vms()
            } else {
                murmur_activities::substrate::process::ProcessProvider::inspector(&state_dir)
                    .host_vms()
            };
            vms.iter().filter(|(t, _)| *t == tenant).count()
        }
    }

    /// The worker's process id (for footprint).
    pub fn worker_pid(&self) -> u32 {
        self.worker.id()
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.worker.kill();
        let _ = self.worker.wait();
        // Stop every sandbox this run created.
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(format!("sandbox --dir {}", self.state_dir.display()))
            .status();
        // And every qemu guest.
        if self.substrate == "qemu" {
            let qemu = murmur_activities::substrate::qemu::QemuProvider::inspector(&self.state_dir);
            let tenants = std::fs::read_dir(self.state_dir.join("qemu/vms"))
                .map(|d| {
                    d.filter_map(Result::ok)
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            if let Ok(rt) = tokio::runtime::Runtime::new() {
                rt.block_on(async {
                    use murmur_activities::substrate::Provider as _;
                    for tenant in tenants {
                        for vm in qemu.list(&tenant).await.unwrap_or_default() {
                            let _ = qemu.delete(&tenant, &vm.id).await;
                        }
                    }
                });
            }
        }
    }
}

fn start(cli: &Cli) -> anyhow::Result<Bench> {
    let qemu = cli
        .scenarios
        .iter()
        .any(|s| scenarios::QEMU_SCENARIOS.contains(&s.as_str()));
    anyhow::ensure!(
        !qemu
            || cli
                .scenarios
                .iter()
                .all(|s| scenarios::QEMU_SCENARIOS.contains(&s.as_str())),
        "qemu scenarios run alone (their worker runs the qemu substrate)"
    );
    let substrate = if qemu { "qemu" } else { "process" };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(root.join("devserver.sh"))
        .arg("start")
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "./devserver.sh start failed");
    let bin_dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow::anyhow!("no binary directory"))?;
    let state_dir = PathBuf::from(format!("/tmp/murmur-bench-{}", std::process::id()));
    std::fs::create_dir_all(&state_dir)?;
    let task_queue = format!("murmur-bench-{}", std::process::id());
    let log = std::fs::File::create(state_dir.join("worker.log"))?;
    let worker = Command::new(bin_dir.join("murmur-worker"))
        .env("MURMUR_STATE_DIR", &state_dir)
        .env("MURMUR_TASK_QUEUE", &task_queue)
        .env("MURMUR_SUBSTRATE", substrate)
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .map_err(|e| anyhow::anyhow!("start murmur-worker next to murmur-bench: {e}"))?;
    Ok(Bench {
        state_dir,
        task_queue,
        worker,
        bin_dir,
        root,
        runs: cli.runs,
        warmup: cli.warmup,
        substrate,
    })
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    format!("{cores} cores, {mem_gb:.0} GB")
}

fn commit(root: &Path) -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn report(figures: &[Figure], record: Option<(&Path, String)>) -> anyhow::Result<()> {
    println!(
        "{:<44} {:>5} {:>10} {:>10} {:>10}  goal",
        "figure", "n", "median", "p95", "max"
    );
    let mut rows = String::new();
    for f in figures {
        let (median, p95, max) = f.stats();
        let verdict = match f.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "",
        };
        println!(
            "{:<44} {:>5} {:>8.1}{u} {:>8.1}{u} {:>8.1}{u}  {} {verdict}",
            f.name,
            f.samples.len(),
            median,
            p95,
            max,
            f.goal,
            u = f.unit
        );
        if let Some((_, header)) = &record {
            rows.push_str(&format!(
                "| {header} | {} | {} | {median:.1} {u} | {p95:.1} {u} | {max:.1} {u} | {} {verdict} |\n",
                f.name,
                f.samples.len(),
                f.goal,
                u = f.unit
            ));
        }
    }
    if let Some((path, _)) = record {
        use std::io::Write as _;
        let new = !path.exists();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        if new {
            writeln!(
                file,
                "# Benchmarks\n\nAppended by `cargo run --release --bin murmur-bench -- all`.\n\n| date, commit, machine | figure | n | median | p95 | max | goal |\n|---|---|---|---|---|---|---|"
            )?;
        }
        file.write_all(rows.as_bytes())?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let known = |name: &str| {
        name == "all"
            || scenarios::SCENARIOS
                .iter()
                .chain(scenarios::ON_REQUEST)
                .any(|(n, _)| *n == name)
    };
    if let Some(unknown) = cli.scenarios.iter().find(|s| !known(s)) {
        let names: Vec<&str> = scenarios::SCENARIOS
            .iter()
            .chain(scenarios::ON_REQUEST)
            .map(|(n, _)| *n)
            .collect();
        anyhow::bail!(
            "unknown scenario {unknown:?} (expected all or one of {})",
            names.join(", ")
        );
    }
    let bench = start(&cli)?;
    // Every client of this process talks to the bench worker's task queue.
    // SAFETY: set before any other thread exists (the runtime is built below).
    unsafe { std::env::set_var("MURMUR_TASK_QUEUE", &bench.task_queue) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let figures = runtime.block_on(async {
        let mut figures = Vec::new();
        let all = cli.scenarios.iter().any(|s| s == "all");
        let wanted = |name: &str| {
            (all && !scenarios::QEMU_SCENARIOS.contains(&name))
                || cli.scenarios.iter().any(|s| s == name)
        };
        let on_request = scenarios::ON_REQUEST
            .iter()
            .filter(|(name, _)| cli.scenarios.iter().any(|s| s == name));
        for (name, _) in scenarios::SCENARIOS.iter().chain(on_request) {
            if wanted(name) {
                eprintln!("== {name}");
                match scenarios::run(name, &bench).await {
                    Ok(mut f) => figures.append(&mut f),
                    Err(e) => eprintln!("{name} failed: {e:#}"),
                }
            }
        }
        figures
    });
    let header = format!(
        "{} {} ({})",
        murmur_workflows::model::format_rfc3339(murmur_activities::auth::now_ms())
            .get(..10)
            .unwrap_or_default(),
        commit(&bench.root),
        machine()
    );
    let path = bench.root.join("BENCHMARKS.md");
    report(
        &figures,
        (!cli.no_record).then_some((path.as_path(), header)),
    )
}
