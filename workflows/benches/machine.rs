//! Cost per event of the pure pool state machine with 1,000 and 10,000 VMs, with 1,000 and
//! 10,000 agents queued at `max_vms`, and with 1,000 and 10,000 agents holding VMs:
//! `cargo bench -p murmur-workflows --bench machine`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use murmur_workflows::machine::{Admission, ClaimRequest, ConfigChange, Intent, Pool};
use murmur_workflows::model::{ResourceKind, VmId, VmRecord, VmState};

/// Inventory sizes measured.
const SIZES: [u32; 2] = [1_000, 10_000];

/// A pool with `vms` warm VMs in one workspace (max_vms leaves room for churn).
fn big_pool(vms: u32) -> Pool {
    let mut pool = Pool::new("bench", 7, 1_000);
    // One host with room for everything (placement picks it for every boot).
    let view = murmur_workflows::hosts::HostView {
        version: 1,
        hosts: [(
            "h1".to_string(),
            murmur_workflows::hosts::HostInfo {
                host: "h1".into(),
                max_vms: 2 * vms.max(10),
                ..Default::default()
            },
        )]
        .into_iter()
        .collect(),
    };
    pool.hosts_changed(view, 1_000);
    let set = |pool: &mut Pool, kind, name: &str, spec: serde_json::Value| {
        let change = ConfigChange::Set {
            spec,
            expected_generation: None,
        };
        let valid = pool.validate_change(kind, name, &change).expect("valid");
        pool.commit_change(valid, "bench", 1_000).1
    };
    set(
        &mut pool,
        ResourceKind::PoolConfig,
        "default",
        serde_json::json!({ "max_vms": vms + 100 }),
    );
    // The warm VMs are written straight into the inventory (booting 10,000 one event at a
    // time would measure the set-up).
    for i in 0..vms {
        let id = VmId::from_bits(0x1000_0000 + i);
        pool.vms.insert(
            id.clone(),
            VmRecord {
                id,
                workspace: "web".into(),
                image: "default".into(),
                generation: pool.generation,
                state: VmState::Warm,
                agent: None,
                claim: None,
                created_at: 1_000,
                ready_at: Some(1_500 + u64::from(i)),
                delete_reason: None,
                host: Some("h1".into()),
                memory_mb: 256,
                delete_failures: 0,
                delete_error: None,
                warm_round: 0,
                dormant: false,
                wake_seq: 0,
            },
        );
    }
    let boots = set(
        &mut pool,
        ResourceKind::Workspace,
        "web",
        serde_json::json!({ "min_idle": vms }),
    );
    assert!(boots.is_empty(), "the pool is full already");
    pool
}

fn events(c: &mut Criterion) {
    for vms in SIZES {
        let mut pool = big_pool(vms);
        let mut n = 0u64;
        // One hand-out and its release: claim a warm VM, release it (the VM is deleted), the
        // delete is confirmed, backfill boots a replacement, the replacement comes up.
        let name = format!("claim+release+delete+boot cycle, {vms} VMs (4 events)");
        c.bench_function(&name, |b| {
            b.iter(|| {
                n += 1;
                let req = ClaimRequest {
                    request: format!("r{n}"),
                    agent: format!("a{n}"),
                    developer: "dev".into(),
                    workspace: "web".into(),
                    ..Default::default()
                };
                let mut intents = pool.claim(&req, 3_000);
                let (vm, more) = pool.release(&req.request, 3_000);
                intents.extend(more);
                if let Some(vm) = vm {
                    intents.extend(pool.deleted(&vm, 3_000));
                }
                let mut booted = 0;
                for intent in intents {
                    if let Intent::Boot(spec) = intent {
                        booted += 1;
                        black_box(pool.boot_succeeded(&spec.vm, 3_000));
                    }
                }
                assert_eq!(booted, 1, "backfill boots one replacement");
            })
        });
        let name = format!("reconcile, {vms} VMs, nothing to do");
        c.bench_function(&name, |b| b.iter(|| black_box(pool.reconcile(4_000))));
    }
}

