//! The worker runtime: [`WorkerBuilder`] and [`Worker::run`].
//!
//! Owns: registration, the acquire loop (long poll), one task per running
//! job, the heartbeat task, the result reporter and the graceful drain.
//!
//! Invariants:
//! - At most `capacity` handlers run at once: every job task holds a run
//!   slot (semaphore permit) from before its acquisition until its result
//!   has a report slot.
//! - At most 2 x `capacity` results wait for the cluster's acknowledgement:
//!   each holds a report slot until its report is answered. So the cluster
//!   sees at most 3 x `capacity` jobs leased to this worker (as with
//!   Celery's prefetch), for about one report round trip. Why two reports'
//!   worth: with one (`capacity` slots) a busy worker could hand the next
//!   results to the reporter only once the previous report was answered, so
//!   every slot waited out both an acquire and a report round trip; the
//!   e2e bench completed 1.1-1.3x more jobs/s on one cluster with two
//!   (`jobsched-bench e2e -c 64 --workers 8 --slots 8`, alternating).
//! - Results go through one reporter task: it takes every result waiting in
//!   the queue and sends them in one `POST /api/jobs/complete` (one Raft
//!   entry), so a busy worker reports many results per round trip while a
//!   lone result still leaves at once. Why the run slot is freed before the
//!   report lands: otherwise every slot sits idle for a whole Raft commit
//!   after each job, which halves the throughput of short jobs. When reports
//!   cannot get through, the report slots run out, handlers wait for one
//!   while holding their run slots, and the worker stops acquiring.
//! - A job is in the `held` map (and so in every heartbeat, which extends its
//!   lease) from its acquisition until its result is reported, released or
//!   dropped; a drop guard, which travels with a queued result, removes it
//!   even if its task panics. The map holds the newest attempt of each job:
//!   acquiring a job again (new token) stops the run under the old token as
//!   revoked, and the old run's guard leaves the new entry alone.
//! - Results always carry the attempt's fencing token. A result whose lease
//!   was revoked is dropped, never reported; a 409 on complete is logged and
//!   dropped; other failures are retried until the lease would be gone. A
//!   batch the cluster refuses as a whole (a result too large, the request
//!   over the body limit) or that gets no answer is reported result by
//!   result under those same rules.
//! - Shutdown: acquiring stops at once (the long poll is dropped), running
//!   jobs get the drain timeout to finish, the rest are cancelled and their
//!   leases released, the reporter sends what is queued, then the worker
//!   deregisters (which also returns any lease the dropped long poll might
//!   still have taken to Pending).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use jobsched_api::{
    AcquireRequest, BatchCompleteRequest, CompleteRequest, CompletionItem, HeartbeatRequest, HeldJob, JobView,
    RegisterWorkerRequest, MAX_BATCH_ITEMS,
};
use jobsched_client::{Client, ClientError};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};
use uuid::Uuid;

use crate::config::{default_name, ConfigError, WorkerConfig};
use crate::handler::{JobContext, JobError, JobHandler, JobResult, SharedHandler};

/// How long a cancelled handler may take to stop (kill its processes, close
/// its connections) before its task is aborted.
pub const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// Retry budget of one register / complete call; the loops around them
/// retry further.
const CALL_BUDGET: Duration = Duration::from_secs(10);
/// Retry budget of release and deregister during shutdown: bounded, because
/// deregistration returns the jobs to Pending anyway.
const SHUTDOWN_CALL_BUDGET: Duration = Duration::from_secs(5);
/// Results awaiting the cluster's answer, in units of `capacity`: two
/// reports' worth (see the module docs).
const REPORT_ROUNDS: usize = 2;

