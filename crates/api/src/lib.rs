//! The public REST API's JSON shapes: requests, responses and the error body.
//!
//! Field names are camelCase and keep the original system's names (`name`,
//! `type`, `payload`, `maxRetries`, `priority`). Request fields that need a
//! range check are read as wide integers so that an out-of-range value gets a
//! 422 naming the field instead of a generic parse error.
//!
//! Conversions from the core records live here too, so the server, the SDK
//! and the CLI agree on one rendering.

use chrono::{DateTime, TimeZone, Utc};
use jobsched_core::{Job, JobStatus, Worker};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

/// Default `maxRetries` when a submit leaves it out.
pub const DEFAULT_MAX_RETRIES: i64 = 3;
/// Default lease length of an acquisition (the original's 5 minutes).
pub const DEFAULT_LEASE_SECONDS: u64 = 300;
/// Longest long-poll an acquire may ask for.
pub const MAX_WAIT_SECONDS: f64 = 60.0;
/// Default and largest page size of job listings.
pub const DEFAULT_PAGE_LIMIT: usize = 100;
pub const MAX_PAGE_LIMIT: usize = 1000;

/// `POST /api/jobs`
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateJobRequest {
    /// Human-readable name (at most 256 bytes). Defaults to the type.
    #[serde(default)]
    pub name: Option<String>,
    /// Job type: selects the worker handler. Required, non-empty.
    #[serde(rename = "type", default)]
    pub job_type: String,
    /// Any JSON value handed to the handler.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub payload: Value,
    /// Retries after a failed attempt (0..=100, default 3).
    #[serde(default)]
    pub max_retries: Option<i64>,
    /// Higher runs first (-1000..=1000, default 0).
    #[serde(default)]
    pub priority: Option<i64>,
    /// Per-attempt timeout in seconds, enforced by the worker.
    #[serde(default)]
    pub timeout_seconds: Option<f64>,
    /// Do not run before this time (RFC 3339).
    #[serde(default)]
    pub run_at: Option<DateTime<Utc>>,
    /// Idempotency key: a retried submit with the same key returns the first
    /// job (also accepted as the `Idempotency-Key` header).
    #[serde(default)]
    pub request_id: Option<String>,
}

/// A lease as seen by clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    pub id: Uuid,
    /// Position in submission order (unique, increasing). Passing it as the
    /// `cursor` of `GET /api/jobs` lists the jobs submitted after this one.
    /// Defaults to 0 when absent, so clients still read jobs from nodes
    /// older than the field (a rolling upgrade).
    #[serde(default)]
    pub seq: u64,
    pub name: String,
    #[serde(rename = "type")]
    pub job_type: String,
    #[schema(value_type = Object)]
    pub payload: Value,
    pub priority: i32,
    pub max_retries: u32,
    /// Attempts started so far.
    pub attempt: u32,
    /// Pending, Running, Completed, Failed (waiting to retry) or Dead.
    pub status: String,
    pub worker_id: Option<Uuid>,
    /// Fencing token of the current (or last) lease; complete/heartbeat must
    /// carry it.
    pub fencing_token: Option<u64>,
    #[serde(serialize_with = "time_json::rfc3339_opt")]
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// When the job is (or was) next runnable.
    #[serde(serialize_with = "time_json::rfc3339")]
    pub run_at: DateTime<Utc>,
    pub timeout_seconds: Option<f64>,
    #[serde(serialize_with = "time_json::rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "time_json::rfc3339_opt")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "time_json::rfc3339_opt")]
    pub completed_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "time_json::rfc3339")]
    pub updated_at: DateTime<Utc>,
    pub last_error: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    pub request_id: Option<String>,
}

