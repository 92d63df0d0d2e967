//! Batched relays: how a follower hands API requests to the leader.
//!
//! Instead of one HTTP request to the leader per relayed client request, a
//! follower queues them and sends whatever is queued as one batch to the
//! leader, as an application frame on a peer stream
//! (`jobsched_raft::peer_stream`, the connections Raft RPCs use) or, to a
//! leader that does not speak peer streams, as `POST /raft/relay` (same
//! body). The leader runs every item through its own API router in-process
//! (so each item gets exactly the handling, validation and errors it would
//! get if the client had called the leader) and answers with all the
//! responses at once.
//!
//! Why: on a loaded cluster two of three client requests land on followers.
//! A relay per request costs the follower an HTTP client round and the
//! leader a full HTTP server round for each; both are CPU the 2-core boxes
//! we run on do not have to spare. A batch costs one round for many.
//!
//! Batching policy (like the proposer's group commit): at most
//! [`MAX_IN_FLIGHT`] batches are outstanding; a request that arrives while a
//! slot is free leaves at once (a lone client pays no extra latency), the
//! rest queue and leave together when a slot frees up.
//!
//! Not batched: long-poll acquires (`/api/jobs/acquire`). One item that
//! waits 30 s for work would hold up every other answer in its batch, so
//! each is sent at once as a batch of one ([`RelayBatcher::relay_alone`])
//! on a peer stream of its own; the leader drops the request if the
//! follower closes that stream (its client went away).
//!
//! Failure semantics per item are the ones a single relay has: a batch that
//! could not be delivered (connection refused) is `NotDelivered` for every
//! item, so each may be retried on the next leader; a batch that was sent
//! but not answered is `Unknown` for every item (any of them may have been
//! applied). For the same reason a batch is never resent on another
//! connection after a pooled one fails (`Retry::Never`). A caller that
//! stops waiting (its leader moved away) simply drops its reply; a batch
//! whose callers have all gone is abandoned.
//!
//! Wire format (peers only, not a public API): a version byte, a `u32` item
//! count, then per item length-prefixed fields, little endian; see
//! [`encode_items`] and [`encode_replies`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use jobsched_raft::peer_stream::{raw_frame, ExchangeError, Retry, RpcKind, StreamPool};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tower::ServiceExt;

/// Internal endpoint on every node.
pub const PATH_RELAY: &str = "/raft/relay";
const WIRE_VERSION: u8 = 1;
/// Batches outstanding per follower, at most.
const MAX_IN_FLIGHT: usize = 4;
/// Items per batch, at most.
const MAX_ITEMS: usize = 256;
/// Request bodies per batch, at most (a single larger item still goes, alone).
const MAX_BATCH_BYTES: usize = 4 << 20;
/// A batch holds only non-blocking requests (writes and reads), which the
/// leader answers within its propose timeout (10 s by default) plus a leader
/// wait; past this the answer is not coming.
const BATCH_TIMEOUT: Duration = Duration::from_secs(30);

/// One relayed API request.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayItem {
    pub method: Method,
    /// Path and query, e.g. `/api/jobs?x=1`.
    pub path: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

/// The leader's answer to one item.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayReply {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

