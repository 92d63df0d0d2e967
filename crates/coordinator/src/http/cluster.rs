//! Node and cluster status: liveness, readiness, the cluster view and the
//! state digest used to check that replicas agree.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use jobsched_api::{ClusterMember, ClusterView, DigestView, HealthView};
use openraft::ServerState;

use super::error::{ApiError, ApiResult};
use crate::node::SharedNode;

/// How far behind its own log a node may be and still call itself ready.
const READY_MAX_LAG: u64 = 1000;

#[utoipa::path(get, path = "/health", responses((status = 200, body = HealthView)))]
pub async fn health(State(node): State<SharedNode>) -> Json<HealthView> {
    let m = node.raft.metrics().borrow().clone();
    Json(HealthView { status: "ok".into(), node_id: node.id, leader_id: m.current_leader, reason: None })
}

#[utoipa::path(get, path = "/ready", responses((status = 200, body = HealthView), (status = 503, body = HealthView)))]
pub async fn ready(State(node): State<SharedNode>) -> (StatusCode, Json<HealthView>) {
    let m = node.raft.metrics().borrow().clone();
    let applied = m.last_applied.map_or(0, |l| l.index);
    let last = m.last_log_index.unwrap_or(0);
    let reason = if m.current_leader.is_none() {
        Some("no leader known".to_owned())
    } else if let Err(e) = &m.running_state {
        Some(format!("raft stopped: {e}"))
    } else if last.saturating_sub(applied) > READY_MAX_LAG {
        Some(format!("catching up: applied {applied} of {last}"))
    } else {
        None
    };
    let status = if reason.is_none() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let word = if reason.is_none() { "ready" } else { "not_ready" };
    (status, Json(HealthView { status: word.into(), node_id: node.id, leader_id: m.current_leader, reason }))
}

#[utoipa::path(get, path = "/api/cluster", responses((status = 200, body = ClusterView)))]
pub async fn cluster(State(node): State<SharedNode>) -> Json<ClusterView> {
    let m = node.raft.metrics().borrow().clone();
    let members: Vec<ClusterMember> = node.members().into_iter().map(|(id, addr)| ClusterMember { id, addr }).collect();
    let leader_addr = m.current_leader.and_then(|l| members.iter().find(|mem| mem.id == l).map(|mem| mem.addr.clone()));
    let role = match m.state {
        ServerState::Leader => "Leader",
        ServerState::Follower => "Follower",
        ServerState::Candidate => "Candidate",
        ServerState::Learner => "Learner",
        ServerState::Shutdown => "Shutdown",
    };
    Json(ClusterView {
        node_id: node.id,
        role: role.into(),
        leader_id: m.current_leader,
        leader_addr,
        term: m.current_term,
        members,
        last_log_index: m.last_log_index,
        last_applied_index: m.last_applied.map(|l| l.index),
        snapshot_index: m.snapshot.map(|l| l.index),
        purged_index: m.purged.map(|l| l.index),
        millis_since_quorum_ack: m.millis_since_quorum_ack,
        relayed_items: node.relays.items(),
        relay_batches: node.relays.batches(),
    })
}

#[utoipa::path(get, path = "/api/debug/digest", responses((status = 200, body = DigestView)))]
pub async fn digest(State(node): State<SharedNode>) -> ApiResult<Json<DigestView>> {
    let sm = node.sm.clone();
    // Hashing the whole state is a full scan: keep it off the async workers.
    let (applied, digest, keys) = tokio::task::spawn_blocking(move || sm.digest())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(DigestView { node_id: node.id, applied_index: applied, digest: format!("{digest:016x}"), keys }))
}
