//! A QMP client (the QEMU Machine Protocol) over a VM's unix socket, `qmp.sock`: what sleep
//! and wake use to pause a guest, save it to a file, restore it and end qemu.
//!
//! QMP is JSON, one object a line. On connect qemu sends a greeting (`{"QMP": ...}`), and
//! nothing but `qmp_capabilities` is accepted before it is answered. Every command then gets
//! exactly one answer, `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}`,
//! carrying back the `id` it was sent with; asynchronous events (`{"event": ...}`) may come
//! at any time in between and are skipped, as are answers to other ids (a command that timed
//! out earlier). Every exchange has a timeout, and lines are bounded ([`MAX_LINE`]).
//!
//! qemu serves one QMP client at a time on the socket: a second connection is accepted by
//! the kernel but greeted only once the first one closes (so it times out meanwhile).

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// The longest line accepted from qemu (a `query-migrate` answer is about 1 KiB).
pub const MAX_LINE: usize = 1024 * 1024;

/// Failures of a QMP exchange.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached or broke.
    #[error("qmp: {0}")]
    Io(#[from] std::io::Error),
    /// No answer in time.
    #[error("qmp: no answer within {0:?}")]
    Timeout(Duration),
    /// qemu closed the connection (it is quitting, or gone).
    #[error("qmp: connection closed")]
    Closed,
    /// qemu refused the command.
    #[error("qmp: {command}: {desc} ({class})")]
    Command {
        /// The command.
        command: String,
        /// qemu's error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// What qemu said.
        desc: String,
    },
    /// A line that is not QMP (or the greeting missing).
    #[error("qmp: unexpected message {0:?}")]
    Protocol(String),
}

/// One message from qemu.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// The greeting sent on connect.
    Greeting,
    /// An asynchronous event (`STOP`, `RESUME`, `SHUTDOWN`, ...), by name.
    Event(String),
    /// A command's success, with the `id` it was sent with (if any).
    Return {
        /// The id echoed back.
        id: Option<Value>,
        /// The `return` value.
        value: Value,
    },
    /// A command's failure, with the `id` it was sent with (if any).
    Error {
        /// The id echoed back.
        id: Option<Value>,
        /// qemu's error class.
        class: String,
        /// What qemu said.
        desc: String,
    },
}

/// Parses one line from qemu.
pub fn parse_message(line: &[u8]) -> Result<Message, String> {
    let text = String::from_utf8_lossy(line);
    let unexpected = || {
        let mut s: String = text.trim().chars().take(120).collect();
        if text.trim().chars().count() > 120 {
            s.push('…');
        }
        s
    };
    let value: Value = serde_json::from_slice(line).map_err(|_| unexpected())?;
    let Some(object) = value.as_object() else {
        return Err(unexpected());
    };
    let id = object.get("id").cloned();
    if object.contains_key("QMP") {
        Ok(Message::Greeting)
    } else if let Some(event) = object.get("event") {
        Ok(Message::Event(
            event.as_str().unwrap_or_default().to_string(),
        ))
    } else if let Some(value) = object.get("return") {
        Ok(Message::Return {
            id,
            value: value.clone(),
        })
    } else if let Some(error) = object.get("error") {
        let field = |name: &str| {
            error
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        Ok(Message::Error {
            id,
            class: field("class"),
            desc: field("desc"),
        })
    } else {
        Err(unexpected())
    }
}

/// An open QMP session (greeted, capabilities negotiated).
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    timeout: Duration,
    next_id: u64,
}

impl Qmp {
    /// Connects to `socket`, reads the greeting and negotiates capabilities; every exchange
    /// (this one included) may take `timeout`.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(socket))
            .await
            .map_err(|_| QmpError::Timeout(timeout))??;
        let (read, writer) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(read),
            writer,
            timeout,
            next_id: 1,
        };
        let greeting = tokio::time::timeout(timeout, qmp.read_message())
            .await
            .map_err(|_| QmpError::Timeout(timeout))??;
        if greeting != Message::Greeting {
            return Err(QmpError::Protocol(format!(
                "{greeting:?} before the greeting"
            )));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs `command` (with `arguments`, an object) and returns its `return` value; qemu's
    /// `error` is [`QmpError::Command`].
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        let timeout = self.timeout;
        let work = async {
            self.writer.write_all(line.as_bytes()).await?;
            loop {
                match self.read_message().await? {
                    Message::Return { id: got, value } if answers(got.as_ref(), id) => {
                        return Ok(value);
                    }
                    Message::Error {
                        id: got,
                        class,
                        desc,
                    } if answers(got.as_ref(), id) => {
                        return Err(QmpError::Command {
                            command: command.to_string(),
                            class,
                            desc,
                        });
                    }
                    // Events, a late answer to an earlier command, a repeated greeting.
                    _ => {}
                }
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| QmpError::Timeout(timeout))?
    }

    /// Reads the next message (at most [`MAX_LINE`] bytes).
    async fn read_message(&mut self) -> Result<Message, QmpError> {
        let mut line = Vec::new();
        loop {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                return Err(QmpError::Closed);
            }
            let (taken, done) = match available.iter().position(|b| *b == b'\n') {
                Some(at) => (at + 1, true),
                None => (available.len(), false),
            };
            line.extend_from_slice(&available[..taken]);
            self.reader.consume(taken);
            if line.len() > MAX_LINE {
                return Err(QmpError::Protocol(format!(
                    "a line longer than {MAX_LINE} bytes"
                )));
            }
            if done {
                break;
            }
        }
        parse_message(&line).map_err(QmpError::Protocol)
    }
}

