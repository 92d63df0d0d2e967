//! [`Client`]: the typed API client and its failover loop.
//!
//! Owns: the list of coordinator nodes, which one was last seen working, and
//! the rule for when a failed request may be sent again.
//!
//! Invariants:
//! - One `reqwest::Client` per [`Client`] and its clones (connection pools are
//!   shared); pass your own with [`ClientBuilder::http_client`] to share it
//!   with other code in the process.
//! - A request is repeated only when repeating cannot do harm twice:
//!   reads, and writes the server deduplicates (submit with a `requestId`,
//!   complete / release / heartbeat with a fencing token, cancel, register
//!   with a worker id, deregister). Acquire is not such a write: it is
//!   repeated only after errors that prove it never reached a node
//!   (connection refused) or was turned away before being proposed (503
//!   `no_leader`). Any other failure of an acquire is
//!   [`ClientError::Uncertain`]; the jobs it may have leased fall back to
//!   Pending when their lease expires.
//! - Total retry time is bounded by the retry budget; each attempt by the
//!   request timeout (plus the long-poll wait for acquire).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobsched_api::{
    AcquireRequest, AcquireResponse, BatchCompleteRequest, BatchCompleteResponse, BatchCreateRequest,
    BatchCreateResponse, ClusterView, CompleteRequest, CreateJobRequest, ErrorBody, HealthView, HeartbeatRequest,
    HeartbeatResponse, JobList, JobView, RegisterWorkerRequest, ReleaseRequest, WorkerList, WorkerView,
};
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use crate::ClientError;

/// The three local coordinators the dev cluster script starts.
pub const DEFAULT_COORDINATORS: &str = "http://127.0.0.1:5001,http://127.0.0.1:5002,http://127.0.0.1:5003";

/// Default limit on one attempt (connect + request + response).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default limit on establishing a TCP connection to one node.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default bound on the total time spent retrying one call.
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(30);

/// The shortest per-attempt timeout, even when the retry budget is nearly
/// spent: shorter than this and a healthy but busy node could never answer.
const MIN_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);

/// Split a comma-separated coordinator list (`--coordinators`,
/// `JOBSCHED_COORDINATORS`), dropping empty items and surrounding spaces.
pub fn parse_coordinators(list: &str) -> Vec<String> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// Configures a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    coordinators: Vec<String>,
    request_timeout: Duration,
    connect_timeout: Duration,
    retry_budget: Duration,
    initial_backoff: Duration,
    max_backoff: Duration,
    http: Option<reqwest::Client>,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            coordinators: parse_coordinators(DEFAULT_COORDINATORS),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            retry_budget: DEFAULT_RETRY_BUDGET,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            http: None,
        }
    }
}

impl ClientBuilder {
    /// Base URLs of the coordinators (`http://host:port`; a missing scheme
    /// means `http://`). Default: [`DEFAULT_COORDINATORS`].
    pub fn coordinators<I, S>(mut self, urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.coordinators = urls.into_iter().map(|s| s.as_ref().trim().to_owned()).collect();
        self
    }

    /// Limit on one attempt against one node. Default 10 s.
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }

    /// Limit on connecting to one node. Default 2 s. Ignored when an HTTP
    /// client is supplied with [`ClientBuilder::http_client`].
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Bound on the total time one call keeps retrying. Default 30 s.
    pub fn retry_budget(mut self, d: Duration) -> Self {
        self.retry_budget = d;
        self
    }

    /// Pause after a full round of failed nodes; it doubles each round up to
    /// `max`. Defaults 50 ms and 2 s.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// Use this HTTP client (to share its connection pool with other code).
    pub fn http_client(mut self, http: reqwest::Client) -> Self {
        self.http = Some(http);
        self
    }

    pub fn build(self) -> Result<Client, ClientError> {
        if self.coordinators.is_empty() {
            return Err(ClientError::Config("no coordinator URLs given".into()));
        }
        let nodes = self.coordinators.iter().map(|s| Node::parse(s)).collect::<Result<Vec<_>, _>>()?;
        let http = match self.http {
            Some(h) => h,
            None => reqwest::Client::builder()
                .connect_timeout(self.connect_timeout)
                .tcp_nodelay(true)
                .build()
                .map_err(|e| ClientError::Config(format!("cannot build the HTTP client: {e}")))?,
        };
        Ok(Client {
            shared: Arc::new(Shared {
                http,
                nodes,
                preferred: AtomicUsize::new(0),
                initial_backoff: self.initial_backoff,
                max_backoff: self.max_backoff,
            }),
            request_timeout: self.request_timeout,
            retry_budget: self.retry_budget,
        })
    }
}

