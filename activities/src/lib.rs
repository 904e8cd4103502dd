//! Side effects of murmur: substrates and the activities the workflows call.
//!
//! # Layout
//!
//! - [`substrate`]: where VMs really live, with no Temporal in it: the
//!   [`substrate::Provider`] trait every substrate implements, the VM-directory helpers the
//!   local substrates share (`vm_dir`), the `process` substrate and its sandbox supervisor,
//!   the `qemu` substrate (`guest`, `launch`, `images`), and the fault-injecting wrapper
//!   (`faults`), for chaos tests.
//!
//! The rest are the Temporal activities over a substrate:
//!
//! - [`vm_activities`]: the boot and delete activities over a provider.
//! - [`agent_activities`]: claim/release through the pool, running an agent's command, and
//!   the nuke's steps (pause/reset the pool, list and terminate agents, list VMs).
//! - [`claim_batch`]: a worker's claims sent to their pool in batches (group commit).
//! - [`reaper`]: the reaper's scan (substrate listing, ended agents, stranded workflows).
//! - [`host_activities`]: a host's lease, reading and announcing the host view, registering.
//! - [`bake_activities`]: the bake workflow's steps (cache check, provisioning, snapshot).
//! - [`heartbeat`]: heartbeating while an activity works (every activity does).
//! - [`meters`]: what the activities measure for the worker's `/metrics` (claim latency,
//!   boots a full host refused).
//! - [`auth`]: worker keys, identity tokens, request signatures, the `murmur.verify` check.
//! - [`recovery`]: reading a pool's record back (memo, or the history of an older run).
//! - [`temporal_ops`]: search attributes, starting the pool on demand, client error mapping.
#![deny(missing_docs)]

pub mod agent_activities;
pub mod auth;
pub mod bake_activities;
pub mod claim_batch;
pub mod heartbeat;
pub mod host_activities;
pub mod meters;
pub mod reaper;
pub mod recovery;
pub mod substrate;
pub mod temporal_ops;
pub mod vm_activities;
