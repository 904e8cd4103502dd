//! The worker's operations endpoint: `/metrics` (Prometheus text), `/healthz` (liveness: the
//! process serves) and `/readyz` (readiness: the worker polls its task queues).
//!
//! murmur's own metrics are read from the pools this worker serves at scrape time (each
//! running `pool/<tenant>` on the task queue answers its `status` query), so they are exactly
//! what `murmur pool status` shows; claim latencies are measured by the claim activity in this
//! process. The Temporal SDK's worker metrics (`temporal_*`) come from the SDK's own exporter,
//! bound to a private loopback port and appended to the same response.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use murmur_activities::agent_activities::ClaimLatencies;
use murmur_activities::temporal_ops::running_pools_query;
use murmur_workflows::model::VmState;
use murmur_workflows::pool_workflow::PoolWorkflow;
use murmur_workflows::status::PoolStatus;
use temporalio_client::{Client, WorkflowListOptions, WorkflowQueryOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the endpoint reads from.
pub struct MetricsState {
    /// Client for visibility and queries.
    pub client: Client,
    /// The task queue this worker polls (pools on other queues are not its to report).
    pub task_queue: String,
    /// Where the SDK's own exporter listens, if it runs.
    pub sdk_metrics: Option<SocketAddr>,
    /// True while the worker polls its task queue.
    pub polling: Arc<AtomicBool>,
    /// Claim latencies measured by this worker's claim activities.
    pub claims: Arc<ClaimLatencies>,
}

/// Binds the endpoint's address (before anything else takes ports, so a busy address is a
/// start-up error, not a silent one).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics address {addr}: {e}"))
}

