//! The compact form of the inventory and the claims, as carried across continue-as-new.
//!
//! A run's state travels to the next run as the input of its first event, and a history
//! event must stay far below the server's payload limit. As plain JSON a VM record costs about
//! 250 bytes (10,000 VMs: 2.5 MB). Packed, strings are interned once, numbers are varints
//! and the whole is deflated: about 10 bytes per VM. Deflate and base64 are deterministic, so
//! replaying a run produces the same input for the next one.
//!
//! The packed form is `{"packed": 1, "data": "<base64 of deflate>"}`;
//! reading also accepts the plain JSON map (state written before packing existed).

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Claim;
use crate::model::{DeleteReason, VmId, VmRecord, VmState};

/// Version of the packed layout.
const VERSION: u32 = 1;
/// Most bytes a packed blob may inflate to (a corrupt input fails instead of eating memory).
const MAX_INFLATED: usize = 256 << 20;

#[derive(Serialize, Deserialize)]
struct PackedBlob {
    packed: u32,
    data: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stored<T> {
    Packed(PackedBlob),
    Plain(T),
}

/// Interns strings; index 0 is reserved for "none" in optional fields.
#[derive(Default)]
struct Strings {
    list: Vec<String>,
    index: BTreeMap<String, u64>,
}

impl Strings {
    fn id(&mut self, s: &str) -> u64 {
        if let Some(i) = self.index.get(s) {
            return *i;
        }
        let i = self.list.len() as u64;
        self.list.push(s.to_string());
        self.index.insert(s.to_string(), i);
        i
    }

    fn opt(&mut self, s: Option<&str>) -> u64 {
        s.map_or(0, |s| self.id(s) + 1)
    }
}

struct Writer {
    bytes: Vec<u8>,
    strings: Strings,
}

impl Writer {
    fn new() -> Self {
        Self {
            bytes: Vec::new(),
            strings: Strings::default(),
        }
    }

    fn varint(&mut self, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.bytes.push(b);
                return;
            }
            self.bytes.push(b | 0x80);
        }
    }

    fn string(&mut self, s: &str) {
        let i = self.strings.id(s);
        self.varint(i);
    }

    fn opt_string(&mut self, s: Option<&str>) {
        let i = self.strings.opt(s);
        self.varint(i);
    }

    fn vm_id(&mut self, id: &VmId) {
        match id
            .0
            .strip_prefix("murmur-")
            .filter(|_| VmId::is_valid(&id.0))
        {
            Some(hex) => {
                self.varint(0);
                let bits = u32::from_str_radix(hex, 16).unwrap_or(0);
                self.bytes.extend_from_slice(&bits.to_le_bytes());
            }
            None => {
                self.varint(1);
                self.string(&id.0);
            }
        }
    }

    /// The blob: the interned strings (count, then each length-prefixed), then the records,
    /// all deflated (so strings that share prefixes, like agents' workflow ids, cost little).
    fn finish(self) -> PackedBlob {
        let records = self.bytes;
        let mut head = Writer::new();
        head.varint(self.strings.list.len() as u64);
        for s in &self.strings.list {
            head.varint(s.len() as u64);
            head.bytes.extend_from_slice(s.as_bytes());
        }
        let mut all = head.bytes;
        all.extend_from_slice(&records);
        let deflated = miniz_oxide::deflate::compress_to_vec(&all, 6);
        PackedBlob {
            packed: VERSION,
            data: B64.encode(deflated),
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    strings: Vec<String>,
}

type ReadResult<T> = Result<T, String>;

impl<'a> Reader<'a> {
    fn varint(&mut self) -> ReadResult<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.bytes.get(self.pos).ok_or("packed state ends early")?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("packed state has an overlong number".into())
    }

    fn u32(&mut self) -> ReadResult<u32> {
        u32::try_from(self.varint()?).map_err(|_| "packed number out of range".into())
    }

    fn string(&mut self) -> ReadResult<String> {
        let i = self.varint()? as usize;
        self.strings
            .get(i)
            .cloned()
            .ok_or_else(|| "packed string index out of range".into())
    }

    fn opt_string(&mut self) -> ReadResult<Option<String>> {
        match self.varint()? {
            0 => Ok(None),
            i => self
                .strings
                .get(i as usize - 1)
                .cloned()
                .map(Some)
                .ok_or_else(|| "packed string index out of range".into()),
        }
    }

    fn vm_id(&mut self) -> ReadResult<VmId> {
        match self.varint()? {
            0 => {
                let raw = self
                    .bytes
                    .get(self.pos..self.pos + 4)
                    .ok_or("packed state ends early")?;
                self.pos += 4;
                let bits = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
                Ok(VmId::from_bits(bits))
            }
            _ => Ok(VmId(self.string()?)),
        }
    }

    fn done(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    /// A reader over an inflated blob, its strings read.
    fn open(bytes: &'a [u8]) -> ReadResult<Self> {
        let mut r = Reader {
            bytes,
            pos: 0,
            strings: Vec::new(),
        };
        let n = r.varint()?;
        for _ in 0..n {
            let len = r.varint()? as usize;
            let raw = r
                .bytes
                .get(r.pos..r.pos + len)
                .ok_or("packed state ends early")?;
            r.pos += len;
            r.strings
                .push(String::from_utf8(raw.to_vec()).map_err(|_| "packed string is not UTF-8")?);
        }
        Ok(r)
    }
}

fn inflate(blob: &PackedBlob) -> ReadResult<Vec<u8>> {
    if blob.packed != VERSION {
        return Err(format!(
            "packed state version {} is not {VERSION}",
            blob.packed
        ));
    }
    let deflated = B64
        .decode(blob.data.as_bytes())
        .map_err(|e| format!("packed state is not base64: {e}"))?;
    miniz_oxide::inflate::decompress_to_vec_with_limit(&deflated, MAX_INFLATED)
        .map_err(|e| format!("packed state does not inflate: {e:?}"))
}

const STATES: [VmState; 4] = [
    VmState::Booting,
    VmState::Warm,
    VmState::Assigned,
    VmState::Deleting,
];
const REASONS: [DeleteReason; 10] = [
    DeleteReason::Flush,
    DeleteReason::StaleGeneration,
    DeleteReason::StaleImage,
    DeleteReason::ScaleIn,
    DeleteReason::BootFailed,
    DeleteReason::AgentEnded,
    DeleteReason::Orphan,
    DeleteReason::Nuke,
    DeleteReason::Died,
    DeleteReason::Drained,
];

/// Flag on a packed state: the VM is dormant.
const DORMANT: u64 = 1 << 3;
/// Flag on a packed state: a wake waits in line (its place follows).
const WAKING: u64 = 1 << 4;

fn index_of<T: PartialEq>(all: &[T], v: &T) -> u64 {
    all.iter().position(|x| x == v).unwrap_or(0) as u64
}

/// `#[serde(with = "packed::inventory")]` for the inventory: packed as [`vms`] packs its
/// records (the indexes are rebuilt on reading).
pub mod inventory {
    use super::*;
    use crate::machine::inventory::Inventory;

    /// Writes the inventory's records packed.
    pub fn serialize<S: Serializer>(inv: &Inventory, serializer: S) -> Result<S::Ok, S::Error> {
        super::vms::serialize(inv.map(), serializer)
    }

    /// Reads the records back (packed or plain) and rebuilds the indexes.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Inventory, D::Error> {
        super::vms::deserialize(deserializer).map(Inventory::from)
    }
}

