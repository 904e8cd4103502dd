//! A Temporal dev server of a test's own (the chaos and replay tests restart it).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::PATIENCE;

/// A Temporal dev server of this test's own, so restarting it disturbs no other test.
pub struct PrivateServer {
    dir: PathBuf,
    port: u16,
    extra: Vec<String>,
    child: Option<Child>,
}

impl PrivateServer {
    /// Starts a dev server with its database in `dir`; `extra` are more `start-dev` flags.
    pub fn start(dir: PathBuf, extra: &[&str]) -> Self {
        let port = free_port();
        let mut s = Self {
            dir,
            port,
            extra: extra.iter().map(|e| e.to_string()).collect(),
            child: None,
        };
        s.launch();
        s
    }

    /// Where it listens.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server process on the same port and database.
    pub fn launch(&mut self) {
        let cli = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/temporal");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .unwrap();
        let child = Command::new(&cli)
            .args(["server", "start-dev", "--ip", "127.0.0.1", "--headless"])
            .args(["--port", &self.port.to_string()])
            .args([
                "--db-filename",
                &self.dir.join("t.db").display().to_string(),
            ])
            .args(["--log-level", "error"])
            .args(["--search-attribute", "MurmurTenant=Keyword"])
            .args(["--search-attribute", "MurmurWorkspace=Keyword"])
            .args(["--search-attribute", "MurmurKind=Keyword"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start a private dev server");
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE;
        loop {
            let out = Command::new(&cli)
                .args([
                    "operator",
                    "cluster",
                    "health",
                    "--address",
                    &self.address(),
                ])
                .output()
                .expect("temporal operator cluster health");
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "private dev server never came up"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Stops the server (SIGTERM) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}
