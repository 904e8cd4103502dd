//! Side effects of murmur: substrates and the activities the workflows call.
//!
//! # Layout
//!
//! - [`provider`]: the [`provider::Provider`] trait every substrate implements.
//! - [`process`]: the embedded `process` substrate (local sandboxes).
//! - [`qemu`]: the `qemu` substrate (real Linux guests and their guest agent).
//! - [`sandbox`]: the supervisor that runs inside each `process` sandbox.
//! - [`vm_activities`]: the boot and delete activities over a provider.
//! - [`agent_activities`]: claim/release through the pool, running an agent's command, and
//!   the nuke's steps (pause/reset the pool, list and terminate agents, list VMs).
//! - [`reaper`]: the reaper's scan (substrate listing, ended agents, stranded workflows).
//! - [`host_activities`]: a host's lease, reading and announcing the host view, registering.
//! - [`faults`]: a fault-injecting wrapper around any provider, for chaos tests.
//! - [`bake_activities`]: the bake workflow's steps (cache check, provisioning, snapshot).
//! - [`auth`]: worker keys, identity tokens, request signatures, the `murmur.verify` check.
//! - [`temporal_ops`]: search attributes, starting the pool on demand, client error mapping.
#![deny(missing_docs)]

pub mod agent_activities;
pub mod auth;
pub mod bake_activities;
pub mod faults;
pub mod host_activities;
pub mod process;
pub mod provider;
pub mod qemu;
pub mod reaper;
pub mod recovery;
pub mod sandbox;
pub mod temporal_ops;
pub mod vm_activities;