/// A pool at `max_vms` (10 VMs, all assigned) with `waiting` agents queued for room.
fn queued_pool(waiting: u32) -> Pool {
    let mut pool = big_pool(0);
    let change = ConfigChange::Set {
        spec: serde_json::json!({ "max_vms": 10 }),
        expected_generation: None,
    };
    let valid = pool
        .validate_change(ResourceKind::PoolConfig, "default", &change)
        .expect("valid");
    pool.commit_change(valid, "bench", 1_000);
    for i in 0..10 + waiting {
        let req = ClaimRequest {
            request: format!("q{i}@r"),
            agent: format!("q{i}"),
            developer: "dev".into(),
            workspace: "web".into(),
            ..Default::default()
        };
        for intent in pool.claim(&req, 2_000) {
            if let Intent::Boot(spec) = intent {
                pool.boot_succeeded(&spec.vm, 2_000);
            }
        }
    }
    assert_eq!(pool.in_use(), 10);
    pool
}

fn queued(c: &mut Criterion) {
    for waiting in SIZES {
        let mut pool = queued_pool(waiting);
        let mut n = 0u64;
        // One more agent joins the queue and leaves it (killed while waiting): two events,
        // each of which looks at the queue.
        let name = format!("claim+release while {waiting} claims wait at max_vms (2 events)");
        c.bench_function(&name, |b| {
            b.iter(|| {
                n += 1;
                let req = ClaimRequest {
                    request: format!("x{n}@r"),
                    agent: format!("x{n}"),
                    developer: "dev".into(),
                    workspace: "web".into(),
                    ..Default::default()
                };
                black_box(pool.claim(&req, 3_000));
                black_box(pool.release(&req.request, 3_000));
            })
        });
    }
}

/// A pool whose `agents` agents each hold a VM, with warm VMs to spare: a tenant's steady state.
fn busy_pool(agents: u32) -> Pool {
    let mut pool = big_pool(agents + 100);
    for i in 0..agents {
        let req = ClaimRequest {
            request: format!("a{i}@r"),
            agent: format!("a{i}"),
            developer: format!("dev{}", i % 50),
            workspace: "web".into(),
            ..Default::default()
        };
        for intent in pool.claim(&req, 2_000) {
            if let Intent::Boot(spec) = intent {
                pool.boot_succeeded(&spec.vm, 2_000);
            }
        }
    }
    assert_eq!(pool.claims.len(), agents as usize);
    pool
}

fn held(c: &mut Criterion) {
    for agents in SIZES {
        let mut pool = busy_pool(agents);
        let mut n = 0u64;
        // A spawn's claim as the pool takes it (its request admitted once, checked against
        // max_agents_per_developer, a warm VM handed out, a replacement booted), and the
        // agent's release, while `agents` other agents hold VMs.
        let name =
            format!("admit+check+claim+release+boot with {agents} agents holding VMs (4 events)");
        c.bench_function(&name, |b| {
            b.iter(|| {
                n += 1;
                let req = ClaimRequest {
                    request: format!("x{n}@r"),
                    agent: format!("x{n}"),
                    developer: "dev7".into(),
                    workspace: "web".into(),
                    spawn_request_id: format!("s{n}"),
                    spawn_signed_at: 3_000 + n,
                    ..Default::default()
                };
                let admission = Admission {
                    op: "agent.spawn",
                    developer: &req.developer,
                    request_id: &req.spawn_request_id,
                    signed_at: req.spawn_signed_at,
                    consumer: Some(&req.request),
                };
                pool.admit(&admission, 3_000).expect("admitted");
                pool.validate_claim(&req).expect("valid");
                let mut intents = pool.claim(&req, 3_000);
                let (vm, more) = pool.release(&req.request, 3_000);
                intents.extend(more);
                if let Some(vm) = vm {
                    intents.extend(pool.deleted(&vm, 3_000));
                }
                for intent in intents {
                    if let Intent::Boot(spec) = intent {
                        black_box(pool.boot_succeeded(&spec.vm, 3_000));
                    }
                }
            })
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = events, queued, held
}
criterion_main!(benches);