/// Everything that can stop [`Worker::run`] with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The cluster rejected the registration itself (e.g. invalid capacity);
    /// retrying would not help.
    #[error("the cluster rejected the registration: {0}")]
    Registration(#[source] ClientError),
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Configures a [`Worker`]. Defaults are those of [`WorkerConfig`].
#[derive(Clone)]
pub struct WorkerBuilder {
    coordinators: Vec<String>,
    name: Option<String>,
    worker_id: Option<Uuid>,
    capacity: u32,
    heartbeat_interval: Duration,
    lease_seconds: u64,
    poll_wait: Duration,
    drain_timeout: Duration,
    request_timeout: Duration,
    handlers: Vec<SharedHandler>,
    client: Option<Client>,
    http: Option<reqwest::Client>,
}

impl Default for WorkerBuilder {
    fn default() -> Self {
        WorkerBuilder::from_config(&WorkerConfig::default())
    }
}

impl WorkerBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Take every setting from `config` (handlers are not part of it: add
    /// them with [`WorkerBuilder::handler`]).
    pub fn from_config(config: &WorkerConfig) -> Self {
        WorkerBuilder {
            coordinators: config.coordinators.clone(),
            name: config.name.clone(),
            worker_id: config.worker_id,
            capacity: config.capacity,
            heartbeat_interval: config.heartbeat_interval(),
            lease_seconds: config.lease_seconds,
            poll_wait: config.poll_wait(),
            drain_timeout: config.drain_timeout(),
            request_timeout: config.request_timeout(),
            handlers: Vec::new(),
            client: None,
            http: None,
        }
    }

    /// Coordinator base URLs.
    pub fn coordinators<I, S>(mut self, urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.coordinators = urls.into_iter().map(|s| s.as_ref().to_owned()).collect();
        self
    }

    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Register under this id instead of a new random one.
    pub fn worker_id(mut self, id: Uuid) -> Self {
        self.worker_id = Some(id);
        self
    }

    /// Jobs run at once.
    pub fn capacity(mut self, capacity: u32) -> Self {
        self.capacity = capacity;
        self
    }

    pub fn heartbeat_interval(mut self, d: Duration) -> Self {
        self.heartbeat_interval = d;
        self
    }

    /// Lease length asked for on acquire; heartbeats extend it.
    pub fn lease_seconds(mut self, secs: u64) -> Self {
        self.lease_seconds = secs;
        self
    }

    /// Long-poll wait of one acquire (at most 60 s).
    pub fn poll_wait(mut self, d: Duration) -> Self {
        self.poll_wait = d;
        self
    }

    /// How long running jobs may finish after shutdown is signalled.
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }

    /// Limit on one HTTP attempt (ignored when a client is supplied).
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }

    /// Add a handler; its job type joins the worker's job types. A later
    /// handler for the same type replaces an earlier one.
    pub fn handler<H: JobHandler>(self, handler: H) -> Self {
        self.shared_handler(Arc::new(handler))
    }

    /// Add an already shared handler (e.g. from [`crate::builtin::builtin`]).
    pub fn shared_handler(mut self, handler: SharedHandler) -> Self {
        self.handlers.push(handler);
        self
    }

    /// Use this API client (its coordinators and timeouts win over the
    /// builder's).
    pub fn client(mut self, client: Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Build the API client on this HTTP client, to share one pool per
    /// process.
    pub fn http_client(mut self, http: reqwest::Client) -> Self {
        self.http = Some(http);
        self
    }

    pub fn build(self) -> Result<Worker, WorkerError> {
        let mut handlers: HashMap<String, SharedHandler> = HashMap::new();
        for h in self.handlers {
            let t = h.job_type().to_owned();
            if t.trim().is_empty() {
                return Err(ConfigError("a handler has an empty job type".into()).into());
            }
            handlers.insert(t, h);
        }
        if handlers.is_empty() {
            return Err(ConfigError("a worker needs at least one handler".into()).into());
        }
        if self.capacity == 0 {
            return Err(ConfigError("capacity must be at least 1".into()).into());
        }
        if self.lease_seconds == 0 || self.heartbeat_interval.is_zero() {
            return Err(ConfigError("lease_seconds and heartbeat_interval must be positive".into()).into());
        }
        if self.heartbeat_interval.as_secs_f64() * 2.0 > self.lease_seconds as f64 {
            return Err(ConfigError("heartbeat_interval must be at most half of lease_seconds".into()).into());
        }
        let client = match self.client {
            Some(c) => c,
            None => {
                let mut b = Client::builder().coordinators(&self.coordinators).request_timeout(self.request_timeout);
                if let Some(http) = self.http {
                    b = b.http_client(http);
                }
                b.build()?
            }
        };
        let mut job_types: Vec<String> = handlers.keys().cloned().collect();
        job_types.sort();
        Ok(Worker {
            inner: Arc::new(Inner {
                id: self.worker_id.unwrap_or_else(Uuid::new_v4),
                name: self.name.unwrap_or_else(default_name),
                capacity: self.capacity,
                job_types,
                handlers,
                client,
                heartbeat_interval: self.heartbeat_interval,
                lease: Duration::from_secs(self.lease_seconds),
                poll_wait: self.poll_wait.min(Duration::from_secs_f64(jobsched_api::MAX_WAIT_SECONDS)),
                drain_timeout: self.drain_timeout,
                held: Mutex::new(HashMap::new()),
                report_slots: Arc::new(Semaphore::new(REPORT_ROUNDS * self.capacity as usize)),
                register_lock: tokio::sync::Mutex::new(()),
            }),
        })
    }
}

