//! Progress on long waits: a spinner with a live message on a terminal, plain lines (one per
//! change) otherwise, and Ctrl-C that stops waiting without cancelling what the server does.

use std::future::Future;
use std::io::IsTerminal as _;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Exit status after Ctrl-C (128 + SIGINT).
pub const EXIT_INTERRUPTED: i32 = 130;

/// Off a terminal, progress lines start only once a wait has lasted this long (short
/// operations stay quiet, so scripts see just the result).
const QUIET_FOR: Duration = Duration::from_secs(2);

/// A progress display on stderr.
pub struct Progress {
    bar: Option<ProgressBar>,
    last: String,
    started: std::time::Instant,
}

impl Progress {
    /// Starts showing `message`.
    pub fn start(message: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        let mut p = Self {
            bar,
            last: String::new(),
            started: std::time::Instant::now(),
        };
        p.set(message);
        p
    }

    /// Shows `message` (off a terminal: a plain line when it changed, once the wait has
    /// lasted a couple of seconds).
    pub fn set(&mut self, message: &str) {
        if message == self.last {
            return;
        }
        match &self.bar {
            Some(bar) => bar.set_message(message.to_string()),
            None if self.started.elapsed() < QUIET_FOR => return,
            None => eprintln!("{message}"),
        }
        self.last = message.to_string();
    }

    /// Removes the spinner.
    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Runs `work` until it finishes or Ctrl-C; on Ctrl-C says that `what` goes on on the server
/// (and how to follow it) and exits with 130.
pub async fn until_interrupted<T>(work: impl Future<Output = T>, what: &str, follow: &str) -> T {
    tokio::select! {
        out = work => out,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\nStopped waiting; {what} goes on in the worker ({follow}).");
            std::process::exit(EXIT_INTERRUPTED);
        }
    }
}
