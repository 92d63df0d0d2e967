//! Job endpoints: submit (one or a batch), read, list, acquire (with long
//! poll), complete (one or a batch), release, cancel. Handlers validate and build commands (ids are generated
//! here, never in `apply`); all changes go through the proposer.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use jobsched_api::{
    AcquireRequest, AcquireResponse, BatchCompleteRequest, BatchCompleteResponse, BatchCreateRequest,
    BatchCreateResponse, CompleteRequest, CompletionResult, CreateJobRequest, JobList, JobView, ReleaseRequest,
    DEFAULT_LEASE_SECONDS, DEFAULT_MAX_RETRIES, DEFAULT_PAGE_LIMIT, MAX_BATCH_ITEMS, MAX_PAGE_LIMIT, MAX_WAIT_SECONDS,
};
use jobsched_core::state::validate_spec;
use jobsched_core::{limits, Command, CompletionReport, JobSpec, JobStatus, Outcome};
use serde::Deserialize;
use uuid::Uuid;

use super::error::{ApiError, ApiResult};
use super::extract::{parse_id, ApiJson};
use crate::node::{Node, SharedNode};

/// Query parameters shared by the read endpoints.
#[derive(Debug, Default, Deserialize)]
pub struct ReadParams {
    /// `true`: answer from this node's state without asking the leader
    /// (fast, possibly stale).
    pub stale: Option<String>,
}

impl ReadParams {
    fn is_stale(&self) -> bool {
        matches!(self.stale.as_deref(), Some("true" | "1"))
    }
}

/// A new job's id: a UUID version 7 (RFC 9562), whose leading 48 bits are
/// the submission time in milliseconds, so ids made on one node increase
/// (the uuid crate keeps them ordered within the process).
///
/// Why not random (v4): job records are stored under their id, and the
/// scheduler works on jobs in submission order (a submit writes the newest,
/// an acquire takes the oldest pending, a completion follows shortly after).
/// With random ids every one of those reads and writes lands at a random
/// place of RocksDB's memtable skiplist and SST files: cache misses on each
/// memtable insert/lookup, and with a large backlog the acquired jobs' records
/// spread over every data block. Time-ordered ids keep jobs submitted
/// together next to each other. Nothing depends on the order for correctness
/// (ids are opaque to clients; a new leader with a slower clock only makes
/// ids that sort a little earlier).
fn new_job_id() -> Uuid {
    Uuid::now_v7()
}

/// Wait for a linearizable read point unless the caller asked for a stale read.
async fn read_barrier(node: &Node, stale: bool) -> ApiResult<()> {
    if stale {
        Ok(())
    } else {
        node.linearizable_barrier().await
    }
}

#[utoipa::path(post, path = "/api/jobs", request_body = CreateJobRequest,
    responses((status = 201, body = JobView), (status = 200, description = "idempotent retry", body = JobView),
              (status = 400), (status = 413), (status = 422), (status = 503)))]
pub async fn create_job(
    State(node): State<SharedNode>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CreateJobRequest>,
) -> ApiResult<impl IntoResponse> {
    let request_id = match req.request_id.clone() {
        Some(r) => Some(r),
        None => headers
            .get("idempotency-key")
            .map(|v| v.to_str().map(str::to_owned))
            .transpose()
            .map_err(|_| ApiError::validation("Idempotency-Key", "must be ASCII"))?,
    };
    check_request_id(&request_id)?;
    let spec = spec_from_request(&req)?;
    let cmd = Command::SubmitJob { job_id: new_job_id(), request_id, spec };
    match node.propose(cmd).await? {
        Outcome::Submitted { job, created } => {
            let status = if created { StatusCode::CREATED } else { StatusCode::OK };
            let location = format!("/api/jobs/{}", job.id);
            Ok((status, [(header::LOCATION, location)], Json(JobView::from(&job))))
        }
        other => Err(unexpected(other)),
    }
}

fn check_request_id(request_id: &Option<String>) -> ApiResult<()> {
    match request_id {
        Some(r) if r.is_empty() || r.len() > limits::MAX_REQUEST_ID_LEN => {
            Err(ApiError::validation("requestId", format!("must be 1 to {} bytes", limits::MAX_REQUEST_ID_LEN)))
        }
        _ => Ok(()),
    }
}

/// Prefix a validation error's field with the item's place in a batch
/// (`jobs[3].priority`), so the client can tell which item was refused.
fn in_item(list: &str, index: usize, e: ApiError) -> ApiError {
    match e {
        ApiError::Validation { field, message } => ApiError::Validation {
            field: Some(match field {
                Some(f) => format!("{list}[{index}].{f}"),
                None => format!("{list}[{index}]"),
            }),
            message,
        },
        other => other,
    }
}