/// A configured worker; [`Worker::run`] runs it until shutdown.
pub struct Worker {
    inner: Arc<Inner>,
}

impl Worker {
    pub fn builder() -> WorkerBuilder {
        WorkerBuilder::new()
    }

    /// The id it registers under.
    pub fn id(&self) -> Uuid {
        self.inner.id
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Job types of its handlers, sorted.
    pub fn job_types(&self) -> &[String] {
        &self.inner.job_types
    }

    /// Its API client.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// Register, then acquire and run jobs until `shutdown` fires; then drain
    /// (see the module docs) and deregister. Returns `Ok` after a clean
    /// shutdown, `Err` only when the cluster rejects the registration.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let inner = self.inner;
        let span = tracing::info_span!("worker", worker_id = %inner.id);
        async move {
            info!(name = %inner.name, capacity = inner.capacity, job_types = ?inner.job_types,
                  coordinators = ?inner.client.nodes(), "worker starting");
            match inner.register_until_ok(&shutdown).await {
                Ok(true) => {}
                Ok(false) => {
                    info!("shutdown before registration; exiting");
                    return Ok(());
                }
                Err(e) => return Err(WorkerError::Registration(e)),
            }

            let hb_stop = CancellationToken::new();
            let heartbeats = tokio::spawn(inner.clone().heartbeat_loop(hb_stop.clone()).in_current_span());

            // The report slots bound the queue; the channel bound is only a
            // backstop.
            let (report_tx, report_rx) = mpsc::channel(REPORT_ROUNDS * inner.capacity as usize);
            let reporter = tokio::spawn(inner.clone().report_loop(report_rx).in_current_span());

            let mut tasks = JoinSet::new();
            inner.acquire_loop(&shutdown, &mut tasks, &report_tx).await;

            info!(running = tasks.len(), drain_timeout = ?inner.drain_timeout, "shutting down: acquiring stopped, draining");
            if tokio::time::timeout(inner.drain_timeout, join_all(&mut tasks)).await.is_err() {
                let held = inner.held_snapshot();
                warn!(jobs = held.len(), "drain timeout passed; cancelling and releasing the remaining jobs");
                for (_, h) in held {
                    h.stop(StopReason::Drain);
                }
                // The tasks now stop their handlers (within CANCEL_GRACE) and
                // release their leases (within SHUTDOWN_CALL_BUDGET).
                let bound = CANCEL_GRACE + SHUTDOWN_CALL_BUDGET + Duration::from_secs(1);
                if tokio::time::timeout(bound, join_all(&mut tasks)).await.is_err() {
                    warn!(jobs = tasks.len(), "jobs still busy after cancellation; abandoning them");
                    tasks.abort_all();
                }
            }

            // Every job task has ended, so this was the last sender: the
            // reporter sends what is queued and stops. Its retries are
            // bounded by the leases; past the drain bound, deregistration
            // returns the unreported jobs to Pending (they run again).
            drop(report_tx);
            let bound = inner.drain_timeout.max(CALL_BUDGET);
            if tokio::time::timeout(bound, reporter).await.is_err() {
                warn!("results still unreported after {bound:?}; the cluster will run those jobs again");
            }

            hb_stop.cancel();
            let _ = heartbeats.await;
            match inner.client.with_retry_budget(SHUTDOWN_CALL_BUDGET).deregister_worker(inner.id).await {
                Ok(()) => info!("deregistered; worker stopped"),
                Err(e) if e.is_not_found() => info!("already deregistered; worker stopped"),
                Err(e) => warn!(error = %e, "deregistration failed; the cluster will declare this worker dead"),
            }
            Ok(())
        }
        .instrument(span)
        .await
    }
}

/// Why a running job was told to stop. The first reason set wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    /// Its own timeout passed.
    Timeout,
    /// A heartbeat said the lease is no longer ours.
    Revoked,
    /// Shutdown, after the drain timeout.
    Drain,
}