/// Packed VM records.
pub mod vms {
    use super::*;

    /// Writes the inventory packed.
    pub fn serialize<S: Serializer>(
        vms: &BTreeMap<VmId, VmRecord>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let mut w = Writer::new();
        let base = vms.values().map(|v| v.created_at).min().unwrap_or(0);
        w.varint(base);
        w.varint(vms.len() as u64);
        for v in vms.values() {
            w.vm_id(&v.id);
            // The state's index, with the dormancy flags above it (older blobs have none).
            let dormancy =
                if v.dormant { DORMANT } else { 0 } | if v.wake_seq > 0 { WAKING } else { 0 };
            w.varint(index_of(&STATES, &v.state) | dormancy);
            if v.wake_seq > 0 {
                w.varint(v.wake_seq);
            }
            w.string(&v.workspace);
            w.string(&v.image);
            w.varint(v.generation);
            // The agent is the claim's request up to its `@` (then only a flag is written).
            let derived = v.claim.as_deref().map(crate::machine::claims::agent_of)
                == v.agent.as_deref()
                && v.claim.is_some();
            if derived {
                w.varint(0);
            } else {
                w.varint(1);
                w.opt_string(v.agent.as_deref());
            }
            w.opt_string(v.claim.as_deref());
            w.varint(v.created_at - base);
            w.varint(v.ready_at.map_or(0, |r| r.saturating_sub(v.created_at) + 1));
            w.varint(v.delete_reason.map_or(0, |r| index_of(&REASONS, &r) + 1));
            w.opt_string(v.host.as_deref());
            w.varint(u64::from(v.memory_mb));
            w.varint(u64::from(v.delete_failures));
            w.opt_string(v.delete_error.as_deref());
            w.varint(v.warm_round);
        }
        w.finish().serialize(serializer)
    }

