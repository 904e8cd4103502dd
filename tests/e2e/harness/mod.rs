//! Test harness: a real worker process against the real dev server (started by
//! `./devserver.sh test`), one tenant, task queue and state directory per test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use murmur_activities::substrate::process::ProcessProvider;
use murmur_activities::substrate::qemu::QemuProvider;
use murmur_activities::substrate::{Provider, VmInfo};
use murmur_workflows::agent::{AgentStatus, Phase};
use murmur_workflows::status::PoolStatus;

mod invariants;
mod server;
pub mod tmux;

pub use invariants::{Allow, while_checking};
pub use server::PrivateServer;

/// An agent command that counts upward once a second, one number a line, from 1. The count
/// lives in the shell's memory: a restart would begin at 1 again, and time passing does not
/// advance it.
pub const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo $i; sleep 1; done";

/// How long a test waits for the pool to reach a state before failing.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A free loopback address (`127.0.0.1:<port>`).
fn free_loopback_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    format!("127.0.0.1:{port}")
}

/// One isolated murmur installation: a project dir with `.murmur/murmur.yaml`, a state dir,
/// a worker on its own task queue.
pub struct TestEnv {
    pub tenant: String,
    pub task_queue: String,
    pub dir: tempfile::TempDir,
    worker: Option<Child>,
    /// Where the worker serves /metrics, /healthz and /readyz, when enabled.
    pub metrics_addr: Option<String>,
    /// How often that worker reads the pools for its metrics.
    metrics_refresh: String,
    /// The worker's substrate (`process` unless started with [`TestEnv::start_on`]).
    pub substrate_name: String,
    /// Extra environment of the worker (reaper timing, fault injection, ...).
    pub worker_env: Vec<(String, String)>,
    /// The user the worker runs as, when not the tests' own.
    worker_uid: Option<u32>,
    /// The Temporal server to use instead of the shared dev server.
    pub temporal_address: Option<String>,
    /// More workers of this deployment, each its own VM host: (host id, process while it
    /// runs).
    hosts: Vec<(String, Option<Child>)>,
}

/// How to set up a [`TestEnv`] that differs from the default.
#[derive(Default)]
pub struct EnvOptions {
    /// Extra environment of the worker.
    pub worker_env: Vec<(String, String)>,
    /// A private Temporal server.
    pub temporal_address: Option<String>,
    /// The worker's substrate (`process` when empty).
    pub substrate: String,
    /// Run the worker as this user id (and group id), as an unprivileged worker would run
    /// (only when the tests run as root; otherwise the worker is unprivileged already).
    pub worker_uid: Option<u32>,
}

impl EnvOptions {
    /// Adds a worker environment variable.
    pub fn worker(mut self, key: &str, value: &str) -> Self {
        self.worker_env.push((key.into(), value.into()));
        self
    }

    /// A reaper that scans every second with a two-second grace period.
    pub fn fast_reaper(self) -> Self {
        self.worker("MURMUR_REAP_INTERVAL", "1s")
            .worker("MURMUR_REAP_GRACE", "2s")
    }
}

impl TestEnv {
    /// Creates the environment and starts its worker.
    pub fn start(name: &str) -> Self {
        Self::start_with(name, EnvOptions::default())
    }

    /// Creates the environment and starts its worker on `substrate` (`process`, `qemu`).
    pub fn start_on(name: &str, substrate: &str) -> Self {
        Self::start_with(
            name,
            EnvOptions {
                substrate: substrate.to_string(),
                ..EnvOptions::default()
            },
        )
    }

