//! Deterministic half of murmur: the pool workflow, the messages it exchanges, the activity
//! interfaces it calls, and the pure pool state machine under it.
//!
//! # Layout
//!
//! - [`model`]: resources (pool-config, workspace), VM records, validation and patching.
//! - [`machine`]: [`machine::Pool`], the pure state machine: events in, intents out.
//! - [`status`]: the status view built from a pool.
//! - [`messages`]: signal/update/query payloads and the lenient decoder.
//! - [`activity_api`]: typed markers for the activities the workflows call.
//! - [`pool_workflow`]: the Temporal shell (`pool/<tenant>`): handlers, run loop, intents.
//! - [`shell`]: what every workflow shell shares: ids, time, deterministic waiting, failures.
//! - [`agent`]: agents as data: phases, spawn input, status, workflow ids.
//! - [`agent_workflow`]: one agent's life (`agent/<tenant>/<workspace>/<developer>/<slug>`).
//! - [`nuke_workflow`]: the emergency wipe (`nuke/<tenant>`).
//! - [`bake`]: bake recipes, content-addressed image ids, the bake's input and progress.
//! - [`bake_workflow`]: baking one image (`bake/<tenant>/<image-id>`).
//! - [`search_attrs`]: the search attributes every murmur workflow carries.
//! - [`auth`]: credentials, signed bytes, roles and permissions, replay records.
//! - [`gate`]: verifying a request's credential from inside a workflow.
//! - [`hosts`]: VM hosts, their task queues, the pure host registry and the view pools place by.
//! - [`host_registry_workflow`]: the registry (`murmur-hosts`): leases, drains, announcements.
//! - [`error`]: the `CODE: reason` error contract.
//!
//! Nothing here performs I/O or reads the clock; workflow time and randomness come from the
//! workflow context.
#![deny(missing_docs)]

pub mod activity_api;
pub mod agent;
pub mod agent_workflow;
pub mod auth;
pub mod bake;
pub mod bake_workflow;
pub mod error;
pub mod gate;
pub mod host_registry_workflow;
pub mod hosts;
pub mod machine;
pub mod messages;
pub mod model;
pub mod nuke_workflow;
pub mod pool_workflow;
pub mod search_attrs;
pub mod shell;
pub mod status;

/// Task queue of the murmur worker unless overridden.
pub const DEFAULT_TASK_QUEUE: &str = "murmur";