impl RelayReply {
    pub fn into_response(self) -> Response {
        let mut r = Response::new(Body::from(self.body));
        *r.status_mut() = self.status;
        let h = r.headers_mut();
        for (k, v) in self.headers {
            h.append(k, v);
        }
        r
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchError {
    /// The leader never saw the batch (connection refused): safe to retry.
    NotDelivered,
    /// Sent but not answered: the outcome of every item is unknown.
    Unknown,
}

struct Queued {
    /// The leader's address, `host:port`.
    leader: String,
    item: RelayItem,
    reply: oneshot::Sender<Result<RelayReply, BatchError>>,
}

/// The follower side: a queue and the task that drains it into batches.
#[derive(Clone)]
pub struct RelayBatcher {
    tx: mpsc::Sender<Queued>,
    counts: Arc<Counts>,
    transport: Transport,
}

/// Shown on `GET /api/cluster`: how well batching works on this node.
#[derive(Default)]
struct Counts {
    items: AtomicU64,
    batches: AtomicU64,
}

impl RelayBatcher {
    /// `streams`: the process's peer-stream pool; `http`: the fallback.
    pub fn start(http: reqwest::Client, streams: Arc<StreamPool>) -> RelayBatcher {
        let (tx, rx) = mpsc::channel(MAX_ITEMS * MAX_IN_FLIGHT * 4);
        let counts = Arc::new(Counts::default());
        let transport = Transport { http, streams };
        tokio::spawn(run(transport.clone(), rx, counts.clone()));
        RelayBatcher { tx, counts, transport }
    }

    /// Items sent to a leader in batches so far.
    pub fn items(&self) -> u64 {
        self.counts.items.load(Ordering::Relaxed)
    }

    /// Batches sent so far.
    pub fn batches(&self) -> u64 {
        self.counts.batches.load(Ordering::Relaxed)
    }

    /// Relay one request to the leader at `leader` (host:port) in the next
    /// batch and wait for its answer.
    pub async fn relay(&self, leader: &str, item: RelayItem) -> Result<RelayReply, BatchError> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Queued { leader: leader.to_string(), item, reply }).await.is_err() {
            return Err(BatchError::NotDelivered);
        }
        rx.await.unwrap_or(Err(BatchError::Unknown))
    }

    /// Relay one request on its own, now, as a batch of one on a peer
    /// stream, waiting up to `timeout`: for long polls, which must not hold
    /// up a batch. `None`: the leader does not speak peer streams; relay
    /// over HTTP instead.
    pub async fn relay_alone(
        &self,
        leader: &str,
        item: RelayItem,
        timeout: Duration,
    ) -> Option<Result<RelayReply, BatchError>> {
        let body = encode_items(std::slice::from_ref(&item));
        drop(item);
        let replies = exchange_stream(&self.transport.streams, leader, &body, timeout).await?;
        Some(replies.and_then(|mut replies| match (replies.pop(), replies.is_empty()) {
            (Some(reply), true) => Ok(reply),
            _ => {
                tracing::error!(leader, "relay of one item: {} answers", replies.len() + 1);
                Err(BatchError::Unknown)
            }
        }))
    }
}

/// How batches reach the leader: a peer stream, else HTTP.
#[derive(Clone)]
struct Transport {
    http: reqwest::Client,
    streams: Arc<StreamPool>,
}

async fn run(transport: Transport, mut rx: mpsc::Receiver<Queued>, counts: Arc<Counts>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    // An item for another leader than the batch being filled waits here for
    // the next batch (leaders change rarely, so this is almost always None).
    let mut carry: Option<Queued> = None;
    loop {
        let first = match carry.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        // Wait for a slot *before* draining: what arrives meanwhile joins.
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let leader = first.leader.clone();
        let mut bytes = first.item.body.len();
        let mut batch = vec![first];
        while batch.len() < MAX_ITEMS && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(q) if q.leader == leader && bytes + q.item.body.len() <= MAX_BATCH_BYTES => {
                    bytes += q.item.body.len();
                    batch.push(q);
                }
                Ok(q) => {
                    carry = Some(q);
                    break;
                }
                Err(_) => break,
            }
        }
        counts.batches.fetch_add(1, Ordering::Relaxed);
        counts.items.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let transport = transport.clone();
        tokio::spawn(async move {
            let _permit = permit;
            send_batch(&transport, &leader, batch).await;
        });
    }
}

