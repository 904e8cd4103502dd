//! The Temporal SDK's own worker metrics (`temporal_*`). The SDK renders them with its own
//! `prometheus` registry behind an exporter it starts; murmur binds that exporter to a
//! private loopback port and reads it over HTTP/1.1 at scrape time (a local call, not a
//! Temporal one), so `/metrics` serves both in the same text format.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// How long reading the SDK's exporter may take.
const SDK_ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Why the SDK's metrics could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SdkMetricsError {
    /// the SDK's metrics exporter did not answer: {0}
    #[error("the SDK's metrics exporter did not answer: {0}")]
    Unreachable(String),
    /// the SDK's metrics exporter answered {0}
    #[error("the SDK's metrics exporter answered {0}")]
    Status(hyper::StatusCode),
    /// the SDK's metrics exporter did not answer within 5 s
    #[error("the SDK's metrics exporter did not answer within 5 s")]
    Timeout,
}

/// Reads the exposition of the SDK's exporter at `addr`.
pub async fn fetch(addr: SocketAddr) -> Result<String, SdkMetricsError> {
    tokio::time::timeout(SDK_ANSWER_WITHIN, get(addr))
        .await
        .map_err(|_| SdkMetricsError::Timeout)?
}

async fn get(addr: SocketAddr) -> Result<String, SdkMetricsError> {
    let unreachable = |e: &dyn std::fmt::Display| SdkMetricsError::Unreachable(e.to_string());
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| unreachable(&e))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(&e))?;
    tokio::spawn(connection);
    let request = hyper::Request::get("/metrics")
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| unreachable(&e))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| unreachable(&e))?;
    if !response.status().is_success() {
        return Err(SdkMetricsError::Status(response.status()));
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| unreachable(&e))?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}
