//! Heartbeating while an activity works: every activity of this crate runs its work under
//! [`with_heartbeats`] (or [`with_progress`]), so a worker that dies under one is noticed
//! within the activity's heartbeat timeout instead of its whole start-to-close timeout, and a
//! cancellation reaches it. The exceptions say so in their doc comments: `murmur.verify` is a
//! local activity (local activities do not heartbeat), and `murmur.run_agent` and
//! `murmur.host_lease` heartbeat from their own loops (they must act on a cancellation
//! themselves: stop the command, fail the lease).

use std::time::Duration;

use temporalio_common::ActivityError;
use temporalio_sdk::activities::ActivityContext;

/// How often [`with_heartbeats`] heartbeats.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// Runs `work` while heartbeating every second, so a dead worker is noticed within the
/// heartbeat timeout instead of the whole start-to-close timeout. Returns `Err` when the
/// activity is cancelled.
pub async fn with_heartbeats<T>(
    ctx: &ActivityContext,
    work: impl std::future::Future<Output = T>,
) -> Result<T, ActivityError> {
    with_progress(ctx, work, || ()).await
}

/// Like [`with_heartbeats`], with `progress()` as each heartbeat's details (a retry of the
/// activity reads the last one back).
pub async fn with_progress<T, D: serde::Serialize + Send + 'static>(
    ctx: &ActivityContext,
    work: impl std::future::Future<Output = T>,
    progress: impl Fn() -> D,
) -> Result<T, ActivityError> {
    tokio::pin!(work);
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    loop {
        tokio::select! {
            out = &mut work => return Ok(out),
            _ = ctx.cancelled() => return Err(ActivityError::cancelled()),
            _ = tick.tick() => {
                let _ = ctx.record_heartbeat(progress()).await;
            }
        }
    }
}