/// A job this worker holds a lease on.
struct Held {
    token: u64,
    cancel: CancellationToken,
    reason: Mutex<Option<StopReason>>,
    /// When the lease runs out unless a heartbeat extends it (conservative:
    /// measured from when the request extending it was sent).
    lease_deadline: Mutex<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short locks cannot leave the data
    // half-updated (each is a single assignment), so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Held {
    fn stop(&self, reason: StopReason) {
        lock(&self.reason).get_or_insert(reason);
        self.cancel.cancel();
    }

    fn reason(&self) -> Option<StopReason> {
        *lock(&self.reason)
    }

    fn extend(&self, until: Instant) {
        let mut d = lock(&self.lease_deadline);
        if until > *d {
            *d = until;
        }
    }

    fn lease_deadline(&self) -> Instant {
        *lock(&self.lease_deadline)
    }
}

struct Inner {
    id: Uuid,
    name: String,
    capacity: u32,
    job_types: Vec<String>,
    handlers: HashMap<String, SharedHandler>,
    client: Client,
    heartbeat_interval: Duration,
    lease: Duration,
    poll_wait: Duration,
    drain_timeout: Duration,
    held: Mutex<HashMap<Uuid, Arc<Held>>>,
    /// Results waiting for the cluster's answer, at most 2 x `capacity`.
    report_slots: Arc<Semaphore>,
    /// Serialises (re-)registrations from the acquire and heartbeat loops.
    register_lock: tokio::sync::Mutex<()>,
}

/// A finished attempt waiting for the reporter.
struct Report {
    held: Arc<Held>,
    req: CompleteRequest,
    /// The job's span, so that the report's log lines carry its fields.
    span: tracing::Span,
    /// Names the job, and keeps it in `held` (so its lease is extended)
    /// until reported.
    guard: HeldGuard,
    /// The report slot, freed once the report is answered (or dropped).
    _slot: OwnedSemaphorePermit,
}

/// Removes a job from `held` when its task ends, however it ends; but only
/// its own entry: a later attempt of the same job may have replaced it.
struct HeldGuard {
    inner: Arc<Inner>,
    job_id: Uuid,
    token: u64,
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        let mut held = lock(&self.inner.held);
        if held.get(&self.job_id).is_some_and(|h| h.token == self.token) {
            held.remove(&self.job_id);
        }
    }
}

async fn join_all(tasks: &mut JoinSet<()>) {
    while let Some(r) = tasks.join_next().await {
        log_join(r);
    }
}

fn log_join(r: Result<(), tokio::task::JoinError>) {
    if let Err(e) = r {
        if e.is_panic() {
            error!("a job task panicked");
        }
    }
}

/// Exponential backoff with jitter, for the worker's own retry loops.
struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Backoff { next: initial, initial, max }
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        // ±20 % so that many workers that lost the cluster together do not
        // come back in lockstep.
        let r = (Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0;
        d.mul_f64(0.8 + 0.4 * r)
    }
}