/// True when an answer carrying `got` answers the command sent with `id`. An answer without
/// an id is qemu failing to read the command at all (it cannot echo what it did not parse).
fn answers(got: Option<&Value>, id: u64) -> bool {
    got.is_none_or(|got| got.as_u64() == Some(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_into_messages() {
        let greeting = br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;
        assert_eq!(parse_message(greeting), Ok(Message::Greeting));
        assert_eq!(
            parse_message(br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#),
            Ok(Message::Event("STOP".into()))
        );
        assert_eq!(
            parse_message(b"{\"return\": {}, \"id\": 3}\r\n"),
            Ok(Message::Return {
                id: Some(json!(3)),
                value: json!({})
            })
        );
        assert_eq!(
            parse_message(br#"{"return": {"status": "running", "running": true}}"#),
            Ok(Message::Return {
                id: None,
                value: json!({"status": "running", "running": true})
            })
        );
        assert_eq!(
            parse_message(
                br#"{"id": 4, "error": {"class": "GenericError", "desc": "There's a migration process in progress"}}"#
            ),
            Ok(Message::Error {
                id: Some(json!(4)),
                class: "GenericError".into(),
                desc: "There's a migration process in progress".into()
            })
        );
        assert!(parse_message(b"not json").is_err());
        assert!(parse_message(b"[1, 2]").is_err());
        assert!(parse_message(br#"{"something": "else"}"#).is_err());
        let long = format!("{{\"x\": \"{}\"}}", "y".repeat(500));
        let err = parse_message(long.as_bytes()).expect_err("not QMP");
        assert!(err.chars().count() <= 121, "{err}");
    }

    #[test]
    fn answers_match_their_command() {
        assert!(answers(Some(&json!(7)), 7));
        assert!(!answers(Some(&json!(6)), 7));
        assert!(!answers(Some(&json!("7")), 7));
        assert!(answers(None, 7));
    }

    /// A fake qemu on a socket pair: events and a stale answer are skipped, errors carry
    /// qemu's description, a closed connection is an error.
    #[tokio::test]
    async fn a_session_skips_events_and_stale_answers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            write
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .expect("greet");
            let mut seen = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                let request: Value = serde_json::from_str(&line).expect("json");
                let id = request["id"].as_u64().expect("id");
                let command = request["execute"].as_str().expect("execute").to_string();
                seen.push((command.clone(), request.get("arguments").cloned()));
                let answer = match command.as_str() {
                    "qmp_capabilities" => format!("{{\"return\": {{}}, \"id\": {id}}}\n"),
                    "query-status" => format!(
                        "{{\"event\": \"RESUME\"}}\n{{\"return\": {{}}, \"id\": {}}}\n\
                         {{\"return\": {{\"status\": \"running\"}}, \"id\": {id}}}\n",
                        id + 100
                    ),
                    "migrate" => format!(
                        "{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"no\"}}, \"id\": {id}}}\n"
                    ),
                    _ => break,
                };
                write.write_all(answer.as_bytes()).await.expect("answer");
            }
            seen
        });
        let mut qmp = Qmp::connect(&socket, Duration::from_secs(5))
            .await
            .expect("connect");
        let status = qmp.execute("query-status", None).await.expect("status");
        assert_eq!(status["status"], "running");
        match qmp
            .execute("migrate", Some(json!({"uri": "exec:cat > x"})))
            .await
        {
            Err(QmpError::Command { command, desc, .. }) => {
                assert_eq!((command.as_str(), desc.as_str()), ("migrate", "no"));
            }
            other => panic!("not refused: {other:?}"),
        }
        assert!(matches!(
            qmp.execute("quit", None).await,
            Err(QmpError::Closed)
        ));
        let seen = server.await.expect("server");
        assert_eq!(seen[0], ("qmp_capabilities".to_string(), None));
        assert_eq!(
            seen[2],
            ("migrate".to_string(), Some(json!({"uri": "exec:cat > x"})))
        );
    }

    #[tokio::test]
    async fn a_silent_qemu_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("qmp.sock");
        let _listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        assert!(matches!(
            Qmp::connect(&socket, Duration::from_millis(100)).await,
            Err(QmpError::Timeout(_))
        ));
    }
}