/// Send one encoded batch over a peer stream; `None`: the leader does not
/// speak peer streams, use HTTP.
async fn exchange_stream(
    streams: &StreamPool,
    leader: &str,
    body: &[u8],
    timeout: Duration,
) -> Option<Result<Vec<RelayReply>, BatchError>> {
    if streams.http_only(leader) {
        return None;
    }
    let frame = match raw_frame(RpcKind::App, body) {
        Ok(frame) => frame,
        Err(e) => {
            tracing::warn!(leader, "relay batch not sent: {e}");
            return Some(Err(BatchError::NotDelivered));
        }
    };
    let answer = match tokio::time::timeout(timeout, streams.call(leader, &frame, Retry::Never)).await {
        Err(_) => {
            tracing::warn!(leader, "relay batch: no answer within {timeout:?}");
            return Some(Err(BatchError::Unknown));
        }
        Ok(Ok(answer)) => answer,
        Ok(Err(ExchangeError::NotSupported(_))) => return None,
        Ok(Err(e @ ExchangeError::Connect(_))) => {
            tracing::debug!(leader, "leader unreachable: {e}");
            return Some(Err(BatchError::NotDelivered));
        }
        Ok(Err(e)) => {
            tracing::warn!(leader, "relay batch failed: {e}");
            return Some(Err(BatchError::Unknown));
        }
    };
    Some(decode_replies(&answer).map_err(|e| {
        tracing::warn!(leader, "relay batch answer unreadable: {e}");
        BatchError::Unknown
    }))
}

async fn send_batch(transport: &Transport, leader: &str, batch: Vec<Queued>) {
    let (items, mut replies): (Vec<RelayItem>, Vec<_>) = batch.into_iter().map(|q| (q.item, q.reply)).unzip();
    let body = encode_items(&items);
    drop(items);
    let url = format!("http://{leader}{PATH_RELAY}");
    let exchange = async {
        if let Some(result) = exchange_stream(&transport.streams, leader, &body, BATCH_TIMEOUT).await {
            return result;
        }
        let resp = match transport.http.post(&url).timeout(BATCH_TIMEOUT).body(body).send().await {
            Ok(r) => r,
            Err(e) if e.is_connect() => {
                tracing::debug!(leader, "leader unreachable: {e}");
                return Err(BatchError::NotDelivered);
            }
            Err(e) => {
                tracing::warn!(leader, "relay batch failed: {e}");
                return Err(BatchError::Unknown);
            }
        };
        if !resp.status().is_success() {
            tracing::warn!(leader, status = %resp.status(), "relay batch refused");
            return Err(BatchError::Unknown);
        }
        let bytes = resp.bytes().await.map_err(|_| BatchError::Unknown)?;
        decode_replies(&bytes).map_err(|e| {
            tracing::warn!(leader, "relay batch answer unreadable: {e}");
            BatchError::Unknown
        })
    };
    // Why: a frozen leader accepts the connection and never answers; the
    // callers give up when they see a new leader, and then nobody wants this
    // batch, which would otherwise hold a slot until BATCH_TIMEOUT.
    let all_gone = async {
        for r in replies.iter_mut() {
            r.closed().await;
        }
    };
    let result = tokio::select! {
        r = exchange => r,
        _ = all_gone => return,
    };
    match result {
        Ok(answers) if answers.len() == replies.len() => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(Ok(answer));
            }
        }
        Ok(answers) => {
            tracing::error!(leader, "relay batch: {} answers for {} items", answers.len(), replies.len());
            for reply in replies {
                let _ = reply.send(Err(BatchError::Unknown));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e));
            }
        }
    }
}

/// The leader side of `POST /raft/relay` (the HTTP fallback of
/// [`answer_batch`]).
pub async fn serve(api: Router, body: Bytes) -> Response {
    match answer_batch(api, body).await {
        Ok(answer) => ([(axum::http::header::CONTENT_TYPE, "application/octet-stream")], answer).into_response(),
        Err(e) => super::error::ApiError::BadRequest(format!("relay batch: {e}")).into_response(),
    }
}

/// The leader side of a relay batch: run each item through `api` (the public
/// API router) concurrently, so their commands can share Raft entries, and
/// return every response in item order, encoded. `Err`: the batch does not
/// decode.
pub async fn answer_batch(api: Router, body: Bytes) -> Result<Vec<u8>, String> {
    let items = decode_items(&body)?;
    let answers = futures::future::join_all(items.into_iter().map(|item| {
        let api = api.clone();
        async move {
            let mut req = Request::new(Body::from(item.body));
            *req.method_mut() = item.method;
            *req.uri_mut() = match item.path.parse() {
                Ok(u) => u,
                Err(_) => return error_reply(StatusCode::BAD_REQUEST, "bad relayed path"),
            };
            let headers: &mut HeaderMap = req.headers_mut();
            for (k, v) in item.headers {
                headers.append(k, v);
            }
            let resp = match api.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            let (parts, body) = resp.into_parts();
            match axum::body::to_bytes(body, usize::MAX).await {
                Ok(b) => RelayReply {
                    status: parts.status,
                    headers: super::forward::RESPONSE_HEADERS
                        .iter()
                        .filter_map(|name| Some((HeaderName::from_static(name), parts.headers.get(*name)?.clone())))
                        .collect(),
                    body: b,
                },
                Err(_) => error_reply(StatusCode::INTERNAL_SERVER_ERROR, "response body failed"),
            }
        }
    }))
    .await;
    Ok(encode_replies(&answers))
}