fn check_batch_len(list: &str, len: usize) -> ApiResult<()> {
    if len == 0 || len > MAX_BATCH_ITEMS {
        return Err(ApiError::validation(list, format!("must hold 1 to {MAX_BATCH_ITEMS} items")));
    }
    Ok(())
}

/// Submit many jobs with one request and one Raft entry. Every item is
/// validated first: one invalid item refuses the whole batch (422, nothing
/// changes). Once proposed, the jobs commit together or not at all; on a
/// 503 `timeout` the outcome is unknown, so give items a `requestId` to make
/// the retry safe.
#[utoipa::path(post, path = "/api/jobs/batch", request_body = BatchCreateRequest,
    responses((status = 201, body = BatchCreateResponse), (status = 200, description = "every item was a retry", body = BatchCreateResponse),
              (status = 400), (status = 413), (status = 422), (status = 503)))]
pub async fn create_jobs(
    State(node): State<SharedNode>,
    ApiJson(req): ApiJson<BatchCreateRequest>,
) -> ApiResult<(StatusCode, Json<BatchCreateResponse>)> {
    check_batch_len("jobs", req.jobs.len())?;
    let mut cmds = Vec::with_capacity(req.jobs.len());
    for (i, item) in req.jobs.iter().enumerate() {
        let request_id = item.request_id.clone();
        check_request_id(&request_id).map_err(|e| in_item("jobs", i, e))?;
        let spec = spec_from_request(item).map_err(|e| in_item("jobs", i, e))?;
        cmds.push(Command::SubmitJob { job_id: new_job_id(), request_id, spec });
    }
    let mut jobs = Vec::with_capacity(cmds.len());
    let mut created_count = 0;
    for outcome in node.propose_all(cmds).await? {
        match outcome {
            Outcome::Submitted { job, created } => {
                created_count += usize::from(created);
                jobs.push(JobView::from(&job));
            }
            Outcome::Rejected(r) => return Err(r.into()),
            other => return Err(unexpected(other)),
        }
    }
    let status = if created_count > 0 { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(BatchCreateResponse { jobs, created: created_count })))
}

fn spec_from_request(req: &CreateJobRequest) -> ApiResult<JobSpec> {
    let job_type = req.job_type.trim().to_owned();
    let max_retries = req.max_retries.unwrap_or(DEFAULT_MAX_RETRIES);
    if !(0..=i64::from(limits::MAX_RETRIES)).contains(&max_retries) {
        return Err(ApiError::validation("maxRetries", format!("must be between 0 and {}", limits::MAX_RETRIES)));
    }
    let priority = req.priority.unwrap_or(0);
    if !(i64::from(limits::MIN_PRIORITY)..=i64::from(limits::MAX_PRIORITY)).contains(&priority) {
        return Err(ApiError::validation(
            "priority",
            format!("must be between {} and {}", limits::MIN_PRIORITY, limits::MAX_PRIORITY),
        ));
    }
    let timeout_ms = match req.timeout_seconds {
        None => None,
        Some(s) if s.is_finite() && s > 0.0 && s <= 7.0 * 24.0 * 3600.0 => Some((s * 1000.0).ceil() as u64),
        Some(_) => {
            return Err(ApiError::validation("timeoutSeconds", "must be a positive number of seconds up to 604800"))
        }
    };
    let name = match &req.name {
        Some(n) => n.clone(),
        None => job_type.clone(),
    };
    let spec = JobSpec {
        name,
        job_type,
        payload: req.payload.to_string(),
        priority: priority as i32,
        max_retries: max_retries as u32,
        timeout_ms,
        run_at: req.run_at.map(|t| t.timestamp_millis()),
    };
    validate_spec(&spec).map_err(ApiError::from)?;
    Ok(spec)
}

fn unexpected(o: Outcome) -> ApiError {
    ApiError::Internal(format!("unexpected outcome {o:?}"))
}

#[utoipa::path(get, path = "/api/jobs/{id}", params(("id" = String, Path), ("stale" = Option<bool>, Query)),
    responses((status = 200, body = JobView), (status = 404)))]
pub async fn get_job(
    State(node): State<SharedNode>,
    Path(id): Path<String>,
    Query(params): Query<ReadParams>,
) -> ApiResult<Json<JobView>> {
    let id = parse_id("job", &id)?;
    read_barrier(&node, params.is_stale()).await?;
    match node.read(|r| r.job(id))? {
        Some(job) => Ok(Json(JobView::from(&job))),
        None => Err(ApiError::NotFound(format!("no job with id {id}"))),
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct ListParams {
    pub status: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
    pub stale: Option<String>,
}

#[utoipa::path(get, path = "/api/jobs",
    params(("status" = Option<String>, Query, description = "Pending, Running, Completed, Failed or Dead"),
           ("limit" = Option<usize>, Query, description = "page size, 1..=1000, default 100"),
           ("cursor" = Option<String>, Query, description = "nextCursor of the previous page"),
           ("stale" = Option<bool>, Query)),
    responses((status = 200, body = JobList), (status = 422)))]
