//! Key layout of the state machine's key-value space, and record encoding.
//!
//! Every key starts with a one-byte table tag. Integers are big-endian so byte
//! order equals numeric order; priority is stored inverted so that a forward
//! scan yields the highest priority first.
//!
//! | tag | key                                   | value                 |
//! |-----|---------------------------------------|-----------------------|
//! | `j` | job id                                | [`crate::Job`]        |
//! | `n` | seq                                   | job id (all jobs, submission order) |
//! | `s` | status code, seq                      | job id                |
//! | `q` | inv priority, seq                     | job id (ready, any type) |
//! | `t` | type len (u16), type, inv priority, seq | job id (ready, by type) |
//! | `d` | ready_at, seq                         | job id (Pending/Failed not yet due) |
//! | `f` | completed_at, seq                     | job id (terminal, for retention) |
//! | `e` | lease expires_at, seq                 | job id (Running, for lease expiry) |
//! | `r` | request id                            | job id (idempotent submit) |
//! | `w` | worker id                             | [`crate::Worker`]     |
//! | `m` | name                                  | meta (clock, next seq) |
//!
//! Records are stored as one format-version byte followed by bincode.

use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use crate::kv::KvError;
use crate::{JobStatus, Millis};

/// Version byte in front of every stored record.
pub const FORMAT_VERSION: u8 = 1;

pub const JOB: u8 = b'j';
pub const BY_SEQ: u8 = b'n';
pub const BY_STATUS: u8 = b's';
pub const READY_ANY: u8 = b'q';
pub const READY_TYPE: u8 = b't';
pub const DELAYED: u8 = b'd';
pub const FINISHED: u8 = b'f';
pub const LEASE_EXPIRY: u8 = b'e';
pub const REQUEST: u8 = b'r';
pub const WORKER: u8 = b'w';
pub const META: u8 = b'm';

pub const META_CLOCK: &[u8] = b"mclock";
pub const META_NEXT_SEQ: &[u8] = b"mseq";

pub fn job(id: Uuid) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(JOB);
    k.extend_from_slice(id.as_bytes());
    k
}

pub fn by_seq(seq: u64) -> Vec<u8> {
    let mut k = vec![BY_SEQ];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn status_prefix(status: JobStatus) -> Vec<u8> {
    vec![BY_STATUS, status.code()]
}

pub fn by_status(status: JobStatus, seq: u64) -> Vec<u8> {
    let mut k = status_prefix(status);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Maps priority so that ascending bytes mean descending priority.
fn inv_priority(p: i32) -> [u8; 4] {
    (!((p as u32) ^ 0x8000_0000)).to_be_bytes()
}

pub fn ready_any(priority: i32, seq: u64) -> Vec<u8> {
    let mut k = vec![READY_ANY];
    k.extend_from_slice(&inv_priority(priority));
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn ready_type_prefix(job_type: &str) -> Vec<u8> {
    let mut k = vec![READY_TYPE];
    // Type names are bounded by limits::MAX_TYPE_LEN, far below u16::MAX.
    k.extend_from_slice(&(job_type.len() as u16).to_be_bytes());
    k.extend_from_slice(job_type.as_bytes());
    k
}

pub fn ready_type(job_type: &str, priority: i32, seq: u64) -> Vec<u8> {
    let mut k = ready_type_prefix(job_type);
    k.extend_from_slice(&inv_priority(priority));
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Times are stored offset so that negative (pre-1970) values still sort.
fn time_bytes(t: Millis) -> [u8; 8] {
    ((t as u64) ^ 0x8000_0000_0000_0000).to_be_bytes()
}

pub fn time_from_bytes(b: &[u8]) -> Millis {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    (u64::from_be_bytes(a) ^ 0x8000_0000_0000_0000) as i64
}

pub fn delayed(ready_at: Millis, seq: u64) -> Vec<u8> {
    let mut k = vec![DELAYED];
    k.extend_from_slice(&time_bytes(ready_at));
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn finished(completed_at: Millis, seq: u64) -> Vec<u8> {
    let mut k = vec![FINISHED];
    k.extend_from_slice(&time_bytes(completed_at));
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn lease_expiry(expires_at: Millis, seq: u64) -> Vec<u8> {
    let mut k = vec![LEASE_EXPIRY];
    k.extend_from_slice(&time_bytes(expires_at));
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Prefixes that readers scan from their front but that the apply path
/// does not scan on its own (the leader's lease-expiry and retention checks).
/// The store refreshes their scan hints from the apply path now and then, so
/// that those reads skip the tombstones every finished lease leaves at the
/// front of the lease index (see `scan_hints` in the raft crate).
pub const READER_FRONT_SCANS: &[&[u8]] = &[&[LEASE_EXPIRY], &[FINISHED]];

/// Is this key (or scan prefix) in a queue-like index: the ready queues and
/// the delayed index, which `apply` reads from their front on every acquire
/// and every batch? The store keeps their first rows in memory (see
/// `queue_fronts` in the raft crate).
pub fn is_queue_key(key: &[u8]) -> bool {
    matches!(key.first(), Some(&READY_ANY | &READY_TYPE | &DELAYED))
}

pub fn request(request_id: &str) -> Vec<u8> {
    let mut k = vec![REQUEST];
    k.extend_from_slice(request_id.as_bytes());
    k
}

pub fn worker(id: Uuid) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(WORKER);
    k.extend_from_slice(id.as_bytes());
    k
}

pub fn id_from_value(v: &[u8]) -> Result<Uuid, KvError> {
    Uuid::from_slice(v).map_err(|e| KvError(format!("corrupt index value: {e}")))
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    // Serialising our own plain structs into a Vec cannot fail.
    bincode::serialize_into(&mut out, value).expect("bincode serialisation of a plain struct");
    out
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, KvError> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, rest)) => {
            bincode::deserialize(rest).map_err(|e| KvError(format!("corrupt record: {e}")))
        }
        Some((v, _)) => Err(KvError(format!("unknown record format version {v}"))),
        None => Err(KvError("empty record".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_orders_descending() {
        assert!(ready_any(5, 9) < ready_any(4, 1));
        assert!(ready_any(0, 1) < ready_any(-1, 0));
        assert!(ready_any(1000, 1) < ready_any(1000, 2));
        assert!(ready_any(i32::MAX, 0) < ready_any(i32::MIN, 0));
    }

    #[test]
    fn time_orders_ascending() {
        assert!(delayed(-5, 0) < delayed(0, 0));
        assert!(delayed(1, 9) < delayed(2, 0));
        assert_eq!(time_from_bytes(&delayed(-77, 0)[1..]), -77);
    }
}