fn error_reply(status: StatusCode, msg: &str) -> RelayReply {
    let body = serde_json::json!({"error": {"code": "relay", "message": msg}}).to_string();
    RelayReply {
        status,
        headers: vec![(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body: Bytes::from(body),
    }
}

// --- wire format -----------------------------------------------------------

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_headers(out: &mut Vec<u8>, headers: &[(HeaderName, HeaderValue)]) {
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (k, v) in headers {
        put_bytes(out, k.as_str().as_bytes());
        put_bytes(out, v.as_bytes());
    }
}

pub fn encode_items(items: &[RelayItem]) -> Vec<u8> {
    let size: usize = items.iter().map(|i| 64 + i.path.len() + i.body.len()).sum();
    let mut out = Vec::with_capacity(5 + size);
    out.push(WIRE_VERSION);
    out.extend_from_slice(&(items.len() as u32).to_le_bytes());
    for i in items {
        put_bytes(&mut out, i.method.as_str().as_bytes());
        put_bytes(&mut out, i.path.as_bytes());
        put_headers(&mut out, &i.headers);
        put_bytes(&mut out, &i.body);
    }
    out
}

pub fn encode_replies(replies: &[RelayReply]) -> Vec<u8> {
    let size: usize = replies.iter().map(|r| 64 + r.body.len()).sum();
    let mut out = Vec::with_capacity(5 + size);
    out.push(WIRE_VERSION);
    out.extend_from_slice(&(replies.len() as u32).to_le_bytes());
    for r in replies {
        out.extend_from_slice(&r.status.as_u16().to_le_bytes());
        put_headers(&mut out, &r.headers);
        put_bytes(&mut out, &r.body);
    }
    out
}

/// A cursor over a received body; every read is bounds-checked, so a
/// truncated or hostile body is an error, never a panic.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len()).ok_or("truncated relay body")?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn bytes(&mut self) -> Result<Bytes, String> {
        let n = self.u32()? as usize;
        let start = self.pos;
        self.take(n)?;
        Ok(self.buf.slice(start..start + n))
    }
    fn header_list(&mut self) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
        let n = self.u32()? as usize;
        let mut out = Vec::with_capacity(n.min(16));
        for _ in 0..n {
            let k = HeaderName::from_bytes(&self.bytes()?).map_err(|e| e.to_string())?;
            let v = HeaderValue::from_maybe_shared(self.bytes()?).map_err(|e| e.to_string())?;
            out.push((k, v));
        }
        Ok(out)
    }
    /// Version byte and item count; the count is checked against the body
    /// size so a forged count cannot make us allocate much.
    fn header(&mut self) -> Result<usize, String> {
        let v = self.take(1)?[0];
        if v != WIRE_VERSION {
            return Err(format!("relay wire version {v}, expected {WIRE_VERSION}"));
        }
        let n = self.u32()? as usize;
        if n > self.buf.len() {
            return Err("relay item count larger than the body".into());
        }
        Ok(n)
    }
    fn finish(&self) -> Result<(), String> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err("trailing bytes in relay body".into())
        }
    }
}

pub fn decode_items(buf: &Bytes) -> Result<Vec<RelayItem>, String> {
    let mut r = Reader { buf, pos: 0 };
    let n = r.header()?;
    let mut items = Vec::with_capacity(n);
    for _ in 0..n {
        let method = Method::from_bytes(&r.bytes()?).map_err(|e| e.to_string())?;
        let path = String::from_utf8(r.bytes()?.to_vec()).map_err(|e| e.to_string())?;
        let headers = r.header_list()?;
        let body = r.bytes()?;
        items.push(RelayItem { method, path, headers, body });
    }
    r.finish()?;
    Ok(items)
}