pub async fn list_jobs(State(node): State<SharedNode>, Query(p): Query<ListParams>) -> ApiResult<Json<JobList>> {
    let status = match p.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            ApiError::validation("status", format!("'{s}' is not one of Pending, Running, Completed, Failed, Dead"))
        })?),
    };
    let limit = match p.limit.as_deref() {
        None => DEFAULT_PAGE_LIMIT,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE_LIMIT).contains(&n) => n,
            _ => return Err(ApiError::validation("limit", format!("must be an integer from 1 to {MAX_PAGE_LIMIT}"))),
        },
    };
    let after = match p.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => {
            Some(c.parse::<u64>().map_err(|_| ApiError::validation("cursor", "is not a cursor returned by this API"))?)
        }
    };
    read_barrier(&node, matches!(p.stale.as_deref(), Some("true" | "1"))).await?;
    let (jobs, next) = node.read(|r| r.list_jobs(status, after, limit))?;
    Ok(Json(JobList { jobs: jobs.iter().map(JobView::from).collect(), next_cursor: next.map(|s| s.to_string()) }))
}

#[utoipa::path(post, path = "/api/jobs/acquire", request_body = AcquireRequest,
    responses((status = 200, body = AcquireResponse), (status = 404, description = "unknown worker"),
              (status = 409, description = "worker declared dead")))]
pub async fn acquire(
    State(node): State<SharedNode>,
    ApiJson(req): ApiJson<AcquireRequest>,
) -> ApiResult<Json<AcquireResponse>> {
    let max_jobs = req.max_jobs.unwrap_or(1);
    if max_jobs == 0 || max_jobs > limits::MAX_ACQUIRE_BATCH {
        return Err(ApiError::validation("maxJobs", format!("must be between 1 and {}", limits::MAX_ACQUIRE_BATCH)));
    }
    let lease_secs = req.lease_seconds.unwrap_or(DEFAULT_LEASE_SECONDS);
    if lease_secs == 0 || lease_secs > 24 * 3600 {
        return Err(ApiError::validation("leaseSeconds", "must be between 1 and 86400"));
    }
    let wait = req.wait_seconds.unwrap_or(0.0);
    if !wait.is_finite() || !(0.0..=MAX_WAIT_SECONDS).contains(&wait) {
        return Err(ApiError::validation("waitSeconds", format!("must be between 0 and {MAX_WAIT_SECONDS}")));
    }
    let job_types = req.job_types.clone().unwrap_or_default();
    if job_types.len() > limits::MAX_JOB_TYPES
        || job_types.iter().any(|t| t.is_empty() || t.len() > limits::MAX_TYPE_LEN)
    {
        return Err(ApiError::validation("jobTypes", "at most 64 non-empty types of at most 128 bytes"));
    }
    let cmd = Command::AcquireJobs {
        worker_id: req.worker_id,
        job_types: job_types.clone(),
        max_jobs,
        lease_ms: lease_secs * 1000,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(wait);
    let mut applied = node.applied.clone();
    let mut stopping = node.stopping.clone();
    let mut first = true;
    loop {
        // Only propose when something looks ready, or on the first try when
        // the worker is unknown or dead locally (apply gives the precise
        // error): an empty poll costs no log entry.
        let propose =
            may_have_work(&node, req.worker_id, &job_types)? || (first && !worker_known_active(&node, req.worker_id)?);
        if propose {
            match node.propose(cmd.clone()).await? {
                Outcome::Acquired { jobs } if !jobs.is_empty() => {
                    return Ok(Json(AcquireResponse { jobs: jobs.iter().map(JobView::from).collect() }));
                }
                Outcome::Acquired { .. } => {}
                other => return Err(unexpected(other)),
            }
        }
        first = false;
        // Sleep until an apply might have made a job ready, a delayed job
        // comes due, the wait ends, or the node stops.
        let now = node.now();
        let next_due = node.peek(|r| r.next_delayed_at())?;
        let mut wake = deadline;
        if let Some(due) = next_due {
            let in_ms = (due - now).max(1) as u64;
            wake = wake.min(tokio::time::Instant::now() + Duration::from_millis(in_ms));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(Json(AcquireResponse { jobs: Vec::new() }));
        }
        tokio::select! {
            changed = applied.changed() => {
                if changed.is_err() {
                    return Ok(Json(AcquireResponse { jobs: Vec::new() }));
                }
            }
            _ = tokio::time::sleep_until(wake) => {}
            _ = stopping.wait_for(|s| *s) => return Ok(Json(AcquireResponse { jobs: Vec::new() })),
        }
    }
}

/// Is there (by this node's applied state) a ready job for this worker?
/// A hint: the acquire's apply decides.
fn may_have_work(node: &Node, worker_id: Uuid, job_types: &[String]) -> ApiResult<bool> {
    let now = node.now();
    node.peek(|r| {
        let types = if job_types.is_empty() {
            match r.worker(worker_id)? {
                Some(w) => w.job_types,
                None => return Ok(true), // let apply answer "unknown worker"
            }
        } else {
            job_types.to_vec()
        };
        r.has_ready(&types, now)
    })
}

fn worker_known_active(node: &Node, worker_id: Uuid) -> ApiResult<bool> {
    node.peek(|r| Ok(r.worker(worker_id)?.is_some_and(|w| w.status == jobsched_core::WorkerStatus::Active)))
}

#[utoipa::path(post, path = "/api/jobs/{id}/complete", request_body = CompleteRequest, params(("id" = String, Path)),
    responses((status = 200, body = JobView), (status = 404), (status = 409, description = "stale fencing token")))]
