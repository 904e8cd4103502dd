//! Side effects of murmur: substrates and the activities the workflows call.
//!
//! # Layout
//!
//! - [`provider`]: the [`provider::Provider`] trait every substrate implements.
//! - [`process`]: the embedded `process` substrate (local sandboxes).
//! - [`sandbox`]: the supervisor that runs inside each `process` sandbox.
//! - [`vm_activities`]: the boot and delete activities over a provider.
#![deny(missing_docs)]

pub mod process;
pub mod provider;
pub mod sandbox;
pub mod vm_activities;
