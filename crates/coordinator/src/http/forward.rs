//! Relays API requests from a follower to the leader (see the module docs of
//! [`super`] for the rule). The leader's response is passed back unchanged.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, NotLeaderMarker};
use super::relay_batch::{BatchError, RelayItem};
use crate::node::{Leadership, SharedNode};

pub const HOPS_HEADER: &str = "x-jobsched-hops";
/// A request is relayed at most this many times.
const MAX_HOPS: u32 = 2;
/// How long a request waits for an election to produce a leader.
const LEADER_WAIT: Duration = Duration::from_secs(3);
/// Upper bound for a relayed request: the longest long poll plus a write.
const RELAY_TIMEOUT: Duration = Duration::from_secs(90);

fn served_locally(method: &Method, uri: &Uri) -> bool {
    let path = uri.path();
    if path == "/api/cluster" || path.starts_with("/api/debug/") {
        return true;
    }
    // Stale reads are the documented way to read without asking the leader.
    *method == Method::GET && uri.query().is_some_and(|q| q.split('&').any(|kv| kv == "stale=true" || kv == "stale=1"))
}

pub async fn forward_to_leader(State(node): State<SharedNode>, req: Request, next: Next) -> Response {
    if served_locally(req.method(), req.uri()) {
        return next.run(req).await;
    }
    let hops: u32 =
        req.headers().get(HOPS_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);

    let (parts, body) = req.into_parts();
    // Buffer the body so it can be relayed if leadership moves mid-request.
    let limit = node.config.max_body_bytes;
    let bytes = match read_limited(body, limit).await {
        Some(b) => b,
        None => return ApiError::TooLarge(limit).into_response(),
    };

    match node.wait_for_leader(LEADER_WAIT).await {
        // A leader cut off from its quorum has most likely been replaced:
        // say so at once (nothing was proposed, retrying elsewhere is safe)
        // instead of holding the request until the propose timeout.
        Leadership::Me if node.leader_out_of_touch() => ApiError::NoLeader { leader: None }.into_response(),
        Leadership::Me => {
            let req = Request::from_parts(parts.clone(), Body::from(bytes.clone()));
            let resp = next.run(req).await;
            if resp.extensions().get::<NotLeaderMarker>().is_none() || hops >= MAX_HOPS {
                return resp;
            }
            // Lost leadership while handling: relay to whoever leads now.
            match node.wait_for_leader(LEADER_WAIT).await {
                Leadership::Other { addr, .. } => {
                    relay_with_failover(&node, addr, &parts.method, &parts.uri, &parts.headers, bytes, hops).await
                }
                _ => ApiError::NoLeader { leader: None }.into_response(),
            }
        }
        Leadership::Other { addr, .. } if hops < MAX_HOPS => {
            relay_with_failover(&node, addr, &parts.method, &parts.uri, &parts.headers, bytes, hops).await
        }
        Leadership::Other { addr, .. } => ApiError::NoLeader { leader: Some(addr) }.into_response(),
        Leadership::Unknown => ApiError::NoLeader { leader: None }.into_response(),
    }
}

/// Relay to the leader; if the leader cannot even be connected to (it died),
/// wait for the cluster to elect another and relay there. Retrying is safe
/// only because a refused connection means the request was never delivered.
async fn relay_with_failover(
    node: &SharedNode,
    mut leader_addr: String,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
    hops: u32,
) -> Response {
    let deadline = tokio::time::Instant::now() + LEADER_WAIT;
    loop {
        match relay(node, &leader_addr, method, uri, headers, body.clone(), hops).await {
            Err(RelayError::NotDelivered) if tokio::time::Instant::now() < deadline => {
                // Wait until this node sees a different leader (or itself).
                let mut rx = node.leadership_changes();
                let changed = tokio::time::timeout_at(deadline, async {
                    loop {
                        rx.borrow_and_update();
                        match node.leadership() {
                            Leadership::Other { addr, .. } if addr != leader_addr => return Some(addr),
                            Leadership::Me => return None,
                            _ => {}
                        }
                        if rx.changed().await.is_err() {
                            return None;
                        }
                    }
                })
                .await;
                match changed {
                    Ok(Some(addr)) => leader_addr = addr,
                    // This node became leader: let the client retry here.
                    _ => return ApiError::NoLeader { leader: None }.into_response(),
                }
            }
            Err(RelayError::NotDelivered) => return ApiError::NoLeader { leader: Some(leader_addr) }.into_response(),
            // Delivered but unanswered: the write may have happened.
            Err(RelayError::Unknown) => return ApiError::Timeout.into_response(),
            Ok(resp) => return resp,
        }
    }
}

enum RelayError {
    /// The connection could not be made: the leader never saw the request.
    NotDelivered,
    /// Sent, but no complete answer: the outcome is unknown.
    Unknown,
}

