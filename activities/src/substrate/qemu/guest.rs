//! The control channel to the guest agent (`activities/images/qemu/murmur-agent`).
//!
//! The host connects per operation (the chardev serves one client at a time) and sends
//! `<verb> <tag> <args>` with a fresh tag; it skips every line until `@<tag> <answer>`, so a
//! stale answer, a leftover handshake line or any other junk on the line never confuses it.
//! Payloads are single-line base64 (`-` for an empty one, so every answer splits on spaces);
//! a command is rendered into a shell script here (POSIX quoting), so the guest never parses
//! JSON.
//!
//! Every request starts with a newline too ([`request_line`]). The serial port passes a
//! line on in pieces (a FIFO's worth at a time, as the guest reads them), and when a
//! connection closes qemu drops whatever it has not passed on yet: a handshake that returns
//! at its first ready line while a later ping is on its way, or a request given up on, can
//! leave the guest holding the start of a line. Without the newline the next request would
//! end that line: `ping 12` + `read 34 r1 0 9` reads as a ping tagged `12read`, and the
//! request is never answered. The agent skips the empty line the newline makes otherwise.
//! (The agent also reads each request as it arrives, so it keeps no child of its own that
//! could interrupt that read: see the comment on its request loop.)
//!
//! Besides the requests of runs (`run`, `status`, `tail`, `cancel`) the channel carries:
//!
//! - `read <run> <offset> <max>`: a run's output from any offset with its size and whether
//!   the run exited ([`parse_read`], [`GuestRead`]), at most [`READ_MAX`] bytes a request;
//! - `runs`: every agent run with its output size ([`parse_runs`]), what a delete keeps;
//! - exec sessions: `exec`, `input`, `eof`, `signal`, `poll` ([`parse_poll`], [`ExecPoll`])
//!   and `drop`, served by [`super::exec`];
//! - terminal sessions (`murmur shell`): `shell`, `winch`, `shsig`, `shpoll`
//!   ([`parse_shell_poll`]) and `shdrop`; the terminal itself is the guest's third serial
//!   port, whose byte stream ends with the exit marker [`ExitMarker`] looks for.
//!
//! The full list of requests and answers is at the top of the guest agent.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use murmur_workflows::model::VmId;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::substrate::session::OutputChunk;
use crate::substrate::vm_dir::valid_run_id;
use crate::substrate::{CommandSpec, CommandStatus, Ready};

/// How long one control-channel request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Most output bytes one `read` request returns (the guest caps it too): 64 KiB of base64,
/// so an answer line stays bounded.
pub const READ_MAX: usize = 48 * 1024;

/// Most bytes of each stream one exec `poll` returns (the guest caps it too).
pub const POLL_MAX: usize = 24 * 1024;

/// Most stdin bytes one exec `input` request carries.
pub const STDIN_CHUNK: usize = 24 * 1024;

/// Failures of the control channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The socket could not be reached or broke.
    #[error("control channel: {0}")]
    Io(#[from] std::io::Error),
    /// No answer in time.
    #[error("control channel: no answer within {0:?}")]
    Timeout(Duration),
    /// The guest answered `err <reason>`.
    #[error("guest agent: {0}")]
    Refused(String),
    /// The guest answered something this host does not understand.
    #[error("guest agent: unexpected answer {0:?}")]
    Unexpected(String),
}

static TAGS: AtomicU64 = AtomicU64::new(1);

/// A fresh request tag (alphanumeric, unique per worker process and request).
pub fn next_tag() -> String {
    format!(
        "{:x}x{:x}",
        std::process::id(),
        TAGS.fetch_add(1, Ordering::Relaxed)
    )
}