#[derive(Debug)]
struct Node {
    /// `scheme://host:port[/prefix]` without a trailing slash.
    base: String,
    /// `host:port`, to match the `leader` hint of an error body.
    authority: String,
}

impl Node {
    fn parse(raw: &str) -> Result<Node, ClientError> {
        let with_scheme = if raw.contains("://") { raw.to_owned() } else { format!("http://{raw}") };
        let url =
            Url::parse(&with_scheme).map_err(|e| ClientError::Config(format!("bad coordinator URL {raw:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ClientError::Config(format!("bad coordinator URL {raw:?}: scheme must be http or https")));
        }
        let host =
            url.host_str().ok_or_else(|| ClientError::Config(format!("bad coordinator URL {raw:?}: no host")))?;
        let port = url.port_or_known_default().unwrap_or(80);
        Ok(Node { base: with_scheme.trim_end_matches('/').to_owned(), authority: format!("{host}:{port}") })
    }
}

#[derive(Debug)]
struct Shared {
    http: reqwest::Client,
    nodes: Vec<Node>,
    /// Index of the node that answered last; calls start there.
    preferred: AtomicUsize,
    initial_backoff: Duration,
    max_backoff: Duration,
}

/// Whether a request may be sent again after an unknown outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Safety {
    /// Repeating it has the effect of sending it once.
    Idempotent,
    /// Repeat only when it surely did not reach the state machine.
    Once,
}

/// Result of a submit: the job and whether this call created it.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub job: JobView,
    /// false when the `requestId` matched an earlier submit (HTTP 200). After
    /// a retry inside the client this can be false although the job is new
    /// to the caller: the first attempt created it but its answer was lost.
    pub created: bool,
}

/// Filters and paging of `GET /api/jobs`.
#[derive(Debug, Clone, Default)]
pub struct ListJobs {
    /// Pending, Running, Completed, Failed or Dead.
    pub status: Option<String>,
    pub limit: Option<usize>,
    /// `nextCursor` of the previous page.
    pub cursor: Option<String>,
    /// Read the answering node's local state without a leader round trip.
    pub stale: bool,
}

/// Typed client of the coordinator REST API with failover across nodes.
///
/// Cheap to clone; clones share the HTTP connection pool and the memory of
/// which node worked last.
#[derive(Debug, Clone)]
pub struct Client {
    shared: Arc<Shared>,
    request_timeout: Duration,
    retry_budget: Duration,
}