pub fn decode_replies(buf: &Bytes) -> Result<Vec<RelayReply>, String> {
    let mut r = Reader { buf, pos: 0 };
    let n = r.header()?;
    let mut replies = Vec::with_capacity(n);
    for _ in 0..n {
        let status = StatusCode::from_u16(r.u16()?).map_err(|e| e.to_string())?;
        let headers = r.header_list()?;
        let body = r.bytes()?;
        replies.push(RelayReply { status, headers, body });
    }
    r.finish()?;
    Ok(replies)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A leader of a build without peer streams (only `POST /raft/relay`,
    /// `GET /raft/stream` is a 404): batches reach it over HTTP, the pool
    /// remembers to skip the upgrade, and a long poll relayed alone is
    /// handed back to the caller's HTTP path (`None`).
    #[tokio::test]
    async fn a_leader_without_peer_streams_gets_batches_over_http() {
        let app = Router::new().route(
            PATH_RELAY,
            axum::routing::post(|body: Bytes| async move {
                let items = decode_items(&body).expect("a relay batch");
                let replies: Vec<RelayReply> = items
                    .iter()
                    .map(|i| RelayReply {
                        status: StatusCode::CREATED,
                        headers: vec![],
                        body: Bytes::from(format!("{} {}", i.method, i.path)),
                    })
                    .collect();
                encode_replies(&replies)
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let streams = Arc::new(StreamPool::new(None));
        let batcher = RelayBatcher::start(reqwest::Client::new(), streams.clone());
        let replies = futures::future::join_all((0..5).map(|n| batcher.relay(&addr, item(n)))).await;
        for (n, reply) in replies.into_iter().enumerate() {
            let reply = reply.expect("answered over HTTP");
            assert_eq!(reply.status, StatusCode::CREATED);
            assert_eq!(reply.body, format!("POST /api/jobs?n={n}"));
        }
        assert!(streams.http_only(&addr), "the refused upgrade is remembered");
        assert!(batcher.relay_alone(&addr, item(9), Duration::from_secs(5)).await.is_none());
    }

    fn item(n: usize) -> RelayItem {
        RelayItem {
            method: Method::POST,
            path: format!("/api/jobs?n={n}"),
            headers: vec![(HeaderName::from_static("content-type"), HeaderValue::from_static("application/json"))],
            body: Bytes::from(format!("{{\"type\":\"echo\",\"n\":{n}}}")),
        }
    }

    #[test]
    fn items_and_replies_round_trip() {
        let items: Vec<_> = (0..5).map(item).collect();
        assert_eq!(decode_items(&Bytes::from(encode_items(&items))).unwrap(), items);
        let replies = vec![
            RelayReply {
                status: StatusCode::CREATED,
                headers: vec![(HeaderName::from_static("location"), HeaderValue::from_static("/api/jobs/x"))],
                body: Bytes::from_static(b"{}"),
            },
            RelayReply { status: StatusCode::SERVICE_UNAVAILABLE, headers: vec![], body: Bytes::new() },
        ];
        assert_eq!(decode_replies(&Bytes::from(encode_replies(&replies))).unwrap(), replies);
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        let good = encode_items(&[item(1), item(2)]);
        // Every truncation, a wrong version, a forged count, trailing bytes.
        for cut in 0..good.len() {
            assert!(decode_items(&Bytes::copy_from_slice(&good[..cut])).is_err(), "cut at {cut}");
        }
        let mut v = good.clone();
        v[0] = 9;
        assert!(decode_items(&Bytes::from(v)).is_err());
        let mut v = good.clone();
        v[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_items(&Bytes::from(v)).is_err());
        let mut v = good;
        v.push(0);
        assert!(decode_items(&Bytes::from(v)).is_err());
        assert!(decode_replies(&Bytes::from_static(b"\x01\x01\x00\x00\x00\xff\xff")).is_err());
    }
}