/// One request on the control channel: connect, send `<verb> <tag> <args>`, return the rest
/// of the line `@<tag> <answer>`, skipping every other line. `err <reason>` is a refusal.
pub async fn request(
    socket: &Path,
    verb: &str,
    args: &str,
    timeout: Duration,
) -> Result<String, ChannelError> {
    let tag = next_tag();
    let work = async {
        let stream = tokio::net::UnixStream::connect(socket).await?;
        let (read, mut write) = stream.into_split();
        write
            .write_all(request_line(verb, &tag, args).as_bytes())
            .await?;
        let mut reader = BufReader::new(read);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            if reader.read_until(b'\n', &mut buf).await? == 0 {
                return Err(ChannelError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "control channel closed",
                )));
            }
            if let Some(answer) = parse_answer(&buf, &tag) {
                return match answer.strip_prefix("err") {
                    Some(reason) => Err(ChannelError::Refused(reason.trim().to_string())),
                    None => Ok(answer),
                };
            }
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ChannelError::Timeout(timeout))?
}

/// The bytes of one request: `<verb> <tag> <args>` (no args: `<verb> <tag>`) on a line of
/// its own, that is after a newline as well (see the module docs).
pub fn request_line(verb: &str, tag: &str, args: &str) -> String {
    if args.is_empty() {
        format!("\n{verb} {tag}\n")
    } else {
        format!("\n{verb} {tag} {args}\n")
    }
}

/// The answer in `line` when it is `@<tag> <answer>` for this tag.
pub fn parse_answer(line: &[u8], tag: &str) -> Option<String> {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches(['\r', '\n']);
    let rest = text.strip_prefix('@')?.strip_prefix(tag)?;
    if rest.is_empty() {
        return Some(String::new());
    }
    rest.strip_prefix(' ').map(str::to_string)
}

/// Parses a readiness answer: `ready <vm> <image>` (the agent's first line, or its answer to
/// `ping`).
pub fn parse_ready(answer: &str) -> Option<Ready> {
    let mut words = answer.split_whitespace();
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("ready"), Some(vm), Some(image), None) => Some(Ready {
            vm: VmId(vm.to_string()),
            image: image.to_string(),
        }),
        _ => None,
    }
}

/// Decodes `data <base64>`.
pub fn decode_data(answer: &str) -> Result<Vec<u8>, String> {
    let payload = answer
        .strip_prefix("data")
        .ok_or_else(|| format!("unexpected answer {:?}", truncate(answer, 80)))?
        .trim();
    base64::engine::general_purpose::STANDARD
        .decode(payload)
        .map_err(|e| format!("malformed data: {e}"))
}

/// Decodes one base64 word of an answer (`-`: nothing).
pub fn decode_word(word: &str) -> Result<Vec<u8>, String> {
    if word == "-" {
        return Ok(Vec::new());
    }
    base64::engine::general_purpose::STANDARD
        .decode(word)
        .map_err(|e| format!("malformed data: {e}"))
}

/// What a `read` request answered: `out <size> <exited 0|1> <b64|->`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestRead {
    /// The output's size when the guest looked (before reading, so `data` may reach past it).
    pub size: u64,
    /// True when the run had exited before the bytes were read: the output is final.
    pub exited: bool,
    /// The bytes from the requested offset.
    pub data: Vec<u8>,
}

impl GuestRead {
    /// The chunk this answer makes for a read from `offset` (offsets past the end read as
    /// the end, like [`crate::substrate::session::read_at`]).
    pub fn into_chunk(self, offset: u64) -> OutputChunk {
        let len = self.data.len() as u64;
        let start = if len == 0 {
            offset.min(self.size)
        } else {
            offset
        };
        let next = start + len;
        OutputChunk {
            data: self.data,
            next,
            size: self.size.max(next),
            complete: self.exited,
        }
    }
}

/// Parses a `read` answer; `Ok(None)` when the guest knows no such run.
pub fn parse_read(answer: &str) -> Result<Option<GuestRead>, String> {
    let unexpected = || format!("unexpected answer {:?}", truncate(answer, 80));
    let words: Vec<&str> = answer.split_whitespace().collect();
    match words.as_slice() {
        ["unknown"] => Ok(None),
        ["out", size, exited, data] => Ok(Some(GuestRead {
            size: size.parse().map_err(|_| unexpected())?,
            exited: match *exited {
                "0" => false,
                "1" => true,
                _ => return Err(unexpected()),
            },
            data: decode_word(data)?,
        })),
        _ => Err(unexpected()),
    }
}