impl Client {
    /// A client with default timeouts for these coordinator base URLs.
    pub fn new<I, S>(coordinators: I) -> Result<Client, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Client::builder().coordinators(coordinators).build()
    }

    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The same client (same pool and node memory) with another retry budget,
    /// e.g. a heartbeat must give up before the next one is due.
    pub fn with_retry_budget(&self, budget: Duration) -> Client {
        Client { retry_budget: budget, ..self.clone() }
    }

    /// The same client with another per-attempt timeout.
    pub fn with_request_timeout(&self, timeout: Duration) -> Client {
        Client { request_timeout: timeout, ..self.clone() }
    }

    /// The underlying HTTP client, to share its pool.
    pub fn http(&self) -> &reqwest::Client {
        &self.shared.http
    }

    /// Base URLs of the configured nodes, in order.
    pub fn nodes(&self) -> Vec<String> {
        self.shared.nodes.iter().map(|n| n.base.clone()).collect()
    }

    /// Base URL of the node the next call starts with.
    pub fn preferred_node(&self) -> String {
        let i = self.shared.preferred.load(Ordering::Relaxed) % self.shared.nodes.len();
        self.shared.nodes[i].base.clone()
    }

    // ----- jobs ----------------------------------------------------------

    /// `POST /api/jobs`. Always sends a `requestId` (a new UUID v4 when the
    /// request has none), which is what makes retrying a submit after a
    /// timeout or a failover safe: the cluster returns the first job for a
    /// repeated id instead of creating a second one. Reuse the same request
    /// id yourself when you retry a failed `submit` call.
    pub async fn submit(&self, mut req: CreateJobRequest) -> Result<Submitted, ClientError> {
        if req.request_id.as_deref().is_none_or(str::is_empty) {
            req.request_id = Some(Uuid::new_v4().to_string());
        }
        let resp = self.send(Method::POST, "/api/jobs", &[], Some(json_body(&req)?), Safety::Idempotent, None).await?;
        Ok(Submitted { created: resp.status == 201, job: resp.decode()? })
    }

    /// `POST /api/jobs/batch`: many jobs in one request and one Raft entry.
    /// Like [`Client::submit`], gives every item without a `requestId` a new
    /// one, so the whole batch can be retried safely.
    pub async fn submit_batch(&self, mut jobs: Vec<CreateJobRequest>) -> Result<BatchCreateResponse, ClientError> {
        for req in &mut jobs {
            if req.request_id.as_deref().is_none_or(str::is_empty) {
                req.request_id = Some(Uuid::new_v4().to_string());
            }
        }
        let body = json_body(&BatchCreateRequest { jobs })?;
        self.send(Method::POST, "/api/jobs/batch", &[], Some(body), Safety::Idempotent, None).await?.decode()
    }

    /// `GET /api/jobs/{id}`
    pub async fn get_job(&self, id: Uuid) -> Result<JobView, ClientError> {
        self.get(&format!("/api/jobs/{id}"), &[]).await
    }

    /// `GET /api/jobs?status=..&limit=..&cursor=..[&stale=true]`
    pub async fn list_jobs(&self, q: &ListJobs) -> Result<JobList, ClientError> {
        let mut query = Vec::new();
        if let Some(s) = &q.status {
            query.push(("status", s.clone()));
        }
        if let Some(l) = q.limit {
            query.push(("limit", l.to_string()));
        }
        if let Some(c) = &q.cursor {
            query.push(("cursor", c.clone()));
        }
        if q.stale {
            query.push(("stale", "true".to_owned()));
        }
        self.get("/api/jobs", &query).await
    }

    /// `POST /api/jobs/acquire` (long poll up to `waitSeconds`). Not repeated
    /// after an unknown outcome; see the module docs.
    pub async fn acquire(&self, req: &AcquireRequest) -> Result<AcquireResponse, ClientError> {
        // The server may hold the request for the whole wait; the attempt's
        // timeout must outlast it.
        let wait = req.wait_seconds.unwrap_or(0.0).clamp(0.0, jobsched_api::MAX_WAIT_SECONDS);
        // NaN survives the clamp; it then means no wait.
        let extra = Duration::try_from_secs_f64(wait).unwrap_or_default();
        self.send(Method::POST, "/api/jobs/acquire", &[], Some(json_body(req)?), Safety::Once, Some(extra))
            .await?
            .decode()
    }

    /// `POST /api/jobs/{id}/complete`. Safe to repeat: the server treats a
    /// repeated identical completion as success. 409 `stale_token` when the
    /// lease is no longer the caller's.
    pub async fn complete(&self, id: Uuid, req: &CompleteRequest) -> Result<JobView, ClientError> {
        self.post(&format!("/api/jobs/{id}/complete"), req).await
    }

    /// `POST /api/jobs/complete`: many results in one request and one Raft
    /// entry; each item gets its job or its own error (`stale_token`, ...).
    /// Safe to repeat for the same reason as [`Client::complete`].
    pub async fn complete_many(&self, req: &BatchCompleteRequest) -> Result<BatchCompleteResponse, ClientError> {
        self.post("/api/jobs/complete", req).await
    }

    /// `POST /api/jobs/{id}/release`: back to Pending at once, the attempt
    /// not counted.
    pub async fn release(&self, id: Uuid, fencing_token: u64) -> Result<JobView, ClientError> {
        self.post(&format!("/api/jobs/{id}/release"), &ReleaseRequest { fencing_token }).await
    }

    /// `POST /api/jobs/{id}/cancel`. Repeating it cannot cancel twice; a
    /// repeat after a lost answer may report `wrong_status` (already Dead).
    pub async fn cancel(&self, id: Uuid) -> Result<JobView, ClientError> {
        self.send(Method::POST, &format!("/api/jobs/{id}/cancel"), &[], None, Safety::Idempotent, None).await?.decode()
    }

    // ----- workers -------------------------------------------------------

    /// `POST /api/workers/register`. When `workerId` is absent the client
    /// picks a new UUID v4, so that a retried registration updates the same
    /// worker instead of creating a second one.
    pub async fn register_worker(&self, mut req: RegisterWorkerRequest) -> Result<WorkerView, ClientError> {
        if req.worker_id.is_none() {
            req.worker_id = Some(Uuid::new_v4());
        }
        self.post("/api/workers/register", &req).await
    }

    /// `POST /api/workers/{id}/heartbeat`. 404 `not_found` / 409
    /// `worker_dead`: register again with the same id.
    pub async fn heartbeat(&self, worker_id: Uuid, req: &HeartbeatRequest) -> Result<HeartbeatResponse, ClientError> {
        self.post(&format!("/api/workers/{worker_id}/heartbeat"), req).await
    }

    /// `DELETE /api/workers/{id}`: the worker leaves; its running jobs go
    /// back to Pending. A repeat after a lost answer reports 404.
    pub async fn deregister_worker(&self, worker_id: Uuid) -> Result<(), ClientError> {
        self.send(Method::DELETE, &format!("/api/workers/{worker_id}"), &[], None, Safety::Idempotent, None)
            .await
            .map(drop)
    }

    /// `GET /api/workers`
    pub async fn list_workers(&self) -> Result<WorkerList, ClientError> {
        self.get("/api/workers", &[]).await
    }

    // ----- cluster -------------------------------------------------------

    /// `GET /api/cluster` of whichever node answers.
    pub async fn cluster(&self) -> Result<ClusterView, ClientError> {
        self.get("/api/cluster", &[]).await
    }

    /// `GET /health` of whichever node answers.
    pub async fn health(&self) -> Result<HealthView, ClientError> {
        self.get("/health", &[]).await
    }

    // ----- transport -----------------------------------------------------

    async fn get<T: DeserializeOwned>(&self, path: &str, query: &[(&str, String)]) -> Result<T, ClientError> {
        self.send(Method::GET, path, query, None, Safety::Idempotent, None).await?.decode()
    }

    async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        self.send(Method::POST, path, &[], Some(json_body(body)?), Safety::Idempotent, None).await?.decode()
    }

    /// Send one request with failover. Returns the first 2xx answer, the
    /// first non-retryable error, or `Unavailable` when the budget is spent.
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
        safety: Safety,
        extra_timeout: Option<Duration>,
    ) -> Result<RawResponse, ClientError> {
        let shared = &*self.shared;
        let n = shared.nodes.len();
        let start = Instant::now();
        let mut idx = shared.preferred.load(Ordering::Relaxed) % n;
        let mut attempts: u32 = 0;
        let mut round: u32 = 0;
        loop {
            attempts += 1;
            let node = &shared.nodes[idx];
            let remaining = self.retry_budget.saturating_sub(start.elapsed());
            let timeout =
                self.request_timeout.min(remaining.max(MIN_ATTEMPT_TIMEOUT)) + extra_timeout.unwrap_or_default();
            let mut rb = shared.http.request(method.clone(), format!("{}{}", node.base, path)).timeout(timeout);
            if !query.is_empty() {
                rb = rb.query(query);
            }
            if let Some(b) = &body {
                rb = rb.header(CONTENT_TYPE, "application/json").body(b.clone());
            }

            let mut retry_after = None;
            let mut hint = None;
            let last_error = match rb.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after_header = resp
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    match resp.bytes().await {
                        Ok(bytes) if (200..300).contains(&status) => {
                            shared.preferred.store(idx, Ordering::Relaxed);
                            return Ok(RawResponse { status, body: bytes.to_vec(), node: node.base.clone() });
                        }
                        Ok(bytes) => {
                            let err = api_error(status, &bytes);
                            let retryable = match (status, safety) {
                                (500..=599, Safety::Idempotent) => true,
                                (503, Safety::Once) => err.code() == Some("no_leader"),
                                _ => false,
                            };
                            if !retryable {
                                // The node works; it just said no.
                                shared.preferred.store(idx, Ordering::Relaxed);
                                return Err(err);
                            }
                            if let ClientError::Api { leader: Some(l), .. } = &err {
                                hint = shared.nodes.iter().position(|n| n.authority == *l);
                            }
                            retry_after = retry_after_header;
                            format!("{}: {err}", node.base)
                        }
                        // The server answered but the body broke off: the
                        // request was processed (or not) — unknown.
                        Err(e) if safety == Safety::Once => {
                            return Err(ClientError::Uncertain { node: node.base.clone(), message: error_chain(&e) });
                        }
                        Err(e) => format!("{}: reading the response: {}", node.base, error_chain(&e)),
                    }
                }
                Err(e) => {
                    // A connect error proves the request was never sent.
                    if safety == Safety::Once && !e.is_connect() {
                        return Err(ClientError::Uncertain { node: node.base.clone(), message: error_chain(&e) });
                    }
                    format!("{}: {}", node.base, error_chain(&e))
                }
            };
            tracing::debug!(attempt = attempts, error = %last_error, "coordinator request failed; trying another node");

            // No pause while this round still has untried nodes (failover
            // should be quick); after a full round, back off exponentially so
            // an election is waited out rather than hammered.
            let mut delay = Duration::ZERO;
            if attempts.is_multiple_of(n as u32) {
                delay = shared.initial_backoff.saturating_mul(1u32 << round.min(16)).min(shared.max_backoff);
                round += 1;
            }
            if let Some(ra) = retry_after {
                delay = delay.max(ra.min(shared.max_backoff));
            }
            let elapsed = start.elapsed();
            if elapsed + delay >= self.retry_budget {
                return Err(ClientError::Unavailable { attempts, elapsed, last_error });
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            idx = match hint {
                Some(h) if h != idx => h,
                _ => (idx + 1) % n,
            };
        }
    }
}