/// Sleep, unless `cancel` fires first; returns false when cancelled.
async fn sleep_or(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

impl Inner {
    fn held_snapshot(&self) -> Vec<(Uuid, Arc<Held>)> {
        lock(&self.held).iter().map(|(id, h)| (*id, h.clone())).collect()
    }

    fn registration(&self) -> RegisterWorkerRequest {
        RegisterWorkerRequest {
            worker_id: Some(self.id),
            name: self.name.clone(),
            capacity: Some(i64::from(self.capacity)),
            job_types: self.job_types.clone(),
        }
    }

    /// Register (same id every time) until a node accepts. `Ok(false)` when
    /// `cancel` fired first; `Err` when the cluster rejects the request.
    async fn register_until_ok(&self, cancel: &CancellationToken) -> Result<bool, ClientError> {
        let _serial = self.register_lock.lock().await;
        let client = self.client.with_retry_budget(CALL_BUDGET);
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let res = tokio::select! {
                _ = cancel.cancelled() => return Ok(false),
                r = client.register_worker(self.registration()) => r,
            };
            match res {
                Ok(view) => {
                    info!(status = %view.status, "registered");
                    return Ok(true);
                }
                Err(e) if e.is_client_error() && e.status() != Some(404) && e.status() != Some(409) => return Err(e),
                Err(e) => {
                    let d = backoff.next_delay();
                    warn!(error = %e, retry_in = ?d, "registration failed");
                    if !sleep_or(cancel, d).await {
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// Register again after the cluster forgot or buried this worker.
    /// Returns false when `cancel` fired first.
    async fn reregister(&self, cancel: &CancellationToken) -> bool {
        loop {
            match self.register_until_ok(cancel).await {
                Ok(done) => return done,
                Err(e) => {
                    error!(error = %e, "re-registration rejected; retrying");
                    if !sleep_or(cancel, Duration::from_secs(5)).await {
                        return false;
                    }
                }
            }
        }
    }

    async fn acquire_loop(
        self: &Arc<Self>,
        shutdown: &CancellationToken,
        tasks: &mut JoinSet<()>,
        report_tx: &mpsc::Sender<Report>,
    ) {
        let slots = Arc::new(Semaphore::new(self.capacity as usize));
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let job_types = Some(self.job_types.clone());
        loop {
            // Wait for a free slot; finished tasks are reaped meanwhile.
            let first = loop {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => break p,
                        Err(_) => return, // never closed
                    },
                    Some(r) = tasks.join_next(), if !tasks.is_empty() => log_join(r),
                }
            };
            let mut permits = vec![first];
            while let Ok(p) = slots.clone().try_acquire_owned() {
                permits.push(p);
            }
            let req = AcquireRequest {
                worker_id: self.id,
                job_types: job_types.clone(),
                max_jobs: Some(permits.len() as u32),
                lease_seconds: Some(self.lease.as_secs()),
                wait_seconds: Some(self.poll_wait.as_secs_f64()),
            };
            // Lease deadlines are measured from before the request left.
            let sent_at = Instant::now();
            let acquire = self.client.acquire(&req);
            tokio::pin!(acquire);
            let res = loop {
                tokio::select! {
                    biased;
                    // Dropping the long poll closes its connection; a lease
                    // the server grants anyway is returned by deregistration.
                    _ = shutdown.cancelled() => return,
                    r = &mut acquire => break r,
                    Some(r) = tasks.join_next(), if !tasks.is_empty() => log_join(r),
                }
            };
            match res {
                Ok(resp) => {
                    backoff.reset();
                    if !resp.jobs.is_empty() {
                        debug!(count = resp.jobs.len(), "acquired jobs");
                    }
                    for job in resp.jobs {
                        match permits.pop() {
                            Some(permit) => self.spawn_job(tasks, job, permit, sent_at, report_tx.clone()),
                            None => {
                                // More jobs than asked for: give the extra back.
                                warn!(job_id = %job.id, "acquire returned more jobs than requested; releasing");
                                if let Some(token) = job.fencing_token {
                                    let client = self.client.with_retry_budget(SHUTDOWN_CALL_BUDGET);
                                    tasks.spawn(async move {
                                        let _ = client.release(job.id, token).await;
                                    });
                                }
                            }
                        }
                    }
                }
                Err(e) if e.is_worker_dead() || e.is_not_found() => {
                    drop(permits);
                    warn!(error = %e, "the cluster does not know this worker as alive; registering again");
                    if !self.reregister(shutdown).await {
                        return;
                    }
                }
                Err(e) => {
                    drop(permits);
                    let d = backoff.next_delay();
                    if e.is_client_error() {
                        error!(error = %e, retry_in = ?d, "acquire rejected");
                    } else {
                        warn!(error = %e, retry_in = ?d, "acquire failed");
                    }
                    if !sleep_or(shutdown, d).await {
                        return;
                    }
                }
            }
        }
    }

    fn spawn_job(
        self: &Arc<Self>,
        tasks: &mut JoinSet<()>,
        job: JobView,
        permit: OwnedSemaphorePermit,
        sent_at: Instant,
        report_tx: mpsc::Sender<Report>,
    ) {
        let Some(token) = job.fencing_token else {
            error!(job_id = %job.id, "acquired job has no fencing token; ignoring it (its lease will expire)");
            return;
        };
        let held = Arc::new(Held {
            token,
            cancel: CancellationToken::new(),
            reason: Mutex::new(None),
            lease_deadline: Mutex::new(sent_at + self.lease),
        });
        let stale = lock(&self.held).insert(job.id, held.clone());
        if let Some(stale) = stale.filter(|s| s.token != token) {
            // The cluster leased this job to us again (e.g. the old lease
            // expired while this process was stopped and a long poll took it
            // back): the old attempt's lease is gone for sure.
            warn!(job_id = %job.id, stale_token = stale.token, token, "job acquired again; stopping its stale run");
            stale.stop(StopReason::Revoked);
        }
        let guard = HeldGuard { inner: self.clone(), job_id: job.id, token };
        let span = tracing::info_span!("job", job_id = %job.id, job_type = %job.job_type, attempt = job.attempt, token);
        let inner = self.clone();
        tasks.spawn(
            async move {
                // The run slot is held until the result has a report slot
                // (or the run ends without a result).
                let run_slot = permit;
                let Some(result) = inner.run_job(job, &held).await else { return };
                let Ok(report_slot) = inner.report_slots.clone().acquire_owned().await else { return };
                drop(run_slot);
                let report = Report {
                    _slot: report_slot,
                    req: inner.completion(&held, result),
                    held,
                    span: tracing::Span::current(),
                    guard,
                };
                if report_tx.send(report).await.is_err() {
                    error!("the reporter has stopped; result dropped");
                }
            }
            .instrument(span),
        );
    }

    /// Run one attempt; returns the result to report, or None when there is
    /// nothing to report (lease revoked, or released on shutdown).
    async fn run_job(&self, job: JobView, held: &Held) -> Option<JobResult> {
        let Some(handler) = self.handlers.get(&job.job_type).cloned() else {
            warn!("no handler for this job type");
            return Some(Err(JobError::new(format!(
                "worker {} has no handler for job type {:?}",
                self.id, job.job_type
            ))));
        };
        let timeout = job.timeout_seconds.and_then(|s| Duration::try_from_secs_f64(s).ok()).filter(|d| !d.is_zero());
        let ctx = JobContext {
            job_id: job.id,
            job_type: job.job_type.clone(),
            name: job.name.clone(),
            payload: job.payload.clone(),
            attempt: job.attempt,
            max_retries: job.max_retries,
            fencing_token: held.token,
            timeout,
            worker_id: self.id,
            cancel: held.cancel.clone(),
        };
        info!("job started");
        let started = Instant::now();
        let exec = execute(handler, ctx, timeout).await;
        if exec.timed_out {
            held.stop(StopReason::Timeout);
        }
        let elapsed = started.elapsed();
        match (held.reason(), exec.result) {
            (Some(StopReason::Revoked), _) => {
                warn!(?elapsed, "lease revoked while running; result dropped");
                None
            }
            (Some(StopReason::Timeout), _) => {
                let secs = timeout.map(|t| t.as_secs_f64()).unwrap_or_default();
                warn!(?elapsed, "job timed out");
                Some(Err(JobError::new(format!("timed out after {secs}s"))))
            }
            // Finished despite the drain cancellation: its result is real.
            (Some(StopReason::Drain), Ok(r)) | (None, Ok(r)) => {
                info!(?elapsed, "job succeeded");
                Some(Ok(r))
            }
            (Some(StopReason::Drain), Err(e)) => {
                info!(?elapsed, error = %e, "job cancelled by shutdown; releasing its lease");
                match self.client.with_retry_budget(SHUTDOWN_CALL_BUDGET).release(job.id, held.token).await {
                    Ok(view) => info!(status = %view.status, "lease released"),
                    Err(e) => warn!(error = %e, "release failed (deregistration will return the job)"),
                }
                None
            }
            (None, Err(e)) => {
                info!(?elapsed, error = %e, "job failed");
                Some(Err(e))
            }
        }
    }

    /// The completion request for an attempt's result.
    fn completion(&self, held: &Held, result: JobResult) -> CompleteRequest {
        match result {
            Ok(result) => CompleteRequest {
                fencing_token: held.token,
                worker_id: Some(self.id),
                success: true,
                result,
                error: None,
            },
            Err(e) => CompleteRequest {
                fencing_token: held.token,
                worker_id: Some(self.id),
                success: false,
                result: None,
                error: Some(e.message().to_owned()),
            },
        }
    }

    /// The reporter: whatever results are queued leave together.
    async fn report_loop(self: Arc<Self>, mut rx: mpsc::Receiver<Report>) {
        let mut ready = Vec::new();
        while rx.recv_many(&mut ready, MAX_BATCH_ITEMS).await > 0 {
            self.report_batch(std::mem::take(&mut ready)).await;
        }
    }

    async fn report_batch(&self, mut batch: Vec<Report>) {
        batch.retain(|r| {
            let revoked = r.held.reason() == Some(StopReason::Revoked);
            if revoked {
                r.span.in_scope(|| warn!("lease revoked before the result was reported; result dropped"));
            }
            !revoked
        });
        if batch.len() <= 1 {
            return self.report_each(batch).await;
        }
        let req = BatchCompleteRequest {
            completions: batch
                .iter()
                .map(|r| CompletionItem { job_id: r.guard.job_id, completion: r.req.clone() })
                .collect(),
        };
        let resp = match self.client.with_retry_budget(CALL_BUDGET).complete_many(&req).await {
            Ok(resp) if resp.results.len() == batch.len() => resp,
            Ok(resp) => {
                error!(
                    sent = batch.len(),
                    answered = resp.results.len(),
                    "batched report answer does not match; reporting one by one"
                );
                return self.report_each(batch).await;
            }
            Err(e) => {
                // Refused as a whole (4xx: some result too large, the body
                // over the limit) or no answer within the budget. Reporting
                // again is safe: a repeated identical completion succeeds.
                warn!(error = %e, results = batch.len(), "batched report failed; reporting one by one");
                return self.report_each(batch).await;
            }
        };
        debug!(results = batch.len(), "batched report answered");
        let mut again = Vec::new();
        for (r, answer) in batch.into_iter().zip(resp.results) {
            match (answer.job, answer.error) {
                (Some(view), _) => r.span.in_scope(|| info!(status = %view.status, "result reported")),
                (None, Some(e)) if matches!(e.code.as_str(), "stale_token" | "not_found" | "wrong_status") => {
                    r.span.in_scope(|| warn!(code = %e.code, error = %e.message, "the cluster refused the result (lease lost); dropped"))
                }
                // Anything else gets the single-report rules.
                (None, _) => again.push(r),
            }
        }
        self.report_each(again).await;
    }

    async fn report_each(&self, reports: Vec<Report>) {
        let sends =
            reports.iter().map(|r| self.report(r.guard.job_id, &r.held, r.req.clone()).instrument(r.span.clone()));
        futures::future::join_all(sends).await;
    }

    /// Send one attempt's result, retrying until it lands, is rejected, the
    /// lease is revoked, or the lease would have run out.
    async fn report(&self, job_id: Uuid, held: &Held, mut req: CompleteRequest) {
        let client = self.client.with_retry_budget(CALL_BUDGET);
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            match client.complete(job_id, &req).await {
                Ok(view) => {
                    info!(status = %view.status, "result reported");
                    return;
                }
                Err(e) if e.status() == Some(409) || e.is_not_found() => {
                    warn!(error = %e, "the cluster refused the result (lease lost); dropped");
                    return;
                }
                Err(e) if e.status() == Some(422) && req.success => {
                    // Most likely the result is too large: fail the attempt
                    // with the reason rather than lose it.
                    warn!(error = %e, "the cluster rejected the result; reporting a failure instead");
                    req.success = false;
                    req.result = None;
                    req.error = Some(format!("result rejected by the cluster: {e}"));
                }
                Err(e) if e.is_client_error() => {
                    error!(error = %e, "the cluster rejected the completion; dropped");
                    return;
                }
                Err(e) => {
                    if held.reason() == Some(StopReason::Revoked) {
                        warn!(error = %e, "lease revoked while reporting; result dropped");
                        return;
                    }
                    let d = backoff.next_delay();
                    if Instant::now() + d >= held.lease_deadline() {
                        error!(error = %e, "cannot report the result before the lease runs out; dropped");
                        return;
                    }
                    warn!(error = %e, retry_in = ?d, "reporting the result failed; retrying");
                    tokio::time::sleep(d).await;
                }
            }
        }
    }

    async fn heartbeat_loop(self: Arc<Self>, stop: CancellationToken) {
        // A heartbeat that cannot get through within one interval is
        // overtaken by the next one; never let them pile up.
        let client = self.client.with_retry_budget(self.heartbeat_interval.max(Duration::from_secs(1)));
        let mut tick = tokio::time::interval(self.heartbeat_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; we just registered
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let held = self.held_snapshot();
            let req = HeartbeatRequest {
                jobs: Some(held.iter().map(|(id, h)| HeldJob { job_id: *id, fencing_token: h.token }).collect()),
            };
            let sent_at = Instant::now();
            let res = tokio::select! {
                _ = stop.cancelled() => return,
                r = client.heartbeat(self.id, &req) => r,
            };
            match res {
                Ok(resp) => {
                    let revoked: HashSet<Uuid> = resp.revoked_jobs.into_iter().collect();
                    for (id, h) in held {
                        if revoked.contains(&id) {
                            warn!(job_id = %id, "lease revoked by the cluster; stopping the job");
                            h.stop(StopReason::Revoked);
                        } else {
                            h.extend(sent_at + self.lease);
                        }
                    }
                }
                Err(e) if e.is_worker_dead() || e.is_not_found() => {
                    warn!(error = %e, "the cluster does not know this worker as alive; registering again");
                    if !self.reregister(&stop).await {
                        return;
                    }
                    // Heartbeat at once: it tells which leases survived.
                    tick.reset_immediately();
                }
                Err(e) => warn!(error = %e, jobs = req.jobs.as_ref().map_or(0, Vec::len), "heartbeat failed"),
            }
        }
    }
}

/// What came of running a handler under a timeout.
#[derive(Debug)]
pub struct Execution {
    pub result: JobResult,
    /// The job's own timeout passed (not an outside cancellation).
    pub timed_out: bool,
}

/// Run `handler` in its own task (a panic becomes a failed attempt). When
/// `timeout` passes or `ctx.cancel` fires, cancel it and give it
/// [`CANCEL_GRACE`] to stop before aborting the task. This is how the
/// runtime runs every attempt; it is public so handlers can be tested under
/// the same rules.
pub async fn execute(handler: SharedHandler, ctx: JobContext, timeout: Option<Duration>) -> Execution {
    let cancel = ctx.cancel.clone();
    let mut task = tokio::spawn(async move { handler.execute_boxed(ctx).await });
    let deadline = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let (joined, timed_out) = tokio::select! {
        r = &mut task => (r, false),
        _ = deadline => {
            cancel.cancel();
            (stop_within_grace(&mut task).await, true)
        }
        _ = cancel.cancelled() => (stop_within_grace(&mut task).await, false),
    };
    let result = match joined {
        Ok(r) => r,
        Err(e) if e.is_panic() => {
            let msg = e
                .into_panic()
                .downcast::<String>()
                .map(|s| *s)
                .or_else(|p| p.downcast::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|_| "unknown".into());
            Err(JobError::new(format!("handler panicked: {msg}")))
        }
        Err(_) => Err(JobError::new("handler did not stop within the grace period after cancellation")),
    };
    Execution { result, timed_out }
}

async fn stop_within_grace(task: &mut tokio::task::JoinHandle<JobResult>) -> Result<JobResult, tokio::task::JoinError> {
    match tokio::time::timeout(CANCEL_GRACE, &mut *task).await {
        Ok(r) => r,
        Err(_) => {
            warn!("handler ignored cancellation for {CANCEL_GRACE:?}; aborting it");
            task.abort();
            task.await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Slow;
    impl JobHandler for Slow {
        fn job_type(&self) -> &str {
            "slow"
        }
        async fn execute(&self, _ctx: JobContext) -> JobResult {
            // Ignores cancellation on purpose.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(None)
        }
    }

    struct Panics;
    impl JobHandler for Panics {
        fn job_type(&self) -> &str {
            "panics"
        }
        async fn execute(&self, _ctx: JobContext) -> JobResult {
            panic!("boom")
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_handler_ignoring_cancellation_is_aborted_after_the_grace() {
        let ctx = JobContext::new("slow", json!({}));
        let start = tokio::time::Instant::now();
        let exec = execute(Arc::new(Slow), ctx, Some(Duration::from_secs(2))).await;
        assert!(exec.timed_out);
        assert!(exec.result.is_err());
        assert_eq!(start.elapsed(), Duration::from_secs(2) + CANCEL_GRACE);
    }

    #[tokio::test]
    async fn a_panic_is_a_failed_attempt() {
        let exec = execute(Arc::new(Panics), JobContext::new("panics", json!({})), None).await;
        assert_eq!(exec.result.unwrap_err().message(), "handler panicked: boom");
        assert!(!exec.timed_out);
    }

    #[test]
    fn builder_checks() {
        assert!(Worker::builder().build().is_err(), "no handlers");
        let w = Worker::builder()
            .handler(crate::builtin::EchoHandler)
            .handler(crate::builtin::FailHandler)
            .name("w1")
            .build()
            .unwrap();
        assert_eq!(w.job_types(), ["echo", "fail"]);
        assert_eq!(w.name(), "w1");
        assert!(Worker::builder()
            .handler(crate::builtin::EchoHandler)
            .lease_seconds(4)
            .heartbeat_interval(Duration::from_secs(3))
            .build()
            .is_err());
    }

    #[test]
    fn backoff_grows_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let ds: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(ds[0] >= Duration::from_millis(80) && ds[0] <= Duration::from_millis(120));
        assert!(ds[7] >= Duration::from_millis(800) && ds[7] <= Duration::from_millis(1200));
    }
}
