//! Worker endpoints: register, heartbeat, deregister, list.
//!
//! Heartbeats are replicated commands: they extend the leases of the jobs the
//! worker reports, so any node that becomes leader sees them.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use jobsched_api::{HeartbeatRequest, HeartbeatResponse, RegisterWorkerRequest, WorkerList, WorkerView};
use jobsched_core::{limits, Command, Outcome, WorkerStatus};
use serde::Deserialize;
use uuid::Uuid;

use super::error::{ApiError, ApiResult};
use super::extract::{parse_id, ApiJson, OptionalJson};
use crate::node::SharedNode;

#[utoipa::path(post, path = "/api/workers/register", request_body = RegisterWorkerRequest,
    responses((status = 201, body = WorkerView), (status = 422)))]
pub async fn register(
    State(node): State<SharedNode>,
    ApiJson(req): ApiJson<RegisterWorkerRequest>,
) -> ApiResult<(StatusCode, Json<WorkerView>)> {
    let capacity = req.capacity.unwrap_or(10);
    if !(1..=i64::from(limits::MAX_WORKER_CAPACITY)).contains(&capacity) {
        return Err(ApiError::validation("capacity", format!("must be between 1 and {}", limits::MAX_WORKER_CAPACITY)));
    }
    if req.name.len() > limits::MAX_NAME_LEN {
        return Err(ApiError::validation("name", format!("must be at most {} bytes", limits::MAX_NAME_LEN)));
    }
    if req.job_types.len() > limits::MAX_JOB_TYPES
        || req.job_types.iter().any(|t| t.trim().is_empty() || t.len() > limits::MAX_TYPE_LEN)
    {
        return Err(ApiError::validation("jobTypes", "at most 64 non-empty types of at most 128 bytes"));
    }
    let worker_id = req.worker_id.unwrap_or_else(Uuid::new_v4);
    let name = if req.name.is_empty() { format!("worker-{}", &worker_id.to_string()[..8]) } else { req.name.clone() };
    let cmd = Command::RegisterWorker { worker_id, name, capacity: capacity as u32, job_types: req.job_types.clone() };
    match node.propose(cmd).await? {
        Outcome::Worker { worker } => Ok((StatusCode::CREATED, Json(WorkerView::from(&worker)))),
        other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
    }
}

#[utoipa::path(post, path = "/api/workers/{id}/heartbeat", request_body = Option<HeartbeatRequest>, params(("id" = String, Path)),
    responses((status = 200, body = HeartbeatResponse), (status = 404), (status = 409, description = "worker declared dead: register again")))]
pub async fn heartbeat(
    State(node): State<SharedNode>,
    Path(id): Path<String>,
    OptionalJson(req): OptionalJson<HeartbeatRequest>,
) -> ApiResult<Json<HeartbeatResponse>> {
    let worker_id = parse_id("worker", &id)?;
    let jobs = req.jobs.map(|js| js.into_iter().map(|j| (j.job_id, j.fencing_token)).collect::<Vec<_>>());
    if jobs.as_ref().is_some_and(|j| j.len() > limits::MAX_WORKER_CAPACITY as usize) {
        return Err(ApiError::validation("jobs", "too many jobs"));
    }
    match node.propose(Command::Heartbeat { worker_id, jobs }).await? {
        Outcome::Heartbeat { worker, revoked } => {
            Ok(Json(HeartbeatResponse { worker: WorkerView::from(&worker), revoked_jobs: revoked }))
        }
        other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
    }
}

#[utoipa::path(delete, path = "/api/workers/{id}", params(("id" = String, Path)),
    responses((status = 200, body = WorkerView), (status = 404)))]
pub async fn deregister(State(node): State<SharedNode>, Path(id): Path<String>) -> ApiResult<Json<WorkerView>> {
    let worker_id = parse_id("worker", &id)?;
    match node.propose(Command::DeregisterWorker { worker_id }).await? {
        Outcome::Worker { worker } => Ok(Json(WorkerView::from(&worker))),
        other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct WorkerListParams {
    /// active (default), dead or all.
    pub status: Option<String>,
    pub stale: Option<String>,
}

#[utoipa::path(get, path = "/api/workers",
    params(("status" = Option<String>, Query, description = "active (default), dead or all"), ("stale" = Option<bool>, Query)),
    responses((status = 200, body = WorkerList), (status = 422)))]
pub async fn list(State(node): State<SharedNode>, Query(p): Query<WorkerListParams>) -> ApiResult<Json<WorkerList>> {
    let filter = match p.status.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("active") => Some(WorkerStatus::Active),
        Some("dead") => Some(WorkerStatus::Dead),
        Some("all") => None,
        Some(other) => {
            return Err(ApiError::validation("status", format!("'{other}' is not one of active, dead, all")))
        }
    };
    if !matches!(p.stale.as_deref(), Some("true" | "1")) {
        node.linearizable_barrier().await?;
    }
    let workers = node.read(|r| r.workers())?;
    Ok(Json(WorkerList {
        workers: workers.iter().filter(|w| filter.is_none_or(|f| w.status == f)).map(WorkerView::from).collect(),
    }))
}

#[utoipa::path(get, path = "/api/workers/{id}", params(("id" = String, Path)),
    responses((status = 200, body = WorkerView), (status = 404)))]
pub async fn get_worker(
    State(node): State<SharedNode>,
    Path(id): Path<String>,
    Query(p): Query<super::jobs::ReadParams>,
) -> ApiResult<Json<WorkerView>> {
    let worker_id = parse_id("worker", &id)?;
    if !matches!(p.stale.as_deref(), Some("true" | "1")) {
        node.linearizable_barrier().await?;
    }
    match node.read(|r| r.worker(worker_id))? {
        Some(w) => Ok(Json(WorkerView::from(&w))),
        None => Err(ApiError::NotFound(format!("no worker with id {worker_id}"))),
    }
}
