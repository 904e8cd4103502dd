//! The control channel to the guest agent (`activities/images/qemu/murmur-agent`).
//!
//! The host connects per operation (the chardev serves one client at a time) and sends
//! `<verb> <tag> <args>` with a fresh tag; it skips every line until `@<tag> <answer>`, so a
//! stale answer, a leftover handshake line or any other junk on the line never confuses it.
//! Payloads are single-line base64; a command is rendered into a shell script here (POSIX
//! quoting), so the guest never parses JSON.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use murmur_workflows::model::VmId;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::substrate::{CommandSpec, CommandStatus, Ready};

/// How long one control-channel request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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
        let line = if args.is_empty() {
            format!("{verb} {tag}\n")
        } else {
            format!("{verb} {tag} {args}\n")
        };
        write.write_all(line.as_bytes()).await?;
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
async fn handshake_once(socket: &Path) -> Result<Ready, ChannelError> {
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut buf = Vec::new();
    loop {
        let tag = next_tag();
        write.write_all(format!("ping {tag}\n").as_bytes()).await?;
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