/// Parses a `runs` answer: `runs <run>:<output size> ...` (invalid run ids are skipped).
pub fn parse_runs(answer: &str) -> Result<Vec<(String, u64)>, String> {
    let mut words = answer.split_whitespace();
    if words.next() != Some("runs") {
        return Err(format!("unexpected answer {:?}", truncate(answer, 80)));
    }
    Ok(words
        .filter_map(|w| {
            let (run, size) = w.rsplit_once(':')?;
            (valid_run_id(run)).then_some((run.to_string(), size.parse().ok()?))
        })
        .collect())
}

/// What an exec `poll` answered: `exec <code|-> <fed> <stdout b64|-> <stderr b64|->`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecPoll {
    /// The exit code once the command exited (looked at before the streams were read, so
    /// bytes read with an exit code are final).
    pub exit: Option<i32>,
    /// The last stdin chunk the guest copied into the command's stdin (0: none yet; may
    /// read 0 while the guest rewrites it, so keep the highest seen).
    pub fed: u64,
    /// New stdout bytes from the requested offset.
    pub stdout: Vec<u8>,
    /// New stderr bytes from the requested offset.
    pub stderr: Vec<u8>,
}

/// Parses an exec `poll` answer; `Ok(None)` when the guest knows no such session.
pub fn parse_poll(answer: &str) -> Result<Option<ExecPoll>, String> {
    let unexpected = || format!("unexpected answer {:?}", truncate(answer, 80));
    let words: Vec<&str> = answer.split_whitespace().collect();
    match words.as_slice() {
        ["unknown"] => Ok(None),
        ["exec", code, fed, stdout, stderr] => Ok(Some(ExecPoll {
            exit: match *code {
                "-" => None,
                code => Some(code.parse().map_err(|_| unexpected())?),
            },
            fed: fed.parse().map_err(|_| unexpected())?,
            stdout: decode_word(stdout)?,
            stderr: decode_word(stderr)?,
        })),
        _ => Err(unexpected()),
    }
}

/// A fresh exec session id: alphanumeric like a run id (the time, this process and a
/// counter), so sessions of a restarted worker never meet an old one's directory.
pub fn new_exec_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "e{nanos:x}{:x}n{:x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Parses a `shpoll` answer (`shell <code|->`): `Ok(Some(None))` while the shell runs,
/// `Ok(Some(Some(code)))` once it exited, `Ok(None)` when the guest knows no such session.
pub fn parse_shell_poll(answer: &str) -> Result<Option<Option<i32>>, String> {
    let unexpected = || format!("unexpected answer {:?}", truncate(answer, 80));
    let words: Vec<&str> = answer.split_whitespace().collect();
    match words.as_slice() {
        ["unknown"] => Ok(None),
        ["shell", "-"] => Ok(Some(None)),
        ["shell", code] => Ok(Some(Some(code.parse().map_err(|_| unexpected())?))),
        _ => Err(unexpected()),
    }
}

/// Finds the end of a terminal session in the bytes of its serial line: the guest writes
/// `ESC _ murmur-exit:<id>:<code> ESC \` (an APC string, which terminals ignore) after
/// everything the shell wrote. [`ExitMarker::feed`] passes every other byte on, holding back
/// only what may be the start of the marker until the next bytes tell.
#[derive(Debug)]
pub struct ExitMarker {
    prefix: Vec<u8>,
    held: Vec<u8>,
}

impl ExitMarker {
    /// The marker of session `id`.
    pub fn new(id: &str) -> Self {
        Self {
            prefix: format!("\x1b_murmur-exit:{id}:").into_bytes(),
            held: Vec::new(),
        }
    }