/// Resolves once this node knows a leader other than `leader_addr` (never
/// while leadership is unknown: an election in progress is not a change).
async fn leader_moved_away(node: &SharedNode, leader_addr: &str) {
    let mut rx = node.leadership_changes();
    loop {
        rx.borrow_and_update();
        match node.leadership() {
            Leadership::Me => return,
            Leadership::Other { addr, .. } if addr != leader_addr => return,
            _ => {}
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Read the whole body if it fits in `limit`. An oversized body is still
/// read (and dropped) up to a bound so the client, still sending, gets to
/// read our 413 instead of a reset connection.
async fn read_limited(body: Body, limit: usize) -> Option<Bytes> {
    use futures::StreamExt;
    let drain_bound = limit.saturating_mul(16);
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else { return None };
        seen = seen.saturating_add(chunk.len());
        if seen <= limit {
            buf.extend_from_slice(&chunk);
        } else if seen > drain_bound {
            return None;
        }
    }
    (seen <= limit).then(|| Bytes::from(buf))
}

/// Headers worth passing on in each direction.
const REQUEST_HEADERS: [&str; 3] = ["content-type", "idempotency-key", "accept"];
pub(crate) const RESPONSE_HEADERS: [&str; 3] = ["content-type", "location", "retry-after"];

/// Long polls stay out of relay batches (see [`super::relay_batch`]); they
/// are relayed alone, on a peer stream of their own while they wait.
fn batchable(uri: &Uri) -> bool {
    uri.path() != "/api/jobs/acquire"
}

/// The batcher's form of a request: the headers worth passing on, and the
/// hop count the leader will see.
fn relay_item(method: &Method, uri: &Uri, headers: &HeaderMap, body: Bytes, hops: u32) -> RelayItem {
    let mut item_headers = vec![(HeaderName::from_static(HOPS_HEADER), HeaderValue::from(hops + 1))];
    for name in REQUEST_HEADERS {
        if let Some(v) = headers.get(name) {
            item_headers.push((HeaderName::from_static(name), v.clone()));
        }
    }
    RelayItem {
        method: method.clone(),
        path: uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
        headers: item_headers,
        body,
    }
}

/// Relay through the batcher: one HTTP request to the leader carries every
/// request queued on this node at that moment.
async fn relay_batched(node: &SharedNode, leader_addr: &str, item: RelayItem) -> Result<Response, RelayError> {
    // A frozen leader never answers: stop waiting once another is known
    // (the outcome is unknown, as for a single relay).
    tokio::select! {
        r = node.relays.relay(leader_addr, item) => match r {
            Ok(reply) => Ok(reply.into_response()),
            Err(BatchError::NotDelivered) => Err(RelayError::NotDelivered),
            Err(BatchError::Unknown) => Err(RelayError::Unknown),
        },
        _ = leader_moved_away(node, leader_addr) => {
            tracing::debug!(leader = leader_addr, "leader changed while relaying");
            Err(RelayError::Unknown)
        }
    }
}

async fn relay(
    node: &SharedNode,
    leader_addr: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
    hops: u32,
) -> Result<Response, RelayError> {
    if node.config.relay_batching && batchable(uri) {
        return relay_batched(node, leader_addr, relay_item(method, uri, headers, body, hops)).await;
    }
    if node.config.relay_batching {
        // A long poll: alone, but on a peer stream like the batches.
        let item = relay_item(method, uri, headers, body.clone(), hops);
        let alone = tokio::select! {
            r = node.relays.relay_alone(leader_addr, item, RELAY_TIMEOUT) => r,
            _ = leader_moved_away(node, leader_addr) => {
                tracing::debug!(leader = leader_addr, "leader changed while relaying");
                return Err(RelayError::Unknown);
            }
        };
        match alone {
            Some(Ok(reply)) => return Ok(reply.into_response()),
            Some(Err(BatchError::NotDelivered)) => return Err(RelayError::NotDelivered),
            Some(Err(BatchError::Unknown)) => return Err(RelayError::Unknown),
            None => {} // the leader does not speak peer streams: HTTP below
        }
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("http://{leader_addr}{path}");
    let mut rb = node
        .http
        .request(method.clone(), &url)
        .timeout(RELAY_TIMEOUT)
        .header(HOPS_HEADER, (hops + 1).to_string())
        .body(body);
    for name in REQUEST_HEADERS {
        if let Some(v) = headers.get(name) {
            rb = rb.header(name, v.clone());
        }
    }
    // A frozen (SIGSTOPped, partitioned) leader still accepts connections and
    // never answers: stop waiting as soon as this node sees another leader.
    // The request may have reached the old leader, so the outcome is unknown.
    let sent = tokio::select! {
        r = rb.send() => r,
        _ = leader_moved_away(node, leader_addr) => {
            tracing::debug!(leader = leader_addr, "leader changed while relaying");
            return Err(RelayError::Unknown);
        }
    };
    let resp = match sent {
        Ok(r) => r,
        Err(e) if e.is_connect() => {
            tracing::debug!(leader = leader_addr, "leader unreachable: {e}");
            return Err(RelayError::NotDelivered);
        }
        Err(e) => {
            tracing::warn!(leader = leader_addr, "relay to leader failed: {e}");
            return Err(RelayError::Unknown);
        }
    };
    let status = resp.status();
    let mut out_headers = HeaderMap::new();
    for name in RESPONSE_HEADERS {
        if let Some(v) = resp.headers().get(name) {
            if let Ok(v) = HeaderValue::from_bytes(v.as_bytes()) {
                out_headers.insert(HeaderName::from_static(name), v);
            }
        }
    }
    let body = tokio::select! {
        b = resp.bytes() => b,
        _ = leader_moved_away(node, leader_addr) => return Err(RelayError::Unknown),
    };
    match body {
        Ok(b) => {
            let mut r = Response::new(Body::from(b));
            *r.status_mut() = status;
            *r.headers_mut() = out_headers;
            Ok(r)
        }
        Err(e) => {
            tracing::warn!(leader = leader_addr, "relay response failed: {e}");
            Err(RelayError::Unknown)
        }
    }
}