    /// Reads the inventory, packed or plain.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<VmId, VmRecord>, D::Error> {
        let blob = match Stored::<BTreeMap<VmId, VmRecord>>::deserialize(deserializer)? {
            Stored::Plain(vms) => return Ok(vms),
            Stored::Packed(blob) => blob,
        };
        read(&blob).map_err(D::Error::custom)
    }

    fn read(blob: &PackedBlob) -> ReadResult<BTreeMap<VmId, VmRecord>> {
        let bytes = inflate(blob)?;
        let mut r = Reader::open(&bytes)?;
        let base = r.varint()?;
        let n = r.varint()?;
        let mut vms = BTreeMap::new();
        for _ in 0..n {
            let id = r.vm_id()?;
            let flags = r.varint()?;
            let state = *STATES
                .get((flags & !(DORMANT | WAKING)) as usize)
                .ok_or("packed VM state out of range")?;
            let dormant = flags & DORMANT != 0;
            let wake_seq = if flags & WAKING != 0 { r.varint()? } else { 0 };
            let workspace = r.string()?;
            let image = r.string()?;
            let generation = r.varint()?;
            let agent_written = r.varint()? == 1;
            let agent = if agent_written { r.opt_string()? } else { None };
            let claim = r.opt_string()?;
            let agent = if agent_written {
                agent
            } else {
                claim
                    .as_deref()
                    .map(|c| crate::machine::claims::agent_of(c).to_string())
            };
            let created_at = base + r.varint()?;
            let ready_at = match r.varint()? {
                0 => None,
                d => Some(created_at + d - 1),
            };
            let delete_reason = match r.varint()? {
                0 => None,
                i => Some(
                    *REASONS
                        .get(i as usize - 1)
                        .ok_or("packed delete reason out of range")?,
                ),
            };
            let host = r.opt_string()?;
            let memory_mb = r.u32()?;
            let delete_failures = r.u32()?;
            let delete_error = r.opt_string()?;
            let warm_round = r.varint()?;
            vms.insert(
                id.clone(),
                VmRecord {
                    id,
                    workspace,
                    image,
                    generation,
                    state,
                    agent,
                    claim,
                    created_at,
                    ready_at,
                    delete_reason,
                    host,
                    memory_mb,
                    delete_failures,
                    delete_error,
                    warm_round,
                    dormant,
                    wake_seq,
                },
            );
        }
        if !r.done() {
            return Err("packed inventory has trailing bytes".into());
        }
        Ok(vms)
    }
}

/// `#[serde(with = "packed::claims")]` for the claims.
pub mod claims {
    use super::*;

    /// Writes the claims packed. A claim's agent is its request up to the last `@` (the
    /// agent sends `<workflow id>@<run id>`); only when it is not is it written out.
    pub fn serialize<S: Serializer>(
        claims: &BTreeMap<String, Claim>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let mut w = Writer::new();
        let base = claims.values().map(|c| c.requested_at).min().unwrap_or(0);
        w.varint(base);
        w.varint(claims.len() as u64);
        for c in claims.values() {
            w.string(&c.request);
            let derived = crate::machine::claims::agent_of(&c.request) == c.agent;
            if derived {
                w.varint(0);
            } else {
                w.varint(1);
                w.string(&c.agent);
            }
            w.string(&c.developer);
            w.string(&c.workspace);
            w.varint(c.seq);
            match &c.vm {
                Some(vm) => {
                    w.varint(1);
                    w.vm_id(vm);
                }
                None => w.varint(0),
            }
            w.opt_string(c.failed.as_deref());
            w.varint(c.requested_at - base);
        }
        w.finish().serialize(serializer)
    }

    /// Reads the claims, packed or plain.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<String, Claim>, D::Error> {
        let blob = match Stored::<BTreeMap<String, Claim>>::deserialize(deserializer)? {
            Stored::Plain(claims) => return Ok(claims),
            Stored::Packed(blob) => blob,
        };
        read(&blob).map_err(D::Error::custom)
    }

    fn read(blob: &PackedBlob) -> ReadResult<BTreeMap<String, Claim>> {
        let bytes = inflate(blob)?;
        let mut r = Reader::open(&bytes)?;
        let base = r.varint()?;
        let n = r.varint()?;
        let mut claims = BTreeMap::new();
        for _ in 0..n {
            let request = r.string()?;
            let agent = match r.varint()? {
                0 => crate::machine::claims::agent_of(&request).to_string(),
                _ => r.string()?,
            };
            let developer = r.string()?;
            let workspace = r.string()?;
            let seq = r.varint()?;
            let vm = match r.varint()? {
                0 => None,
                _ => Some(r.vm_id()?),
            };
            let failed = r.opt_string()?;
            let requested_at = base + r.varint()?;
            claims.insert(
                request.clone(),
                Claim {
                    request,
                    agent,
                    developer,
                    workspace,
                    seq,
                    vm,
                    failed,
                    requested_at,
                },
            );
        }
        if !r.done() {
            return Err("packed claims have trailing bytes".into());
        }
        Ok(claims)
    }
}