/// Timestamps in answers, written without `core::fmt`.
///
/// Why: chrono serializes a `DateTime` through `Display` and serde_json's
/// `collect_str`, which escapes every formatted piece on its own; with up to
/// six timestamps per job view, that was two thirds of the leader's JSON
/// serialization under the end-to-end benchmark. The text is exactly
/// chrono's (RFC 3339, `Z`, fraction only when non-zero: `.mmm` for whole
/// milliseconds, which is all we store); anything else (sub-millisecond
/// fractions, years outside 0..=9999) is left to chrono. Parsing is chrono's.
pub mod time_json {
    use chrono::{DateTime, Datelike, Timelike, Utc};
    use serde::{Serialize, Serializer};

    /// `serialize_with` for `DateTime<Utc>`.
    pub fn rfc3339<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        let nano = t.nanosecond();
        let year = t.year();
        if !(0..=9999).contains(&year) || !nano.is_multiple_of(1_000_000) || nano >= 1_000_000_000 {
            return t.serialize(s);
        }
        let mut buf = *b"0000-00-00T00:00:00.000Z";
        let put = |buf: &mut [u8; 24], at: usize, value: u32, digits: usize| {
            let mut v = value;
            for i in (0..digits).rev() {
                buf[at + i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(&mut buf, 0, year as u32, 4);
        put(&mut buf, 5, t.month(), 2);
        put(&mut buf, 8, t.day(), 2);
        put(&mut buf, 11, t.hour(), 2);
        put(&mut buf, 14, t.minute(), 2);
        put(&mut buf, 17, t.second(), 2);
        let millis = nano / 1_000_000;
        let text = if millis == 0 {
            buf[19] = b'Z';
            &buf[..20]
        } else {
            put(&mut buf, 20, millis, 3);
            &buf[..]
        };
        s.serialize_str(std::str::from_utf8(text).expect("ASCII digits and separators"))
    }

    /// `serialize_with` for `Option<DateTime<Utc>>` (`null` for `None`).
    pub fn rfc3339_opt<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => rfc3339(t, s),
            None => s.serialize_none(),
        }
    }
}

pub fn millis_to_time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

/// Parse stored JSON text; stored text was validated JSON, but never panic.
fn json_text(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_owned()))
}

impl From<&Job> for JobView {
    fn from(j: &Job) -> Self {
        JobView {
            id: j.id,
            seq: j.seq,
            name: j.spec.name.clone(),
            job_type: j.spec.job_type.clone(),
            payload: json_text(&j.spec.payload),
            priority: j.spec.priority,
            max_retries: j.spec.max_retries,
            attempt: j.attempt,
            status: j.status.as_str().to_owned(),
            worker_id: j.lease.as_ref().map(|l| l.worker_id),
            fencing_token: (j.last_token != 0).then_some(j.last_token),
            lease_expires_at: j.lease.as_ref().map(|l| millis_to_time(l.expires_at)),
            run_at: millis_to_time(j.ready_at),
            timeout_seconds: j.spec.timeout_ms.map(|ms| ms as f64 / 1000.0),
            created_at: millis_to_time(j.created_at),
            started_at: j.started_at.map(millis_to_time),
            completed_at: j.completed_at.map(millis_to_time),
            updated_at: millis_to_time(j.updated_at),
            last_error: j.last_error.clone(),
            result: j.result.as_deref().map(json_text),
            request_id: j.request_id.clone(),
        }
    }
}

impl JobView {
    pub fn status(&self) -> Option<JobStatus> {
        JobStatus::parse(&self.status)
    }
}

/// `GET /api/jobs` response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobList {
    pub jobs: Vec<JobView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// `POST /api/jobs/acquire`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AcquireRequest {
    pub worker_id: Uuid,
    /// Types to take; default: the types the worker registered with (none
    /// registered: any type).
    #[serde(default)]
    pub job_types: Option<Vec<String>>,
    /// How many jobs at most (default 1, capped by the worker's capacity).
    #[serde(default)]
    pub max_jobs: Option<u32>,
    /// Lease length in seconds (default 300). Heartbeats extend it.
    #[serde(default)]
    pub lease_seconds: Option<u64>,
    /// Long poll: wait up to this many seconds for a job (default 0, max 60).
    #[serde(default)]
    pub wait_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AcquireResponse {
    pub jobs: Vec<JobView>,
}