    /// Takes the next bytes of the line: returns what is the terminal's output, and the exit
    /// code once the marker is complete (whatever follows it is dropped).
    pub fn feed(&mut self, data: &[u8]) -> (Vec<u8>, Option<i32>) {
        self.held.extend_from_slice(data);
        let mut out = Vec::new();
        loop {
            let Some(at) = find(&self.held, &self.prefix) else {
                // Keep the longest end that could still grow into the marker.
                let keep = (1..self.prefix.len().min(self.held.len() + 1))
                    .rev()
                    .find(|k| self.held.ends_with(&self.prefix[..*k]))
                    .unwrap_or(0);
                let cut = self.held.len() - keep;
                out.extend(self.held.drain(..cut));
                return (out, None);
            };
            let rest = &self.held[at + self.prefix.len()..];
            let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
            let tail = &rest[digits..];
            let complete = (1..=3).contains(&digits) && tail.starts_with(b"\x1b\\");
            if complete {
                let code = std::str::from_utf8(&rest[..digits])
                    .ok()
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(-1);
                out.extend_from_slice(&self.held[..at]);
                self.held.clear();
                return (out, Some(code));
            }
            let pending = digits <= 3 && (tail.is_empty() || (digits > 0 && tail == b"\x1b"));
            if pending {
                out.extend(self.held.drain(..at));
                return (out, None);
            }
            // Not the marker after all: its first byte is output, look again after it.
            out.extend(self.held.drain(..=at));
        }
    }

    /// True when bytes are held back (a possible start of the marker).
    pub fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Gives up waiting for the rest of a possible marker: the held bytes are output.
    pub fn flush(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }
}

/// The first position of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses a `status` answer.
pub fn parse_status(answer: &str) -> Option<CommandStatus> {
    let mut words = answer.split_whitespace();
    match (words.next(), words.next()) {
        (Some("running"), None) => Some(CommandStatus::Running),
        (Some("unknown"), None) => Some(CommandStatus::Unknown),
        (Some("exited"), Some(code)) => code.parse().ok().map(CommandStatus::Exited),
        _ => None,
    }
}

/// Quotes a word for a POSIX shell.
pub fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r#"'\''"#))
}

/// The shell script the guest agent runs for a command: exports, then the command (one word
/// through `sh -c`, several executed as given). Env names must be shell identifiers.
pub fn command_script(spec: &CommandSpec, cwd: &str) -> Result<String, String> {
    if spec.argv.is_empty() {
        return Err("empty command".into());
    }
    let mut script = String::new();
    for (key, value) in &spec.env {
        let valid = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!("invalid environment variable name {key:?}"));
        }
        script.push_str(&format!("export {key}={}\n", shell_quote(value)));
    }
    script.push_str(&format!("cd {}\n", shell_quote(cwd)));
    if spec.argv.len() == 1 {
        script.push_str(&format!("exec /bin/sh -c {}\n", shell_quote(&spec.argv[0])));
    } else {
        let words: Vec<String> = spec.argv.iter().map(|w| shell_quote(w)).collect();
        script.push_str(&format!("exec {}\n", words.join(" ")));
    }
    Ok(script)
}

/// Connects to a booting guest and pings until it answers `ready`, at most `timeout`.
/// Accepts the agent's own first line as well as the answer to a ping (that line goes to
/// whoever is connected when it is written, possibly nobody).
pub async fn handshake(socket: &Path, timeout: Duration) -> Result<Ready, ChannelError> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ChannelError::Timeout(timeout));
        }
        if let Ok(Ok(ready)) = tokio::time::timeout(left, handshake_once(socket)).await {
            return Ok(ready);
        }
        tokio::time::sleep(Duration::from_millis(50).min(left)).await;
    }
}