pub async fn complete(
    State(node): State<SharedNode>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<CompleteRequest>,
) -> ApiResult<Json<JobView>> {
    let job_id = parse_id("job", &id)?;
    match node.propose(complete_command(job_id, &req)?).await? {
        Outcome::Job { job } => Ok(Json(JobView::from(&job))),
        other => Err(unexpected(other)),
    }
}

fn complete_command(job_id: Uuid, req: &CompleteRequest) -> ApiResult<Command> {
    let report = if req.success {
        let result = req.result.as_ref().map(|v| v.to_string());
        if result.as_ref().is_some_and(|r| r.len() > limits::MAX_RESULT_BYTES) {
            return Err(ApiError::validation("result", format!("must be at most {} bytes", limits::MAX_RESULT_BYTES)));
        }
        CompletionReport::Succeeded { result }
    } else {
        CompletionReport::Failed { error: req.error.clone().unwrap_or_else(|| "failed".into()) }
    };
    Ok(Command::CompleteJob { job_id, fencing_token: req.fencing_token, report })
}

/// Report many results with one request and one Raft entry. Each item is
/// judged on its own, exactly as `POST /api/jobs/{id}/complete` would: the
/// answer lists the job or the error (`stale_token`, `not_found`, ...) per
/// item, in request order. Malformed items refuse the whole request (422).
#[utoipa::path(post, path = "/api/jobs/complete", request_body = BatchCompleteRequest,
    responses((status = 200, body = BatchCompleteResponse), (status = 400), (status = 413), (status = 422), (status = 503)))]
pub async fn complete_many(
    State(node): State<SharedNode>,
    ApiJson(req): ApiJson<BatchCompleteRequest>,
) -> ApiResult<Json<BatchCompleteResponse>> {
    check_batch_len("completions", req.completions.len())?;
    let cmds = req
        .completions
        .iter()
        .enumerate()
        .map(|(i, item)| complete_command(item.job_id, &item.completion).map_err(|e| in_item("completions", i, e)))
        .collect::<ApiResult<Vec<_>>>()?;
    let outcomes = node.propose_all(cmds).await?;
    let results = req
        .completions
        .iter()
        .zip(outcomes)
        .map(|(item, outcome)| match outcome {
            Outcome::Job { job } => {
                CompletionResult { job_id: item.job_id, job: Some(JobView::from(&job)), error: None }
            }
            Outcome::Rejected(r) => {
                CompletionResult { job_id: item.job_id, job: None, error: Some(ApiError::from(r).detail()) }
            }
            other => CompletionResult { job_id: item.job_id, job: None, error: Some(unexpected(other).detail()) },
        })
        .collect();
    Ok(Json(BatchCompleteResponse { results }))
}

#[utoipa::path(post, path = "/api/jobs/{id}/release", request_body = ReleaseRequest, params(("id" = String, Path)),
    responses((status = 200, body = JobView), (status = 404), (status = 409)))]
pub async fn release(
    State(node): State<SharedNode>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ReleaseRequest>,
) -> ApiResult<Json<JobView>> {
    let job_id = parse_id("job", &id)?;
    match node.propose(Command::ReleaseJob { job_id, fencing_token: req.fencing_token }).await? {
        Outcome::Job { job } => Ok(Json(JobView::from(&job))),
        other => Err(unexpected(other)),
    }
}

#[utoipa::path(post, path = "/api/jobs/{id}/cancel", params(("id" = String, Path)),
    responses((status = 200, body = JobView), (status = 404), (status = 409, description = "running or finished")))]
pub async fn cancel(State(node): State<SharedNode>, Path(id): Path<String>) -> ApiResult<Json<JobView>> {
    let job_id = parse_id("job", &id)?;
    match node.propose(Command::CancelJob { job_id }).await? {
        Outcome::Job { job } => Ok(Json(JobView::from(&job))),
        other => Err(unexpected(other)),
    }
}