/// `POST /api/jobs/{id}/complete`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompleteRequest {
    /// The fencing token of the lease this attempt ran under.
    pub fencing_token: u64,
    /// Informational; the token decides.
    #[serde(default)]
    pub worker_id: Option<Uuid>,
    /// true (default) for success, false for failure.
    #[serde(default = "yes")]
    pub success: bool,
    /// Result of a successful run (any JSON).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    /// Error message of a failed run.
    #[serde(default, alias = "errorMessage")]
    pub error: Option<String>,
}

fn yes() -> bool {
    true
}

/// Most jobs in one `POST /api/jobs/batch`, or completions in one
/// `POST /api/jobs/complete`.
pub const MAX_BATCH_ITEMS: usize = 1000;

/// `POST /api/jobs/batch`: submit many jobs in one Raft entry (all or none).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchCreateRequest {
    /// 1..=1000 job submissions, each as for `POST /api/jobs`.
    pub jobs: Vec<CreateJobRequest>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchCreateResponse {
    /// One job per submission, in request order. A submission whose
    /// `requestId` was seen before gets the existing job.
    pub jobs: Vec<JobView>,
    /// How many of `jobs` were created by this request.
    pub created: usize,
}

/// One item of `POST /api/jobs/complete`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompletionItem {
    pub job_id: Uuid,
    #[serde(flatten)]
    pub completion: CompleteRequest,
}

/// `POST /api/jobs/complete`: report many results in one Raft entry.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchCompleteRequest {
    /// 1..=1000 results, each as for `POST /api/jobs/{id}/complete` plus `jobId`.
    pub completions: Vec<CompletionItem>,
}

/// The outcome of one completion: the job, or why it was refused (for
/// example `stale_token` when the lease was taken away).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompletionResult {
    pub job_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchCompleteResponse {
    /// One result per completion, in request order.
    pub results: Vec<CompletionResult>,
}

/// `POST /api/jobs/{id}/release`: give a running job back (worker drain).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseRequest {
    pub fencing_token: u64,
}

/// `POST /api/workers/register`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisterWorkerRequest {
    /// Re-register under a known id (after being declared dead); default: a
    /// new id is assigned.
    #[serde(default)]
    pub worker_id: Option<Uuid>,
    #[serde(default)]
    pub name: String,
    /// Concurrent jobs (1..=10000, default 10).
    #[serde(default)]
    pub capacity: Option<i64>,
    /// Job types it runs; empty: any.
    #[serde(default)]
    pub job_types: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerView {
    pub id: Uuid,
    pub name: String,
    pub capacity: u32,
    pub job_types: Vec<String>,
    /// Active or Dead.
    pub status: String,
    #[serde(serialize_with = "time_json::rfc3339")]
    pub registered_at: DateTime<Utc>,
    #[serde(serialize_with = "time_json::rfc3339")]
    pub last_heartbeat_at: DateTime<Utc>,
}

impl From<&Worker> for WorkerView {
    fn from(w: &Worker) -> Self {
        WorkerView {
            id: w.id,
            name: w.name.clone(),
            capacity: w.capacity,
            job_types: w.job_types.clone(),
            status: w.status.as_str().to_owned(),
            registered_at: millis_to_time(w.registered_at),
            last_heartbeat_at: millis_to_time(w.last_heartbeat_at),
        }
    }
}

/// A job a worker reports as running, in a heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeldJob {
    pub job_id: Uuid,
    pub fencing_token: u64,
}

/// `POST /api/workers/{id}/heartbeat` (the body is optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatRequest {
    /// Jobs the worker runs; their leases are extended. Absent: extend all
    /// leases the worker holds.
    #[serde(default)]
    pub jobs: Option<Vec<HeldJob>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatResponse {
    pub worker: WorkerView,
    /// Reported jobs whose lease the worker no longer holds: stop them, their
    /// results would be rejected.
    pub revoked_jobs: Vec<Uuid>,
}

