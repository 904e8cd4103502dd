//! Every reply, query answer and history entry the pool writes stays small at 10,000 VM
//! records: the state carried to the next run, the status, the `flush` reply, the record kept
//! in the memo, a reaper round's requests and a host's answer (agreeing, and a recovery's
//! first page): all under 256 KiB with every VM warm. With every VM held by an agent the pool
//! also carries 10,000 claims: everything stays under 256 KiB but the carried state, which
//! stays under 1 MiB (half the server's 2 MB payload limit). The figures are printed
//! (`--nocapture`) for BENCHMARKS.md.

use murmur_workflows::hosts::{HostInfo, HostView};
use murmur_workflows::machine::{
    ClaimRequest, ConfigChange, HostScan, Intent, Pool, ScanSettings, ScannedVm, VmLabels,
};
use murmur_workflows::messages::{FLUSH_REPLY_IDS, FlushReply, PoolInput};
use murmur_workflows::model::{ResourceKind, VmId, VmRecord, VmState};
use murmur_workflows::status::PoolStatus;

const VMS: u32 = 10_000;
const LIMIT: usize = 256 * 1024;
const HOSTS: [&str; 4] = ["host-a", "host-b", "host-c", "host-d"];

fn set(pool: &mut Pool, kind: ResourceKind, name: &str, spec: serde_json::Value) {
    let change = ConfigChange::Set {
        spec,
        expected_generation: None,
    };
    let valid = pool.validate_change(kind, name, &change).expect("valid");
    pool.commit_change(valid, "sizes", 1_000);
}

/// A pool of `VMS` VMs spread over four hosts: all warm, or all held by agents.
fn big_pool(assigned: bool) -> Pool {
    let mut pool = Pool::new("acme", 7, 1_000);
    let view = HostView {
        version: 1,
        hosts: HOSTS
            .iter()
            .map(|h| {
                (
                    h.to_string(),
                    HostInfo {
                        host: h.to_string(),
                        max_vms: VMS,
                        ..Default::default()
                    },
                )
            })
            .collect(),
    };
    pool.hosts_changed(view, 1_000);
    set(
        &mut pool,
        ResourceKind::PoolConfig,
        "default",
        serde_json::json!({ "max_vms": VMS + 10 }),
    );
    set(
        &mut pool,
        ResourceKind::Workspace,
        "web",
        serde_json::json!({ "min_idle": 0 }),
    );
    for i in 0..VMS {
        let id = VmId::from_bits(0x1357_9bdf_u32.wrapping_mul(i + 1));
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
                created_at: 1_700_000_000_000 + u64::from(i) * 37,
                ready_at: Some(1_700_000_000_500 + u64::from(i) * 37),
                delete_reason: None,
                host: Some(HOSTS[i as usize % HOSTS.len()].into()),
                memory_mb: 256,
                delete_failures: 0,
                delete_error: None,
                warm_round: 3,
                dormant: false,
                wake_seq: 0,
            },
        );
    }
    if assigned {
        // Written straight into the state (claiming 10,000 VMs one event at a time would
        // measure the machine, not the payloads); one claim goes through `claim` so the shape
        // of every claim is the machine's own.
        let ids: Vec<VmId> = pool.vms.keys().cloned().collect();
        for (i, vm) in ids.iter().enumerate() {
            let run = format!("01a2{:04x}-ad84-7913-8755-a94fa003{:04x}", i, i * 7);
            let agent = format!("agent/acme/web/dev{}/task-{i}", i % 50);
            let req = ClaimRequest {
                request: format!("{agent}@{run}"),
                agent: agent.clone(),
                developer: format!("dev{}", i % 50),
                workspace: "web".into(),
                ..ClaimRequest::default()
            };
            if i == 0 {
                pool.claim(&req, 2_000);
                assert!(pool.claims[&req.request].vm.is_some());
                continue;
            }
            let mut claim = pool
                .claims
                .values()
                .next()
                .cloned()
                .expect("the first claim");
            claim.request = req.request.clone();
            claim.agent = agent.clone();
            claim.developer = req.developer.clone();
            claim.seq = i as u64 + 1;
            claim.vm = Some(vm.clone());
            claim.requested_at = 2_000 + i as u64;
            pool.claims.insert(req.request.clone(), claim);
            let rec = pool.vms.get_mut(vm).expect("the VM");
            rec.state = VmState::Assigned;
            rec.agent = Some(agent);
            rec.claim = Some(req.request);
        }
        assert_eq!(pool.claims.len(), VMS as usize);
    }
    pool
}

