//! Driving `murmur shell` in a real terminal: a detached tmux session runs the CLI, the test
//! types into it (`send-keys`) and reads the screen (`capture-pane`).

use std::process::Command;
use std::time::{Duration, Instant};

use super::{PATIENCE, TestEnv, stderr};

/// Waits until a line of the tmux pane is the shell's prompt (`#` or `$`; the pane's lines come
/// without trailing blanks).
pub fn wait_prompt(session: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", session])
            .output()
            .unwrap();
        let pane = String::from_utf8_lossy(&out.stdout).into_owned();
        // `#` as root (CI), `$` for anyone else.
        if pane.lines().any(|l| matches!(l.trim_end(), "#" | "$")) {
            return;
        }
        assert!(Instant::now() < deadline, "no prompt in the pane:\n{pane}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the tmux pane shows `text`.
pub fn wait_pane(session: &str, text: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", session])
            .output()
            .unwrap();
        let pane = String::from_utf8_lossy(&out.stdout).into_owned();
        if pane.contains(text) {
            return pane;
        }
        assert!(
            Instant::now() < deadline,
            "the pane never showed {text:?}:\n{pane}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `tmux` with `args`; it must succeed.
pub fn tmux(args: &[&str]) {
    let out = Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux is required for the murmur shell test (./devserver.sh test installs it)");
    assert!(out.status.success(), "tmux {args:?}: {}", stderr(&out));
}

/// The `murmur shell <slug>` command line a tmux pane runs, with the test's environment.
pub fn shell_command(env: &TestEnv, slug: &str) -> String {
    let cmd = env.murmur_cmd(&["shell", slug]);
    let mut line = format!("cd {} &&", cmd.get_current_dir().unwrap().display());
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            line.push_str(&format!(
                " {}='{}'",
                k.to_string_lossy(),
                v.to_string_lossy()
            ));
        }
    }
    line.push_str(&format!(" {} shell {slug}", env!("CARGO_BIN_EXE_murmur")));
    line
}

/// Kills a tmux session when dropped (a failed test leaves no pane behind).
pub struct KillSession(pub String);

impl Drop for KillSession {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .output();
    }
}