/// `GET /api/workers`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerList {
    pub workers: Vec<WorkerView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterMember {
    pub id: u64,
    pub addr: String,
}

/// `GET /api/cluster`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    pub node_id: u64,
    /// Leader, Follower, Candidate or Learner.
    pub role: String,
    pub leader_id: Option<u64>,
    pub leader_addr: Option<String>,
    pub term: u64,
    pub members: Vec<ClusterMember>,
    pub last_log_index: Option<u64>,
    pub last_applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    /// Index of the last log entry this node has purged (entries up to it
    /// live only in the snapshot).
    #[serde(default)]
    pub purged_index: Option<u64>,
    /// Milliseconds since the leader last heard from a quorum (leader only).
    pub millis_since_quorum_ack: Option<u64>,
    /// Requests this node relayed to a leader in batches since it started,
    /// and the batches that carried them (items / batches = batch size).
    #[serde(default)]
    pub relayed_items: u64,
    #[serde(default)]
    pub relay_batches: u64,
}

/// `GET /api/debug/digest`: a hash of the whole state machine at an index.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DigestView {
    pub node_id: u64,
    pub applied_index: Option<u64>,
    pub digest: String,
    pub keys: u64,
}

/// `GET /health` and `GET /ready`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthView {
    pub status: String,
    pub node_id: u64,
    #[serde(default)]
    pub leader_id: Option<u64>,
    #[serde(default)]
    pub reason: Option<String>,
}

/// Every error response: `{"error":{"code":..,"message":..}}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorDetail {
    /// Machine-readable: invalid_json, validation_failed, not_found,
    /// payload_too_large, stale_token, wrong_status, worker_dead, no_leader,
    /// timeout, internal.
    pub code: String,
    pub message: String,
    /// The offending field, for validation errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The leader's API address, when known (on no_leader / redirects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, TimeZone, Utc};
    use serde::Serialize;

    #[derive(Serialize)]
    struct Ours(#[serde(serialize_with = "super::time_json::rfc3339")] DateTime<Utc>);

    #[derive(Serialize)]
    struct OursOpt(#[serde(serialize_with = "super::time_json::rfc3339_opt")] Option<DateTime<Utc>>);

    fn same_as_chrono(t: DateTime<Utc>) {
        let chrono_text = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::to_string(&Ours(t)).unwrap(), chrono_text, "{t:?}");
        assert_eq!(serde_json::to_string(&OursOpt(Some(t))).unwrap(), chrono_text, "{t:?}");
        // And it reads back as the same instant.
        assert_eq!(serde_json::from_str::<DateTime<Utc>>(&chrono_text).unwrap(), t);
    }

    #[test]
    fn timestamps_are_written_exactly_as_chrono_writes_them() {
        let edges = [
            0i64,
            -1,
            1,
            999,
            1_000,
            1_001,
            59_999,
            86_399_999,
            951_782_400_000,     // 2000-02-29
            1_700_000_000_123,   // a recent instant with millis
            -62_135_596_800_000, // 0001-01-01
            253_402_300_799_999, // 9999-12-31T23:59:59.999
            253_402_300_800_000, // 10000-01-01: chrono's signed year
            -62_167_219_200_001, // before year 0: chrono's signed year
        ];
        for ms in edges {
            same_as_chrono(super::millis_to_time(ms));
        }
        // A deterministic spread over years 1..9999.
        let (lo, hi) = (-62_135_596_800_000i64, 253_402_300_799_999i64);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let ms = lo + (x >> 1) as i64 % (hi - lo);
            same_as_chrono(super::millis_to_time(ms));
        }
        // Sub-millisecond fractions are left to chrono.
        same_as_chrono(Utc.timestamp_opt(1_700_000_000, 123_456_000).unwrap());
        same_as_chrono(Utc.timestamp_opt(1_700_000_000, 7).unwrap());
        assert_eq!(serde_json::to_string(&OursOpt(None)).unwrap(), "null");
    }
}