fn size<T: serde::Serialize>(what: &str, shape: &str, v: &T) -> usize {
    let n = serde_json::to_vec(v).expect("serializes").len();
    println!("{shape:>9} | {what:<52} | {:>8} bytes", n);
    n
}

fn check(shape: &str, pool: &Pool, carried_limit: usize) {
    let mut sizes = Vec::new();
    // The input of the next run (continue-as-new), and that it reads back the same.
    let carried = PoolInput {
        tenant: pool.tenant.clone(),
        carried: Some(Box::new(pool.clone())),
    };
    let carried_size = size("state carried to the next run", shape, &carried);
    assert!(
        carried_size <= carried_limit,
        "{shape}: the carried state is {carried_size} bytes, over {carried_limit}"
    );
    let json = serde_json::to_string(&carried).unwrap();
    let back: PoolInput = serde_json::from_str(&json).unwrap();
    assert_eq!(
        back.carried.as_deref(),
        Some(pool),
        "the packed state reads back different"
    );

    let status = PoolStatus::build(pool, false, false);
    sizes.push(("status query", size("status query", shape, &status)));
    sizes.push((
        "record (memo)",
        size("record (memo)", shape, &pool.record()),
    ));

    // A flush of every warm VM: the reply lists a bounded number of ids.
    let mut flushing = pool.clone();
    let (flushed, intents) = flushing.flush(5_000);
    let reply = FlushReply {
        flushed: flushed.len() as u32,
        vms: flushed.into_iter().take(FLUSH_REPLY_IDS).collect(),
        generation: flushing.generation,
        ..FlushReply::default()
    };
    sizes.push(("flush reply", size("flush reply", shape, &reply)));
    let biggest_command = intents
        .iter()
        .map(|c| serde_json::to_vec(c).unwrap().len())
        .max();
    println!(
        "{shape:>9} | {:<52} | {:>8} bytes",
        "largest intent of that flush",
        biggest_command.unwrap_or(0)
    );

    // A reaper round: what it asks (digests per host) and what an agreeing host answers.
    let mut scanning = pool.clone();
    let mut intents = scanning.request_scan();
    intents.extend(scanning.hosts_read(None, 6_000));
    let mut requests = 0;
    for intent in &intents {
        let n = serde_json::to_vec(intent).unwrap().len();
        requests = requests.max(n);
        if let Intent::ListHost { host, digests, .. } = intent {
            let listing: Vec<ScannedVm> = pool
                .vms
                .values()
                .filter(|v| v.host.as_deref() == Some(host.as_str()))
                .map(|v| ScannedVm {
                    id: v.id.clone(),
                    alive: true,
                    labels: Some(VmLabels {
                        workspace: v.workspace.clone(),
                        image: v.image.clone(),
                        generation: v.generation,
                        owner: v.claim.clone(),
                        owner_running: v.claim.is_some(),
                    }),
                })
                .collect();
            let agreeing = HostScan::answer(digests, listing.clone(), ScanSettings::default());
            assert!(agreeing.diffs.items.is_empty());
            sizes.push((
                "host listing, host agrees",
                size("host listing, host agrees", shape, &agreeing),
            ));
            // A recovering pool knows nothing yet: the host answers in pages.
            let empty =
                murmur_workflows::machine::digest::Digests::of(std::iter::empty(), digests.buckets);
            let first_page = HostScan::answer(&empty, listing, ScanSettings::default());
            assert!(first_page.diffs.truncated, "a recovery listing is paged");
            sizes.push((
                "host listing, recovery page",
                size("host listing, recovery page", shape, &first_page),
            ));
        }
    }
    println!(
        "{shape:>9} | {:<52} | {:>8} bytes",
        "largest request of a reaper round", requests
    );
    sizes.push(("reaper round request", requests));
    for (what, n) in sizes {
        assert!(n <= LIMIT, "{shape}: {what} is {n} bytes, over {LIMIT}");
    }
}

#[test]
fn every_payload_stays_under_256_kib_at_10000_warm_vms() {
    check("warm", &big_pool(false), LIMIT);
}

#[test]
fn every_payload_stays_under_256_kib_at_10000_agents() {
    check("assigned", &big_pool(true), 1024 * 1024);
}