    /// Creates the environment with `options` and starts its worker.
    pub fn start_with(name: &str, options: EnvOptions) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let tenant = format!(
            "{name}-{:x}{:x}",
            std::process::id() & 0xfff,
            nanos & 0xfffff
        );
        let dir = tempfile::Builder::new()
            .prefix("mm")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::create_dir_all(dir.path().join(".murmur")).unwrap();
        std::fs::write(
            dir.path().join(".murmur/murmur.yaml"),
            format!("tenant: {tenant}\nworkspace: default\n"),
        )
        .unwrap();
        let mut env = Self {
            task_queue: format!("murmur-test-{tenant}"),
            tenant,
            dir,
            worker: None,
            hosts: Vec::new(),
            metrics_addr: None,
            metrics_refresh: "1s".to_string(),
            worker_env: options.worker_env,
            worker_uid: options
                .worker_uid
                .filter(|_| nix::unistd::Uid::effective().is_root()),
            temporal_address: options.temporal_address,
            substrate_name: if options.substrate.is_empty() {
                "process".to_string()
            } else {
                options.substrate
            },
        };
        // Every test acts as a tenant admin unless it logs in otherwise.
        let admin = env.credential(&env.tenant, "tester", "murmur-tenant-admin", "1h");
        env.login(&admin);
        if let Some(uid) = env.worker_uid {
            env.hand_state_to(uid);
        }
        env.start_worker();
        env
    }

    /// Makes the state dir (keys included) `uid`'s, for a worker running as that user.
    fn hand_state_to(&self, uid: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let state = self.state_dir();
        std::fs::create_dir_all(&state).unwrap();
        let out = Command::new("chown")
            .args(["-R", &format!("{uid}:{uid}")])
            .arg(&state)
            .output()
            .expect("chown");
        assert!(out.status.success(), "chown: {}", stderr(&out));
    }

    /// The worker binary to run. A worker running as another user gets its own copy in the
    /// project dir: the build's target dir may be under a home it cannot enter.
    fn worker_binary(&self) -> PathBuf {
        let built = PathBuf::from(env!("CARGO_BIN_EXE_murmur-worker"));
        if self.worker_uid.is_none() {
            return built;
        }
        let copy = self.dir.path().join("murmur-worker");
        if !copy.exists() && std::fs::hard_link(&built, &copy).is_err() {
            std::fs::copy(&built, &copy).expect("copy murmur-worker");
        }
        copy
    }

    /// True when the worker runs as another user than the tests (see [`EnvOptions`]).
    pub fn worker_is_unprivileged(&self) -> bool {
        self.worker_uid.is_some() || !nix::unistd::Uid::effective().is_root()
    }

    /// Issues a credential with this installation's worker key.
    pub fn credential(&self, tenant: &str, developer: &str, role: &str, ttl: &str) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_murmur-worker"))
            .args([
                "token",
                "issue",
                "--tenant",
                tenant,
                "--developer",
                developer,
            ])
            .args(["--role", role, "--ttl", ttl])
            .env("MURMUR_STATE_DIR", self.state_dir())
            .output()
            .expect("run murmur-worker token issue");
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Stores a credential with `murmur auth login`.
    pub fn login(&self, credential: &str) {
        let out = self.murmur(&["auth", "login", "--token", credential]);
        assert!(out.status.success(), "login failed: {}", stderr(&out));
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Restarts the worker with its metrics endpoint on a free loopback port, reading the
    /// pools every second.
    pub fn enable_metrics(&mut self) -> String {
        self.enable_metrics_refreshing_every("1s")
    }

    /// Restarts the worker with its metrics endpoint on a free loopback port, reading the
    /// pools every `refresh`.
    pub fn enable_metrics_refreshing_every(&mut self, refresh: &str) -> String {
        let addr = free_loopback_addr();
        self.metrics_addr = Some(addr.clone());
        self.metrics_refresh = refresh.to_string();
        self.kill_worker();
        self.start_worker();
        addr
    }

    /// `GET path` on the worker's metrics endpoint: (status line, body).
    pub fn http_get(&self, path: &str) -> (String, String) {
        let addr = self.metrics_addr.as_deref().expect("metrics enabled");
        self.http_get_at(addr, path)
    }

    /// Reads the worker's `/metrics` until `pred` holds for its text (the pool-level series
    /// follow the pools within a refresh), returning that text.
    pub fn wait_metrics(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (_, text) = self.http_get("/metrics");
            if pred(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what} in /metrics:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `GET path` on the metrics endpoint at `addr`: (status line, body). Waits for the
    /// endpoint to come up: until the worker has bound its port, a connection can fail, or
    /// reach whatever else briefly held the port and be reset, so the exchange is retried.
    pub fn http_get_at(&self, addr: &str, path: &str) -> (String, String) {
        use std::io::{Read, Write};
        let deadline = Instant::now() + PATIENCE;
        let raw = loop {
            let exchange = std::net::TcpStream::connect(addr).and_then(|mut stream| {
                let request =
                    format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
                stream.write_all(request.as_bytes())?;
                let mut raw = String::new();
                stream.read_to_string(&mut raw)?;
                Ok(raw)
            });
            match exchange {
                Ok(raw) if raw.starts_with("HTTP/1.1 ") => break raw,
                other => {
                    assert!(
                        Instant::now() < deadline,
                        "GET {path} never answered: {other:?}\n{}",
                        self.worker_log_tail()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        (
            head.lines().next().unwrap_or_default().to_string(),
            body.to_string(),
        )
    }

    /// Starts (or restarts) the worker process.
    pub fn start_worker(&mut self) {
        assert!(self.worker.is_none(), "worker already running");
        let mut extra = Vec::new();
        if let Some(addr) = &self.metrics_addr {
            extra.push(("MURMUR_METRICS_ADDR".to_string(), addr.clone()));
            extra.push((
                "MURMUR_METRICS_REFRESH".to_string(),
                self.metrics_refresh.clone(),
            ));
        }
        let child = self.spawn_worker("worker.log", &self.state_dir(), &extra);
        self.worker = Some(child);
    }

    /// Spawns a `murmur-worker` of this deployment with its state in `state_dir`, logging to
    /// `log_name` in the project dir, with `extra` environment on top of the usual.
    fn spawn_worker(&self, log_name: &str, state_dir: &Path, extra: &[(String, String)]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(log_name))
            .unwrap();
        let mut cmd = Command::new(self.worker_binary());
        if let Some(addr) = &self.temporal_address {
            cmd.env("TEMPORAL_ADDRESS", addr);
        }
        cmd.envs(self.worker_env.iter().map(|(k, v)| (k, v)));
        cmd.envs(extra.iter().map(|(k, v)| (k, v)))
            .env("MURMUR_TASK_QUEUE", &self.task_queue)
            .env("MURMUR_STATE_DIR", state_dir)
            .env("MURMUR_SUBSTRATE", &self.substrate_name)
            .env("RUST_LOG", "info,temporalio_sdk_core=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(uid) = self.worker_uid {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid).env("HOME", state_dir);
        }
        cmd.spawn().expect("start murmur-worker")
    }

    /// State directory of the extra host `host`.
    pub fn host_state_dir(&self, host: &str) -> PathBuf {
        self.dir.path().join("hosts").join(host)
    }

    /// Starts (or restarts) another worker of this deployment as VM host `host`: same task
    /// queue and signing keys, its own state dir and log (`<host>.log`).
    pub fn start_host(&mut self, host: &str) {
        self.start_host_with(host, &[]);
    }

    /// Starts another host as [`TestEnv::start_host`] does, with its metrics endpoint on a
    /// free loopback port (reading the pools every second); returns the endpoint's address.
    pub fn start_host_with_metrics(&mut self, host: &str) -> String {
        let addr = free_loopback_addr();
        self.start_host_with(
            host,
            &[
                ("MURMUR_METRICS_ADDR".to_string(), addr.clone()),
                ("MURMUR_METRICS_REFRESH".to_string(), "1s".to_string()),
            ],
        );
        addr
    }

    /// Starts another host with `more` environment.
    fn start_host_with(&mut self, host: &str, more: &[(String, String)]) {
        let mut extra = vec![
            (
                "MURMUR_KEYS_DIR".to_string(),
                self.state_dir().display().to_string(),
            ),
            ("MURMUR_HOST_ID".to_string(), host.to_string()),
        ];
        extra.extend_from_slice(more);
        let child = self.spawn_worker(&format!("{host}.log"), &self.host_state_dir(host), &extra);
        match self.hosts.iter_mut().find(|(h, _)| h == host) {
            Some((_, slot)) => {
                assert!(slot.is_none(), "host {host} already running");
                *slot = Some(child);
            }
            None => self.hosts.push((host.to_string(), Some(child))),
        }
    }

    /// Kills extra host `host` with SIGKILL, as a crash would (its VMs stay behind).
    pub fn kill_host(&mut self, host: &str) {
        if let Some((_, slot)) = self.hosts.iter_mut().find(|(h, _)| h == host)
            && let Some(mut child) = slot.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops extra host `host` with SIGTERM, as an operator would, and waits for it to exit.
    pub fn stop_host(&mut self, host: &str) {
        if let Some((_, slot)) = self.hosts.iter_mut().find(|(h, _)| h == host)
            && let Some(mut child) = slot.take()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }

    /// `tenant`'s VMs in the substrate kept under `state_dir` (any tenant, not only this
    /// environment's).
    pub fn vms_of(&self, state_dir: PathBuf, tenant: &str) -> Vec<VmInfo> {
        block_on(self.provider_at(state_dir).list(tenant)).unwrap()
    }

    /// This tenant's VMs in the substrate of extra host `host`.
    pub fn host_substrate(&self, host: &str) -> Vec<VmInfo> {
        block_on(
            self.provider_at(self.host_state_dir(host))
                .list(&self.tenant),
        )
        .unwrap()
    }

    /// Kills the worker with SIGKILL, as a crash would.
    pub fn kill_worker(&mut self) {
        if let Some(mut child) = self.worker.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(self.dir.path())
            .env("MURMUR_TASK_QUEUE", &self.task_queue)
            .env("MURMUR_DEVELOPER", "tester")
            .env_remove("MURMUR_TENANT")
            .env_remove("MURMUR_WORKSPACE")
            .env_remove("MURMUR_VM")
            .env_remove("MURMUR_TOKEN")
            .stdin(Stdio::null());
        if let Some(addr) = &self.temporal_address {
            cmd.env("TEMPORAL_ADDRESS", addr);
        }
        cmd
    }

    /// Plants a VM the pool never booted: a sandbox directory with a live "supervisor" that
    /// ignores SIGTERM (so deleting it takes a few seconds). Returns the process.
    pub fn plant_orphan(&self, id: &str) -> Child {
        self.plant_vm_of(&self.tenant.clone(), id)
    }

    /// Plants a live VM of another `tenant` in this worker's substrate (what a second
    /// tenant's pool on the same host would have).
    pub fn plant_vm_of(&self, tenant: &str, id: &str) -> Child {
        use std::os::unix::process::CommandExt;
        let dir = self.state_dir().join("vms").join(tenant).join(id);
        std::fs::create_dir_all(dir.join("root")).unwrap();
        Command::new("/bin/sh")
            .args([
                "-c",
                "trap '' TERM; while :; do sleep 0.1; done",
                "sh",
                "--dir",
            ])
            .arg(&dir)
            .process_group(0)
            .spawn()
            .expect("start orphan")
    }

    /// The whole worker log.
    pub fn worker_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("worker.log")).unwrap_or_default()
    }

    /// A `murmur` command ready to run in the project dir.
    pub fn murmur_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = self.command(Path::new(env!("CARGO_BIN_EXE_murmur")));
        cmd.args(args);
        cmd
    }

    /// Runs `murmur` and returns its output.
    pub fn murmur(&self, args: &[&str]) -> Output {
        self.murmur_cmd(args).output().expect("run murmur")
    }

    /// Runs `murmur` as the holder of `credential` (`MURMUR_TOKEN`), returning its output.
    pub fn murmur_as(&self, credential: &str, args: &[&str]) -> Output {
        self.murmur_cmd(args)
            .env("MURMUR_TOKEN", credential)
            .output()
            .expect("run murmur")
    }

    /// Runs `murmur` with `stdin`, returning its output.
    pub fn murmur_stdin(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .murmur_cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run murmur");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// Runs `murmur`, asserts success, returns stdout.
    pub fn murmur_ok(&self, args: &[&str]) -> String {
        let out = self.murmur(args);
        assert!(
            out.status.success(),
            "murmur {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.worker_log_tail()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A pinned `temporal` CLI command ready to run.
    pub fn command_for_temporal(&self, args: &[&str]) -> Command {
        let cli = std::env::var("TEMPORAL_CLI")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/temporal")
            });
        let mut cmd = self.command(&cli);
        cmd.args(args);
        cmd
    }

    /// Runs the pinned `temporal` CLI.
    pub fn temporal(&self, args: &[&str]) -> Output {
        self.command_for_temporal(args)
            .output()
            .expect("run temporal CLI")
    }

    /// What Temporal holds for the tenant's pool and nuke workflows (`temporal workflow
    /// describe`: status, pending activities and workflow task, pending updates; the last
    /// events of each history), then the worker log's tail: the report of a call that hung.
    pub fn describe_tenant_workflows(&self) -> String {
        use murmur_workflows::shell::{nuke_workflow_id, pool_workflow_id};
        let mut report = String::new();
        for id in [
            pool_workflow_id(&self.tenant),
            nuke_workflow_id(&self.tenant),
        ] {
            let describe = self.temporal(&["workflow", "describe", "--workflow-id", &id]);
            report.push_str(&format!(
                "--- temporal workflow describe {id} ---\n{}{}\n",
                stdout(&describe),
                stderr(&describe)
            ));
            let show = self.temporal(&["workflow", "show", "--workflow-id", &id]);
            let text = stdout(&show);
            let lines: Vec<&str> = text.lines().collect();
            report.push_str(&format!(
                "--- temporal workflow show {id} (last 40 lines) ---\n{}\n",
                lines[lines.len().saturating_sub(40)..].join("\n")
            ));
        }
        report.push_str(&self.worker_log_tail());
        report
    }

    /// The events of the latest run of workflow `id`, through `temporal workflow show`.
    pub fn history_events(&self, id: &str) -> Vec<serde_json::Value> {
        let out = self.temporal(&["workflow", "show", "--workflow-id", id, "-o", "json"]);
        assert!(out.status.success(), "history of {id}: {}", stderr(&out));
        let mut history: serde_json::Value =
            serde_json::from_str(&stdout(&out)).expect("history JSON");
        match history["events"].take() {
            serde_json::Value::Array(events) => events,
            other => panic!("history of {id} has no events: {other}"),
        }
    }

    /// The pool's status through `murmur pool status --json`.
    pub fn status(&self) -> PoolStatus {
        let out = self.murmur_ok(&["pool", "status", "--json"]);
        serde_json::from_str(&out).expect("status JSON")
    }

    /// Waits until `pred` holds for the status, failing after [`PATIENCE`].
    pub fn wait_for(&self, what: &str, pred: impl Fn(&PoolStatus) -> bool) -> PoolStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let st = self.status();
            if pred(&st) {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status: {st:#?}\n{}",
                self.worker_log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The worker's substrate, for inspection and cleanup.
    pub fn provider(&self) -> Box<dyn Provider> {
        self.provider_at(self.state_dir())
    }

    /// This deployment's substrate kept under `state_dir` (the worker's, or an extra host's).
    fn provider_at(&self, state_dir: PathBuf) -> Box<dyn Provider> {
        if self.substrate_name == "qemu" {
            Box::new(QemuProvider::inspector(state_dir))
        } else {
            Box::new(ProcessProvider::inspector(state_dir))
        }
    }

    /// Deletes every VM of this tenant from the substrate under `state_dir`.
    fn delete_all_vms(&self, state_dir: PathBuf) {
        let provider = self.provider_at(state_dir);
        if let Ok(vms) = block_on(provider.list(&self.tenant)) {
            for vm in vms {
                let _ = block_on(provider.delete(&self.tenant, &vm.id));
            }
        }
    }

    /// Every VM the substrate holds for this tenant.
    pub fn substrate(&self) -> Vec<VmInfo> {
        block_on(self.provider().list(&self.tenant)).unwrap()
    }

    /// Sets a workspace from YAML.
    pub fn set_workspace(&self, name: &str, yaml: &str) {
        let out = self.murmur_stdin(&["set", "workspace", name], yaml);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Creates an image for the process substrate: the default image plus a `boot.sh`.
    pub fn make_image(&self, name: &str, boot_sh: &str) {
        let dir = self.state_dir().join("images").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("boot.sh"), boot_sh).unwrap();
    }

    /// Spawns an agent and asserts the spawn was accepted.
    pub fn spawn(&self, slug: &str, command: &str) {
        self.spawn_with(&[], slug, command);
    }

    /// Spawns an agent with extra `murmur spawn` flags and asserts the spawn was accepted.
    pub fn spawn_with(&self, flags: &[&str], slug: &str, command: &str) {
        let mut args = vec!["spawn"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&[slug, "--", command]);
        let out = self.murmur(&args);
        assert!(
            out.status.success(),
            "spawn {slug} failed: {}\n{}",
            stderr(&out),
            self.worker_log_tail()
        );
        assert!(stdout(&out).starts_with(&format!("Spawned: {slug}\n")));
    }

    /// Leaves the tenant room for one VM (`max_vms: 1`, no warm VMs), gives it to agent
    /// `holder` (`sleep 600`) and queues agent `waiter` (running `command`) behind it.
    pub fn queue_a_waiter_behind_a_holder(&self, command: &str) {
        self.murmur_ok(&["patch", "pool-config", "default", "--set", "max_vms=1"]);
        self.set_workspace("default", "min_idle: 0\n");
        self.spawn("holder", "sleep 600");
        self.wait_phase("holder", Phase::Running);
        self.spawn("waiter", command);
        self.wait_for("the waiter's claim queued", |s| {
            s.claims.len() == 2 && s.claims.iter().any(|c| c.vm.is_none())
        });
    }

    /// An agent's status through `murmur status --json`.
    pub fn agent(&self, slug: &str) -> AgentStatus {
        let out = self.murmur_ok(&["status", "--json", slug]);
        serde_json::from_str(&out).expect("agent status JSON")
    }

    /// Waits until the agent is in `phase`, failing after [`PATIENCE`].
    pub fn wait_phase(&self, slug: &str, phase: Phase) -> AgentStatus {
        self.wait_agent(slug, &format!("to be {phase}"), |st| {
            st.phase == Some(phase)
        })
    }

    /// Waits until the agent's status satisfies `pred` (`what` names it), failing after
    /// [`PATIENCE`].
    pub fn wait_agent(
        &self,
        slug: &str,
        what: &str,
        pred: impl Fn(&AgentStatus) -> bool,
    ) -> AgentStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let st = self.agent(slug);
            if pred(&st) {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {slug}: {what}; last status: {st:#?}\n{}",
                self.worker_log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The numbers a [`COUNTER`] agent printed so far (`murmur logs`).
    pub fn counted(&self, slug: &str) -> Vec<u64> {
        self.murmur_ok(&["logs", slug])
            .lines()
            .map(|l| l.trim().parse().expect("a number a line"))
            .collect()
    }

    /// Waits until a [`COUNTER`] agent printed more than `n` numbers, failing after
    /// [`PATIENCE`]; returns them all.
    pub fn wait_counted(&self, slug: &str, n: usize) -> Vec<u64> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let seen = self.counted(slug);
            if seen.len() > n {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "{slug} printed only {seen:?}\n{}",
                self.worker_log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The working directory of a VM (where agents' commands run).
    pub fn vm_root(&self, vm: &str) -> PathBuf {
        self.state_dir()
            .join("vms")
            .join(&self.tenant)
            .join(vm)
            .join("root")
    }

    /// Copies the worker logs of a failed test out of its directory (which is removed) into
    /// `<target>/tmp/failed/<tenant>/`, and says where.
    fn keep_logs(&self) {
        let keep = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("failed")
            .join(&self.tenant);
        if std::fs::create_dir_all(&keep).is_err() {
            return;
        }
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for entry in entries.filter_map(Result::ok) {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "log") {
                    let _ = std::fs::copy(&path, keep.join(entry.file_name()));
                }
            }
        }
        eprintln!("worker logs of this test kept in {}", keep.display());
    }

    pub fn worker_log_tail(&self) -> String {
        log_tail(&self.dir.path().join("worker.log"))
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.kill_worker();
        if std::thread::panicking() {
            self.keep_logs();
        }
        let hosts: Vec<String> = self.hosts.iter().map(|(h, _)| h.clone()).collect();
        for host in &hosts {
            self.kill_host(host);
            self.delete_all_vms(self.host_state_dir(host));
        }
        let _ = self.temporal(&[
            "workflow",
            "terminate",
            "--workflow-id",
            &format!("{}-hosts", self.task_queue),
            "--reason",
            "test finished",
        ]);
        let _ = self.temporal(&[
            "workflow",
            "terminate",
            "--query",
            &format!(
                "MurmurTenant = '{}' AND ExecutionStatus = 'Running'",
                self.tenant
            ),
            "--reason",
            "test finished",
            "--yes",
        ]);
        let _ = self.temporal(&[
            "workflow",
            "terminate",
            "--workflow-id",
            &format!("pool/{}", self.tenant),
            "--reason",
            "test finished",
        ]);
        self.delete_all_vms(self.state_dir());
    }
}

/// The last 40 lines of the worker log `path`, headed.
pub fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    format!(
        "--- worker log (tail) ---\n{}",
        lines[lines.len().saturating_sub(40)..].join("\n")
    )
}

/// An in-process Temporal client of the server at `address` (the shared dev server when
/// `None`), for checks that read often.
pub async fn temporal_client(address: Option<&str>) -> Result<temporalio_client::Client, String> {
    use temporalio_client::{Client, ClientOptions, Connection, ConnectionOptions};
    let address = address
        .map(str::to_string)
        .or_else(|| std::env::var("TEMPORAL_ADDRESS").ok())
        .unwrap_or_else(|| "localhost:7233".to_string());
    let target = url::Url::parse(&format!("http://{address}")).map_err(|e| e.to_string())?;
    let connection = Connection::connect(ConnectionOptions::new(target).build())
        .await
        .map_err(|e| e.to_string())?;
    Client::new(connection, ClientOptions::new("default").build()).map_err(|e| e.to_string())
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Warm VMs of every workspace.
pub fn warm(st: &PoolStatus) -> u32 {
    st.workspaces
        .iter()
        .flat_map(|w| &w.groups)
        .map(|g| g.warm)
        .sum()
}

/// The ids of the pool's VMs in a given state.
pub fn ids_in(st: &PoolStatus, state: murmur_workflows::model::VmState) -> Vec<String> {
    st.vms
        .iter()
        .filter(|v| v.state == state)
        .map(|v| v.id.0.clone())
        .collect()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

impl TestEnv {
    /// Run ids of `pool/<tenant>`, oldest first.
    pub fn pool_runs(&self) -> Vec<String> {
        self.runs_of(&format!("pool/{}", self.tenant))
    }

    /// Run ids of workflow `id`, oldest first.
    pub fn runs_of(&self, id: &str) -> Vec<String> {
        let out = self.temporal(&[
            "workflow",
            "list",
            "--query",
            &format!("WorkflowId = '{id}'"),
            "-o",
            "json",
        ]);
        let mut runs: Vec<(String, String)> =
            serde_json::from_str::<Vec<serde_json::Value>>(&stdout(&out))
                .unwrap_or_default()
                .into_iter()
                .filter_map(|w| {
                    Some((
                        w["startTime"].as_str()?.to_string(),
                        w["execution"]["runId"].as_str()?.to_string(),
                    ))
                })
                .collect();
        runs.sort();
        runs.into_iter().map(|(_, r)| r).collect()
    }

    /// The sandbox directory of a VM of this tenant.
    pub fn vm_dir(&self, vm: &str) -> PathBuf {
        self.state_dir().join("vms").join(&self.tenant).join(vm)
    }
}
