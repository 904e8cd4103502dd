//! murmur's end-to-end tests: one test binary (linking the worker once), one module per
//! feature. Every test starts real `murmur-worker` processes against the Temporal dev server
//! that `./devserver.sh test` starts (each test with its own tenant, task queue and state
//! directory), drives them with the real `murmur` and `temporal` CLIs, and checks what the
//! substrates really hold.
//!
//! Run one feature with `cargo test --test e2e <module>::`, e.g.
//! `cargo test --test e2e recovery::`.
//!
//! | module | what it covers |
//! |---|---|
//! | [`flush`] | flush output, generations, concurrent flushes |
//! | [`config`] | get / set / patch of pool config and workspaces |
//! | [`agents`] | spawn, claims, warm hand-out, keep-alive, queueing at `max_vms` |
//! | [`auth`] | credentials, roles, signed requests, denials |
//! | [`operability`] | status, `--json` schemas, version, completions |
//! | [`metrics`] | `/metrics` parsed as Prometheus does, health, a fleet's sums, scrape cost, deploy files |
//! | [`traces`] | OpenTelemetry traces exported over OTLP when the worker is asked to |
//! | [`output`] | `-o json|yaml` on every command, errors per format, `ls --all / --watch` |
//! | [`reaper`] | orphans, dead VMs, ended agents, stranded workflows |
//! | [`recovery`] | a pool run that ends, cannot delete, or does not answer |
//! | [`chaos`] | worker kill -9, server restarts, substrate faults |
//! | [`sleep`] | `murmur sleep`, `wake`, `on-idle`: a count that resumes, kills, nukes and crashes while asleep |
//! | [`inside`] | `murmur logs -f`, `exec`, `shell` through the host gateway; its auth checks |
//! | [`hostile`] | malformed payloads to every handler, bad flags and YAML |
//! | [`bake`] | `murmur bake`: images built in VMs |
//! | [`qemu`] | the same pool on real qemu guests |
//! | [`scaleout`] | three worker hosts: loss, drain, shared capacity |
//! | [`replay`] | golden histories replayed against the current code |
//! | [`invariant_checks`] | the continuous invariant check reports a violation that clears |
//! | [`harness`] | the test environment: workers, CLIs, substrates, invariant checks |

mod harness;

mod agents;
mod auth;
mod bake;
mod chaos;
mod config;
mod flush;
mod hostile;
mod inside;
mod invariant_checks;
mod metrics;
mod operability;
mod output;
mod qemu;
mod reaper;
mod recovery;
mod replay;
mod scaleout;
mod sleep;
mod traces;