/// Serves `/metrics` and `/healthz` on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<MetricsState>,
) -> anyhow::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "metrics endpoint listening");
    loop {
        let (mut stream, _) = listener.accept().await?;
        let state = state.clone();
        tokio::spawn(async move {
            let Some(request) = read_request_head(&mut stream).await else {
                return;
            };
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/metrics" => ("200 OK", render(&state).await),
                "/healthz" => ("200 OK", "ok\n".to_string()),
                "/readyz" if state.polling.load(Ordering::Relaxed) => (
                    "200 OK",
                    format!("ready: polling task queue {}\n", state.task_queue),
                ),
                "/readyz" => (
                    "503 Service Unavailable",
                    format!("not ready: not polling task queue {}\n", state.task_queue),
                ),
                _ => (
                    "404 Not Found",
                    "try /metrics, /healthz or /readyz\n".to_string(),
                ),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

/// Reads a request's head (up to the blank line, at most 8 KiB, 5 s). Clients may send it in
/// several packets.
async fn read_request_head(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Some(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()??;
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// How long a scrape waits for one pool's status.
const POOL_ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// The pools this worker serves: each tenant's status, or `None` when its pool did not
/// answer (it still gets `murmur_pool_up 0`, so a wedged pool is visible, not missing).
async fn pools(state: &MetricsState) -> Vec<(String, Option<PoolStatus>)> {
    let query = running_pools_query(&state.task_queue);
    let mut ids = Vec::new();
    let mut stream = state
        .client
        .list_workflows(query, WorkflowListOptions::default());
    while let Some(Ok(wf)) = stream.next().await {
        ids.push(wf.id().to_string());
    }
    let mut out = Vec::new();
    for id in ids {
        let tenant = id.strip_prefix("pool/").unwrap_or(&id).to_string();
        let handle = state.client.get_workflow_handle::<PoolWorkflow>(id);
        let query = handle.query(PoolWorkflow::status, (), WorkflowQueryOptions::default());
        let status = tokio::time::timeout(POOL_ANSWER_WITHIN, query)
            .await
            .ok()
            .and_then(Result::ok);
        out.push((tenant, status));
    }
    out
}

/// The whole exposition: murmur's metrics, then the SDK's.
async fn render(state: &MetricsState) -> String {
    let pools = pools(state).await;
    let answered: Vec<PoolStatus> = pools.iter().filter_map(|(_, st)| st.clone()).collect();
    let mut out = render_pools(&answered);
    out.push_str(&render_pool_up(&pools));
    state.claims.render(&mut out);
    let _ = writeln!(
        out,
        "# HELP murmur_build_info The worker's build: always 1, labelled with its version and commit."
    );
    let _ = writeln!(out, "# TYPE murmur_build_info gauge");
    let _ = writeln!(
        out,
        "murmur_build_info{{version=\"{}\",commit=\"{}\"}} 1",
        crate::VERSION,
        crate::COMMIT
    );
    let _ = writeln!(
        out,
        "# HELP murmur_worker_polling 1 while the worker polls its task queue."
    );
    let _ = writeln!(out, "# TYPE murmur_worker_polling gauge");
    let _ = writeln!(
        out,
        "murmur_worker_polling {}",
        u8::from(state.polling.load(Ordering::Relaxed))
    );
    if let Some(addr) = state.sdk_metrics {
        out.push_str(&fetch_sdk_metrics(addr).await.unwrap_or_default());
    }
    out
}

/// `murmur_pool_up`: 1 for each pool that answered, 0 for each that did not (so a wedged
/// pool is visible instead of missing).
pub fn render_pool_up(pools: &[(String, Option<PoolStatus>)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP murmur_pool_up 1 when the tenant's pool answered its status query, 0 when it did not (wedged, or no worker runs it)."
    );
    let _ = writeln!(out, "# TYPE murmur_pool_up gauge");
    for (tenant, st) in pools {
        let _ = writeln!(
            out,
            "murmur_pool_up{{tenant=\"{tenant}\"}} {}",
            u8::from(st.is_some())
        );
    }
    out
}

/// Renders the pools' gauges and counters (Prometheus text format).
pub fn render_pools(pools: &[PoolStatus]) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    };
    let states = [
        VmState::Booting,
        VmState::Warm,
        VmState::Assigned,
        VmState::Deleting,
    ];
    // Keyed by whether the VMs are of the pool's current generation, not by the generation
    // itself: a label value per flush would start new series at every flush.
    let mut vms: std::collections::BTreeMap<String, f64> = std::collections::BTreeMap::new();
    for p in pools {
        for ws in &p.workspaces {
            for g in &ws.groups {
                for state in states {
                    let n = match state {
                        VmState::Booting => g.booting,
                        VmState::Warm => g.warm,
                        VmState::Assigned => g.assigned,
                        VmState::Deleting => g.deleting,
                    };
                    let labels = format!(
                        "tenant=\"{}\",workspace=\"{}\",image=\"{}\",current_generation=\"{}\",state=\"{}\"",
                        p.tenant,
                        ws.name,
                        g.image,
                        g.generation == p.generation,
                        state_name(state)
                    );
                    *vms.entry(labels).or_default() += f64::from(n);
                }
            }
        }
    }
    family(
        "murmur_vms",
        "gauge",
        "VMs by tenant, workspace, image, whether of the pool's current generation (older ones are never handed out), and state.",
        vms.into_iter().collect(),
    );
    let per_pool = |f: &dyn Fn(&PoolStatus) -> f64| -> Vec<(String, f64)> {
        pools
            .iter()
            .map(|p| (format!("tenant=\"{}\"", p.tenant), f(p)))
            .collect()
    };
    family(
        "murmur_vms_in_use",
        "gauge",
        "VMs counting against max_vms (booting + warm + assigned + deleting).",
        per_pool(&|p| f64::from(p.in_use)),
    );
    family(
        "murmur_max_vms",
        "gauge",
        "The pool-config max_vms in force.",
        per_pool(&|p| f64::from(p.config.max_vms)),
    );
    family(
        "murmur_creates_in_flight",
        "gauge",
        "VM creates asked for and not finished (booting VMs).",
        per_pool(&|p| {
            p.workspaces
                .iter()
                .flat_map(|w| &w.groups)
                .map(|g| f64::from(g.booting))
                .sum()
        }),
    );
    family(
        "murmur_vms_stuck_deleting",
        "gauge",
        "VMs whose delete keeps failing (they count against max_vms; retried on a back-off).",
        per_pool(&|p| f64::from(p.stuck_deleting_total)),
    );
    family(
        "murmur_pool_recovering",
        "gauge",
        "1 while the pool rebuilds its state from the hosts and Temporal after a run that ended.",
        per_pool(&|p| f64::from(u8::from(p.recovery.is_some()))),
    );
    let per_workspace = |f: &dyn Fn(&murmur_workflows::status::WorkspaceStatus) -> u32| {
        pools
            .iter()
            .flat_map(|p| {
                p.workspaces.iter().map(move |w| {
                    (
                        format!("tenant=\"{}\",workspace=\"{}\"", p.tenant, w.name),
                        f64::from(f(w)),
                    )
                })
            })
            .collect::<Vec<_>>()
    };
    family(
        "murmur_warm_ready",
        "gauge",
        "Warm VMs that can be handed out now (current image and generation), by workspace.",
        per_workspace(&|w| w.ready),
    );
    family(
        "murmur_min_idle",
        "gauge",
        "Warm VMs wanted, by workspace.",
        per_workspace(&|w| w.min_idle),
    );
    family(
        "murmur_agents",
        "gauge",
        "Agents holding or waiting for a VM.",
        per_pool(&|p| f64::from(p.claims_total)),
    );
    family(
        "murmur_claims_waiting",
        "gauge",
        "Agents waiting for room under max_vms.",
        per_pool(&|p| f64::from(p.claims_waiting)),
    );
    family(
        "murmur_boots_total",
        "counter",
        "VM boots asked for.",
        per_pool(&|p| p.counters.boots as f64),
    );
    family(
        "murmur_boot_failures_total",
        "counter",
        "VM boots that failed (all images).",
        per_pool(&|p| p.counters.boot_failures as f64),
    );
    family(
        "murmur_image_consecutive_boot_failures",
        "gauge",
        "Boot failures of an image since its last success (backfill holds back at 3).",
        pools
            .iter()
            .flat_map(|p| {
                p.failing_images.iter().map(move |(image, h)| {
                    (
                        format!("tenant=\"{}\",image=\"{image}\"", p.tenant),
                        f64::from(h.consecutive_failures),
                    )
                })
            })
            .collect(),
    );
    family(
        "murmur_vms_deleted_total",
        "counter",
        "VMs confirmed deleted.",
        per_pool(&|p| p.counters.deleted as f64),
    );
    family(
        "murmur_flushes_total",
        "counter",
        "Flushes performed.",
        per_pool(&|p| p.counters.flushes as f64),
    );
    family(
        "murmur_flushed_vms_total",
        "counter",
        "Warm VMs destroyed by flushes.",
        per_pool(&|p| p.counters.flushed_vms as f64),
    );
    family(
        "murmur_nukes_total",
        "counter",
        "Nukes completed.",
        per_pool(&|p| p.nukes as f64),
    );
    family(
        "murmur_last_flush_seconds",
        "gauge",
        "How long the last flush took, from the request to its VMs being gone.",
        per_pool(&|p| p.last_flush_ms.unwrap_or(0) as f64 / 1000.0),
    );
    family(
        "murmur_last_nuke_seconds",
        "gauge",
        "How long the last nuke took, from its pause to its reset.",
        per_pool(&|p| p.last_nuke_ms.unwrap_or(0) as f64 / 1000.0),
    );
    family(
        "murmur_denials_recent",
        "gauge",
        "Refused requests kept in the pool's status (at most 20).",
        per_pool(&|p| p.denials.len() as f64),
    );
    family(
        "murmur_rejected_messages_total",
        "counter",
        "Malformed signals rejected since the pool's run started (resets when a run continues as new).",
        per_pool(&|p| p.rejected_messages as f64),
    );
    family(
        "murmur_pool_paused",
        "gauge",
        "1 while a nuke holds the pool.",
        per_pool(&|p| f64::from(u8::from(p.nuke_in_progress))),
    );
    out
}

fn state_name(state: VmState) -> &'static str {
    match state {
        VmState::Booting => "booting",
        VmState::Warm => "warm",
        VmState::Assigned => "assigned",
        VmState::Deleting => "deleting",
    }
}

/// Reads the SDK exporter's text.
async fn fetch_sdk_metrics(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "sdk metrics"))??;
    let text = String::from_utf8_lossy(&raw);
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_that_does_not_answer_is_reported_down_not_dropped() {
        let up = PoolStatus {
            tenant: "a".into(),
            ..PoolStatus::default()
        };
        let text = render_pool_up(&[("a".into(), Some(up)), ("b".into(), None)]);
        assert!(text.contains("murmur_pool_up{tenant=\"a\"} 1"), "{text}");
        assert!(text.contains("murmur_pool_up{tenant=\"b\"} 0"), "{text}");
    }
}
