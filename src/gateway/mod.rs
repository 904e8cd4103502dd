//! The host gateway: `murmur logs`, `murmur exec` and `murmur shell` without workflow history.
//!
//! Each worker host serves a gRPC service (`proto/murmur/gateway/v1/gateway.proto`) on the
//! address it registers with the host registry. The CLI finds an agent's VM, run and host
//! through Temporal (the agent's `status` query and the registry's host view), signs the call
//! like any request, and talks to that host directly; output and keystrokes never become
//! workflow events.
//!
//! # Layout
//!
//! - this file: the generated protocol ([`proto`]) and [`serve`];
//! - [`request`]: what a call signs (operations, permissions, canonical bodies, targets);
//! - [`guard`]: verification of a call's proof and the replay records;
//! - [`server`]: the service (logs by polling the substrate, exec sessions);
//! - [`client`]: the CLI's side (finding the agent's host, signing, streaming).

pub mod client;
pub mod guard;
pub mod request;
pub mod server;

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::net::TcpListener;

/// The gateway protocol, generated from `proto/murmur/gateway/v1/gateway.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("murmur.gateway.v1");
}

/// TLS for the gateway: a certificate chain and its private key, both PEM files.
#[derive(Clone, Debug)]
pub struct GatewayTls {
    /// The certificate chain.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

/// Where the gateway listens and what it tells the registry.
#[derive(Clone, Debug)]
pub struct GatewaySettings {
    /// The address to bind (`127.0.0.1:0`: a free loopback port).
    pub listen: SocketAddr,
    /// The address to register, when clients reach the host by another name than the bound
    /// address (`https://h1.internal:7450`); default: the bound address.
    pub advertise: Option<String>,
    /// TLS, when set.
    pub tls: Option<GatewayTls>,
}

/// Binds the gateway's listener; answers with it and the address to register.
pub async fn bind(settings: &GatewaySettings) -> anyhow::Result<(TcpListener, String)> {
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|e| anyhow::anyhow!("gateway: bind {}: {e}", settings.listen))?;
    let bound = listener.local_addr()?;
    let scheme = if settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let advertised = settings
        .advertise
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{bound}"));
    Ok((listener, advertised))
}

/// Serves the gateway on `listener` until the process ends.
pub async fn serve(
    listener: TcpListener,
    service: server::GatewayService,
    tls: Option<GatewayTls>,
) -> anyhow::Result<()> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        let cert = std::fs::read(&tls.cert)
            .map_err(|e| anyhow::anyhow!("gateway TLS: read {}: {e}", tls.cert.display()))?;
        let key = std::fs::read(&tls.key)
            .map_err(|e| anyhow::anyhow!("gateway TLS: read {}: {e}", tls.key.display()))?;
        let identity = tonic::transport::Identity::from_pem(cert, key);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| anyhow::anyhow!("gateway TLS: {e}"))?;
    }
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    builder
        .add_service(proto::gateway_server::GatewayServer::new(service))
        .serve_with_incoming(incoming)
        .await
        .map_err(|e| anyhow::anyhow!("gateway: {e}"))
}