/// One connection: ping every 250 ms until a ready line arrives (or the connection breaks).
/// Returns at the first ready line, with later pings possibly still on their way: the guest
/// answers what it gets of them to nobody (or to the next request, which skips them), and a
/// ping cut short by the close is ended by the next request's leading newline.
async fn handshake_once(socket: &Path) -> Result<Ready, ChannelError> {
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut buf = Vec::new();
    loop {
        let tag = next_tag();
        write
            .write_all(request_line("ping", &tag, "").as_bytes())
            .await?;
        let until = Instant::now() + Duration::from_millis(250);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            buf.clear();
            match tokio::time::timeout(left, reader.read_until(b'\n', &mut buf)).await {
                Err(_) => break,
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(0)) => {
                    return Err(ChannelError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(Ok(_)) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\r', '\n']);
                    let answer = line
                        .strip_prefix('@')
                        .and_then(|l| l.split_once(' '))
                        .map_or(line, |(_, a)| a);
                    if let Some(ready) = parse_ready(answer) {
                        return Ok(ready);
                    }
                }
            }
        }
    }
}

/// The script that sets a guest's wall clock to `epoch` (seconds, UTC).
pub fn clock_script(epoch: u64) -> String {
    format!("date -u -s @{epoch} >/dev/null\n")
}

/// Sets the guest's wall clock to the host's, within `timeout`: [`clock_script`] in an exec
/// session (`exec`, `poll` until it exits, `drop`), so any guest agent can (it has no
/// request of its own for it). After a wake: the guest's clocks stood still while it slept,
/// and its wall clock would be behind by that long. To the second (busybox `date`), rounded.
pub async fn set_clock(socket: &Path, timeout: Duration) -> Result<(), ChannelError> {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let id = new_exec_id();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| ChannelError::Io(std::io::Error::other(e)))?;
    let epoch = (now + Duration::from_millis(500)).as_secs();
    let b64 = base64::engine::general_purpose::STANDARD.encode(clock_script(epoch));
    let ran = async {
        let answer = request(socket, "exec", &format!("{id} {b64}"), left()).await?;
        if answer != "ok" {
            return Err(ChannelError::Unexpected(truncate(&answer, 80).to_string()));
        }
        loop {
            let answer = request(socket, "poll", &format!("{id} 0 0 1024"), left()).await?;
            match parse_poll(&answer) {
                Ok(Some(ExecPoll { exit: Some(0), .. })) => return Ok(()),
                Ok(Some(ExecPoll {
                    exit: Some(code),
                    stderr,
                    ..
                })) => {
                    return Err(ChannelError::Refused(format!(
                        "date -s exited {code}: {}",
                        String::from_utf8_lossy(&stderr).trim()
                    )));
                }
                Ok(Some(_)) => {}
                Ok(None) => return Err(ChannelError::Refused("the session is gone".into())),
                Err(reason) => return Err(ChannelError::Unexpected(reason)),
            }
            if left().is_zero() {
                return Err(ChannelError::Timeout(timeout));
            }
            tokio::time::sleep(Duration::from_millis(20).min(left())).await;
        }
    }
    .await;
    // The session's directory goes whatever happened (a second at least for that).
    let _ = request(socket, "drop", &id, left().max(Duration::from_secs(1))).await;
    ran
}