struct RawResponse {
    status: u16,
    body: Vec<u8>,
    node: String,
}

impl RawResponse {
    fn decode<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| ClientError::Decode { node: self.node.clone(), message: e.to_string() })
    }
}

fn json_body<B: Serialize + ?Sized>(body: &B) -> Result<Vec<u8>, ClientError> {
    serde_json::to_vec(body).map_err(|e| ClientError::Config(format!("cannot encode the request body: {e}")))
}

/// Turn an error response into [`ClientError::Api`], whatever its body.
fn api_error(status: u16, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => ClientError::Api {
            status,
            code: b.error.code,
            message: b.error.message,
            field: b.error.field,
            leader: b.error.leader,
        },
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let mut message: String = text.chars().take(512).collect();
            if message.trim().is_empty() {
                message = "(no error body)".to_owned();
            }
            ClientError::Api { status, code: format!("http_{status}"), message, field: None, leader: None }
        }
    }
}

/// An error and its causes on one line (reqwest's top-level message alone
/// hides whether it was a refused connection or a timeout).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_coordinator_lists() {
        assert_eq!(parse_coordinators(" http://a:1, ,http://b:2 ,"), vec!["http://a:1", "http://b:2"]);
        assert_eq!(parse_coordinators(DEFAULT_COORDINATORS).len(), 3);
    }

    #[test]
    fn node_urls() {
        let n = Node::parse("127.0.0.1:5001").unwrap();
        assert_eq!(n.base, "http://127.0.0.1:5001");
        assert_eq!(n.authority, "127.0.0.1:5001");
        let n = Node::parse("http://localhost/").unwrap();
        assert_eq!(n.base, "http://localhost");
        assert_eq!(n.authority, "localhost:80");
        assert!(Node::parse("ftp://x").is_err());
        assert!(Client::new(Vec::<String>::new()).is_err());
    }

    #[test]
    fn error_bodies() {
        let e = api_error(409, br#"{"error":{"code":"stale_token","message":"no"}}"#);
        assert!(e.is_stale_token());
        assert_eq!(e.status(), Some(409));
        let e = api_error(502, b"<html>bad gateway</html>");
        assert_eq!(e.code(), Some("http_502"));
        let e = api_error(500, b"");
        assert!(matches!(e, ClientError::Api { ref message, .. } if message == "(no error body)"));
    }
}