/// At most the first `max` characters of `s` (for quoting an answer in an error).
pub fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_matched_by_tag_and_junk_is_skipped() {
        assert_eq!(parse_answer(b"@ab1 ok\n", "ab1").as_deref(), Some("ok"));
        assert_eq!(parse_answer(b"@ab1 ok\r\n", "ab1").as_deref(), Some("ok"));
        assert_eq!(parse_answer(b"@ab12 ok\n", "ab1"), None);
        assert_eq!(
            parse_answer(b"ready murmur-00000001 default\n", "ab1"),
            None
        );
        assert_eq!(parse_answer(b"\x00\xffgarbage\n", "ab1"), None);
        assert_eq!(
            parse_answer(b"@t9 exited 3\n", "t9").as_deref(),
            Some("exited 3")
        );
    }

    #[test]
    fn every_request_is_a_line_of_its_own() {
        assert_eq!(request_line("ping", "t1", ""), "\nping t1\n");
        assert_eq!(request_line("read", "t2", "r1 0 10"), "\nread t2 r1 0 10\n");
        // The start of a line that a closed connection left in the guest is ended before
        // the request, which the agent still reads whole.
        let guest_reads = format!("ping 12{}", request_line("read", "t3", "r1 0 9"));
        let lines: Vec<&str> = guest_reads.lines().collect();
        assert_eq!(lines, ["ping 12", "read t3 r1 0 9"]);
    }

    #[test]
    fn ready_status_and_data_parse() {
        let ready = parse_ready("ready murmur-0000abcd img-1234").expect("ready");
        assert_eq!(ready.vm.0, "murmur-0000abcd");
        assert_eq!(ready.image, "img-1234");
        assert!(parse_ready("ready murmur-0000abcd").is_none());
        assert!(parse_ready("ping 1").is_none());
        assert_eq!(parse_status("running"), Some(CommandStatus::Running));
        assert_eq!(parse_status("exited 143"), Some(CommandStatus::Exited(143)));
        assert_eq!(parse_status("unknown"), Some(CommandStatus::Unknown));
        assert_eq!(parse_status("exited x"), None);
        assert_eq!(decode_data("data aGkK").as_deref(), Ok(&b"hi\n"[..]));
        assert_eq!(decode_data("data ").as_deref(), Ok(&b""[..]));
        assert!(decode_data("data !!").is_err());
        assert!(decode_data("ok").is_err());
    }

    #[test]
    fn read_answers_parse_into_chunks() {
        let read = parse_read("out 11 0 aGVsbG8=")
            .expect("parse")
            .expect("known");
        assert_eq!(
            read,
            GuestRead {
                size: 11,
                exited: false,
                data: b"hello".to_vec()
            }
        );
        let chunk = read.into_chunk(0);
        assert_eq!((chunk.next, chunk.size, chunk.complete), (5, 11, false));
        // Nothing past the end: the next read starts at the end.
        let past = parse_read("out 11 1 -").expect("parse").expect("known");
        let chunk = past.into_chunk(99);
        assert_eq!((chunk.next, chunk.size, chunk.complete), (11, 11, true));
        assert!(chunk.data.is_empty());
        // The output grew between the size and the read: the size covers what was read.
        let grown = parse_read("out 2 0 aGVsbG8=")
            .expect("parse")
            .expect("known");
        assert_eq!(grown.into_chunk(0).size, 5);
        assert_eq!(parse_read("unknown"), Ok(None));
        assert!(parse_read("out x 0 -").is_err());
        assert!(parse_read("out 1 2 -").is_err());
        assert!(parse_read("out 1 0 !!").is_err());
        assert!(parse_read("out 1 0").is_err());
        assert!(parse_read("data aGk=").is_err());
    }

    #[test]
    fn runs_and_poll_answers_parse() {
        assert_eq!(
            parse_runs("runs r1:21 pack-1x2:0 bad/id:3 r2:x r3"),
            Ok(vec![("r1".to_string(), 21), ("pack-1x2".to_string(), 0)])
        );
        assert_eq!(parse_runs("runs"), Ok(vec![]));
        assert!(parse_runs("ok").is_err());
        assert_eq!(
            parse_poll("exec - 2 aGkK -"),
            Ok(Some(ExecPoll {
                exit: None,
                fed: 2,
                stdout: b"hi\n".to_vec(),
                stderr: Vec::new(),
            }))
        );
        let done = parse_poll("exec 130 0 - ZXJyCg==")
            .expect("parse")
            .expect("known");
        assert_eq!(
            (done.exit, done.stderr.as_slice()),
            (Some(130), &b"err\n"[..])
        );
        assert_eq!(parse_poll("unknown"), Ok(None));
        assert!(parse_poll("exec x 0 - -").is_err());
        assert!(parse_poll("exec - 0 -").is_err());
        assert!(parse_poll("exec - 0 - !!").is_err());
        let id = new_exec_id();
        assert!(valid_run_id(&id), "{id}");
        assert_ne!(id, new_exec_id());
    }

    #[test]
    fn shell_polls_parse() {
        assert_eq!(parse_shell_poll("shell -"), Ok(Some(None)));
        assert_eq!(parse_shell_poll("shell 3"), Ok(Some(Some(3))));
        assert_eq!(parse_shell_poll("unknown"), Ok(None));
        assert!(parse_shell_poll("shell x").is_err());
        assert!(parse_shell_poll("exec - 0 - -").is_err());
    }

    #[test]
    fn the_exit_marker_ends_the_stream_wherever_it_is_cut() {
        let stream = b"a\x1b[Jb\x1b_other\x1b\\ # exit 3\r\n\x1b_murmur-exit:e1:3\x1b\\junk";
        let shown = b"a\x1b[Jb\x1b_other\x1b\\ # exit 3\r\n";
        // Every way of cutting the stream in two gives the same output and code.
        for cut in 0..stream.len() {
            let mut marker = ExitMarker::new("e1");
            let (mut out, code) = marker.feed(&stream[..cut]);
            let code = match code {
                Some(code) => Some(code),
                None => {
                    let (more, code) = marker.feed(&stream[cut..]);
                    out.extend(more);
                    code
                }
            };
            assert_eq!(
                (out.as_slice(), code),
                (&shown[..], Some(3)),
                "cut at {cut}"
            );
        }
        // Byte by byte.
        let mut marker = ExitMarker::new("e1");
        let mut out = Vec::new();
        let mut code = None;
        for b in stream {
            let (more, c) = marker.feed(std::slice::from_ref(b));
            out.extend(more);
            if c.is_some() {
                code = c;
                break;
            }
        }
        assert_eq!((out.as_slice(), code), (&shown[..], Some(3)));
        // Another session's marker, or a lone ESC at the end, is output (held, then flushed).
        let mut marker = ExitMarker::new("e1");
        let (out, code) = marker.feed(b"x\x1b_murmur-exit:e2:0\x1b\\y\x1b");
        assert_eq!(
            (out.as_slice(), code),
            (&b"x\x1b_murmur-exit:e2:0\x1b\\y"[..], None)
        );
        assert!(marker.holding());
        assert_eq!(marker.flush(), b"\x1b");
        assert!(!marker.holding());
        let long = b"\x1b_murmur-exit:e1:12345\x1b\\";
        let (out, code) = marker.feed(long);
        assert_eq!((out.as_slice(), code), (&long[..], None));
    }

    #[test]
    fn command_scripts_quote_everything() {
        let spec = CommandSpec {
            run: "r1".into(),
            argv: vec!["echo 'it''s' $MURMUR_AGENT".into()],
            env: vec![("MURMUR_AGENT".into(), "a'b".into())],
        };
        let script = command_script(&spec, "/root").expect("script");
        assert_eq!(
            script,
            "export MURMUR_AGENT='a'\\''b'\ncd '/root'\nexec /bin/sh -c 'echo '\\''it'\\'''\\''s'\\'' $MURMUR_AGENT'\n"
        );
        let multi = CommandSpec {
            run: "r2".into(),
            argv: vec!["printf".into(), "%s\n".into(), "x y".into()],
            env: vec![],
        };
        assert!(
            command_script(&multi, "/")
                .expect("script")
                .ends_with("exec 'printf' '%s\n' 'x y'\n")
        );
        assert_eq!(
            clock_script(1700000000),
            "date -u -s @1700000000 >/dev/null\n"
        );
        let bad = CommandSpec {
            run: "r3".into(),
            argv: vec!["true".into()],
            env: vec![("A B".into(), "x".into())],
        };
        assert!(command_script(&bad, "/").is_err());
        let empty = CommandSpec {
            run: "r4".into(),
            argv: vec![],
            env: vec![],
        };
        assert!(command_script(&empty, "/").is_err());
    }
}
