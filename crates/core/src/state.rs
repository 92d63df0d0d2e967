//! [`apply`]: the only function that changes scheduler state, and [`Reader`],
//! the queries the API serves from the same key space.
//!
//! Index invariant (holds between commands): a Pending job is in the ready
//! indexes when `ready_at <= clock` and in the delayed index otherwise; a
//! Failed job is always in the delayed index. `apply` first promotes every
//! delayed job that has come due (Failed becomes Pending), so the placement
//! of any stored job can be recomputed from the job and the current clock.

use uuid::Uuid;

use crate::backoff::retry_delay_ms;
use crate::command::{Batch, Command, CompletionReport, Outcome, Rejection};
use crate::graph::is_legal;
use crate::keys::{self, decode, encode};
use crate::kv::{KvError, KvRead, Overlay};
use crate::limits;
use crate::model::{Job, JobSpec, JobStatus, Lease, Worker, WorkerStatus};
use crate::Millis;

/// How many delayed jobs one batch promotes at most; the rest follow in the
/// next batches (the leader's monitors propose regularly).
const PROMOTE_PER_BATCH: usize = 10_000;
/// Index entries read at a time while looking for due ones (delayed jobs to
/// promote, lapsed leases).
const DUE_PAGE: usize = 64;

/// Apply one Raft entry's batch at `log_index`. Writes go to `kv`; the caller
/// commits them atomically with its last-applied marker.
pub fn apply(kv: &mut Overlay<'_>, log_index: u64, batch: &Batch) -> Result<Vec<Outcome>, KvError> {
    let stored_clock = Reader::new(&*kv).clock()?;
    // Time never moves backwards, even if a new leader's clock is behind.
    let clock = stored_clock.max(batch.now_ms);
    if clock != stored_clock {
        kv.put(keys::META_CLOCK.to_vec(), clock.to_be_bytes().to_vec());
    }
    let mut st = State { kv, clock, log_index };
    st.promote_due()?;
    let mut out = Vec::with_capacity(batch.commands.len());
    for cmd in &batch.commands {
        out.push(st.apply_one(cmd)?);
    }
    Ok(out)
}

/// Check a job spec; the API layer calls this to answer 422 before proposing,
/// and `apply` calls it again so a bad command can never enter the state.
pub fn validate_spec(spec: &JobSpec) -> Result<(), Rejection> {
    let bad = |field: &str, message: String| Err(Rejection::Invalid { field: field.into(), message });
    if spec.name.len() > limits::MAX_NAME_LEN {
        return bad("name", format!("must be at most {} bytes", limits::MAX_NAME_LEN));
    }
    if spec.job_type.trim().is_empty() {
        return bad("type", "must not be empty".into());
    }
    if spec.job_type.len() > limits::MAX_TYPE_LEN {
        return bad("type", format!("must be at most {} bytes", limits::MAX_TYPE_LEN));
    }
    if !(limits::MIN_PRIORITY..=limits::MAX_PRIORITY).contains(&spec.priority) {
        return bad("priority", format!("must be between {} and {}", limits::MIN_PRIORITY, limits::MAX_PRIORITY));
    }
    if spec.max_retries > limits::MAX_RETRIES {
        return bad("maxRetries", format!("must be between 0 and {}", limits::MAX_RETRIES));
    }
    if spec.payload.len() > limits::MAX_PAYLOAD_BYTES {
        return bad("payload", format!("must be at most {} bytes", limits::MAX_PAYLOAD_BYTES));
    }
    if spec.timeout_ms == Some(0) {
        return bad("timeoutSeconds", "must be positive".into());
    }
    Ok(())
}

struct State<'k, 'a> {
    kv: &'k mut Overlay<'a>,
    clock: Millis,
    log_index: u64,
}

enum Placement {
    Ready,
    Delayed,
    Finished,
    /// Running: in the lease-expiry index, at its lease's expiry.
    Leased,
}

impl State<'_, '_> {
    fn reader(&self) -> Reader<'_, Overlay<'_>> {
        Reader { kv: &*self.kv }
    }

    fn apply_one(&mut self, cmd: &Command) -> Result<Outcome, KvError> {
        match cmd {
            Command::SubmitJob { job_id, request_id, spec } => self.submit(*job_id, request_id.as_deref(), spec),
            Command::AcquireJobs { worker_id, job_types, max_jobs, lease_ms } => {
                self.acquire(*worker_id, job_types, *max_jobs, *lease_ms)
            }
            Command::CompleteJob { job_id, fencing_token, report } => self.complete(*job_id, *fencing_token, report),
            Command::ReleaseJob { job_id, fencing_token } => self.release(*job_id, *fencing_token),
            Command::CancelJob { job_id } => self.cancel(*job_id),
            Command::RegisterWorker { worker_id, name, capacity, job_types } => {
                self.register(*worker_id, name, *capacity, job_types)
            }
            Command::Heartbeat { worker_id, jobs } => self.heartbeat(*worker_id, jobs.as_deref()),
            Command::DeregisterWorker { worker_id } => self.deregister(*worker_id),
            Command::ExpireLease { job_id, fencing_token } => self.expire_lease(*job_id, *fencing_token),
            Command::MarkWorkerDead { worker_id, last_heartbeat_at } => {
                self.mark_worker_dead(*worker_id, *last_heartbeat_at)
            }
            Command::PurgeFinished { finished_before, max_jobs } => self.purge(*finished_before, *max_jobs),
            Command::Tick => Ok(Outcome::Monitor { changed: 0 }),
        }
    }

    // ----- index maintenance -------------------------------------------------

    fn placement(&self, job: &Job) -> Placement {
        match job.status {
            JobStatus::Pending if job.ready_at <= self.clock => Placement::Ready,
            JobStatus::Pending | JobStatus::Failed => Placement::Delayed,
            JobStatus::Completed | JobStatus::Dead => Placement::Finished,
            JobStatus::Running => Placement::Leased,
        }
    }

    fn placement_keys(&self, job: &Job) -> Vec<Vec<u8>> {
        match self.placement(job) {
            Placement::Ready => vec![
                keys::ready_any(job.spec.priority, job.seq),
                keys::ready_type(&job.spec.job_type, job.spec.priority, job.seq),
            ],
            Placement::Delayed => vec![keys::delayed(job.ready_at, job.seq)],
            Placement::Finished => vec![keys::finished(job.completed_at.unwrap_or(job.updated_at), job.seq)],
            // A Running job always holds a lease (only acquire makes one Running).
            Placement::Leased => job.lease.iter().map(|l| keys::lease_expiry(l.expires_at, job.seq)).collect(),
        }
    }

    /// Store `new`, moving its index entries from where `old` had them.
    fn save_job(&mut self, old: Option<&Job>, new: &Job) {
        let id_bytes = new.id.as_bytes().to_vec();
        match old {
            None => {
                self.kv.put(keys::by_seq(new.seq), id_bytes.clone());
                self.kv.put(keys::by_status(new.status, new.seq), id_bytes.clone());
                if let Some(r) = &new.request_id {
                    self.kv.put(keys::request(r), id_bytes.clone());
                }
            }
            Some(old) => {
                debug_assert!(old.status == new.status || is_legal(old.status, new.status));
                if old.status != new.status {
                    self.kv.delete(keys::by_status(old.status, old.seq));
                    self.kv.put(keys::by_status(new.status, new.seq), id_bytes.clone());
                }
                let old_keys = self.placement_keys(old);
                let new_keys = self.placement_keys(new);
                for k in old_keys.iter().filter(|k| !new_keys.contains(k)) {
                    self.kv.delete(k.clone());
                }
            }
        }
        for k in self.placement_keys(new) {
            self.kv.put(k, id_bytes.clone());
        }
        self.kv.put(keys::job(new.id), encode(new));
    }

    fn load_job(&self, id: Uuid) -> Result<Option<Job>, KvError> {
        self.reader().job(id)
    }

    fn load_worker(&self, id: Uuid) -> Result<Option<Worker>, KvError> {
        self.reader().worker(id)
    }

    fn save_worker(&mut self, w: &Worker) {
        self.kv.put(keys::worker(w.id), encode(w));
    }

    /// Move delayed jobs whose time has come into the ready indexes (at most
    /// `PROMOTE_PER_BATCH` per batch, earliest first).
    ///
    /// Reads the delayed index in small pages and stops at the first job not
    /// yet due: every batch runs this, and with many jobs waiting (a large
    /// `runAt` backlog, retries in backoff) reading a big fixed page each
    /// time would cost far more than the batch itself.
    fn promote_due(&mut self) -> Result<(), KvError> {
        let prefix = [keys::DELAYED];
        let mut start = prefix.to_vec();
        let mut promoted = 0;
        loop {
            let page_len = DUE_PAGE.min(PROMOTE_PER_BATCH - promoted);
            let (page, more) = due_page(&*self.kv, &prefix, &mut start, self.clock, page_len)?;
            for (k, id) in page {
                let Some(old) = self.load_job(id)? else {
                    return Err(KvError(format!("delayed index points at missing job {id}")));
                };
                let mut job = old.clone();
                job.status = JobStatus::Pending;
                // Placement of `old` is computed with the current clock, which would
                // call a due Pending job Ready; remove its delayed key explicitly.
                self.kv.delete(k);
                if old.status != job.status {
                    job.updated_at = self.clock;
                }
                self.save_job_promoted(&old, &job);
                promoted += 1;
            }
            if !more || promoted >= PROMOTE_PER_BATCH {
                return Ok(());
            }
        }
    }

    fn save_job_promoted(&mut self, old: &Job, new: &Job) {
        let id_bytes = new.id.as_bytes().to_vec();
        if old.status != new.status {
            self.kv.delete(keys::by_status(old.status, old.seq));
            self.kv.put(keys::by_status(new.status, new.seq), id_bytes);
        }
        for k in self.placement_keys(new) {
            self.kv.put(k, new.id.as_bytes().to_vec());
        }
        self.kv.put(keys::job(new.id), encode(new));
    }

    fn transition(&self, job: &Job, to: JobStatus) -> Job {
        debug_assert!(is_legal(job.status, to), "{:?} -> {:?}", job.status, to);
        let mut next = job.clone();
        next.status = to;
        next.updated_at = self.clock;
        next
    }

    /// An attempt ended without success (failure report, expired lease, dead
    /// worker): Dead when attempts are used up, otherwise back in the queue,
    /// after a backoff when `backoff` is set.
    fn fail_attempt(&mut self, job: &Job, error: String, backoff: bool) -> Job {
        let next = if job.attempt >= job.max_attempts() {
            let mut n = self.transition(job, JobStatus::Dead);
            n.completed_at = Some(self.clock);
            n
        } else if backoff {
            let mut n = self.transition(job, JobStatus::Failed);
            n.ready_at = self.clock + retry_delay_ms(job.id, job.attempt) as Millis;
            n
        } else {
            let mut n = self.transition(job, JobStatus::Pending);
            n.ready_at = self.clock;
            n
        };
        let mut next = next;
        next.lease = None;
        next.last_error = Some(error);
        self.save_job(Some(job), &next);
        next
    }

    // ----- commands ----------------------------------------------------------

    fn submit(&mut self, job_id: Uuid, request_id: Option<&str>, spec: &JobSpec) -> Result<Outcome, KvError> {
        if let Err(r) = validate_spec(spec) {
            return Ok(Outcome::Rejected(r));
        }
        if let Some(r) = request_id {
            if r.is_empty() || r.len() > limits::MAX_REQUEST_ID_LEN {
                return Ok(Outcome::Rejected(Rejection::Invalid {
                    field: "requestId".into(),
                    message: format!("must be 1 to {} bytes", limits::MAX_REQUEST_ID_LEN),
                }));
            }
            if let Some(v) = self.kv.get(&keys::request(r))? {
                let existing = keys::id_from_value(&v)?;
                if let Some(job) = self.load_job(existing)? {
                    return Ok(Outcome::Submitted { job, created: false });
                }
            }
        }
        if let Some(job) = self.load_job(job_id)? {
            return Ok(Outcome::Submitted { job, created: false });
        }
        let seq = self.reader().next_seq()?;
        self.kv.put(keys::META_NEXT_SEQ.to_vec(), (seq + 1).to_be_bytes().to_vec());
        let job = Job {
            id: job_id,
            seq,
            spec: spec.clone(),
            request_id: request_id.map(str::to_owned),
            status: JobStatus::Pending,
            attempt: 0,
            lease: None,
            last_token: 0,
            ready_at: spec.run_at.unwrap_or(self.clock),
            created_at: self.clock,
            started_at: None,
            completed_at: None,
            updated_at: self.clock,
            last_error: None,
            result: None,
        };
        self.save_job(None, &job);
        Ok(Outcome::Submitted { job, created: true })
    }

    fn acquire(
        &mut self,
        worker_id: Uuid,
        job_types: &[String],
        max_jobs: u32,
        lease_ms: u64,
    ) -> Result<Outcome, KvError> {
        let Some(worker) = self.load_worker(worker_id)? else {
            return Ok(Outcome::Rejected(Rejection::WorkerNotFound));
        };
        if worker.status == WorkerStatus::Dead {
            return Ok(Outcome::Rejected(Rejection::WorkerDead));
        }
        let types = if job_types.is_empty() { &worker.job_types[..] } else { job_types };
        let max = max_jobs.min(limits::MAX_ACQUIRE_BATCH).min(worker.capacity.max(1)) as usize;
        let picked = self.reader().ready_candidates(types, max)?;
        let mut jobs = Vec::with_capacity(picked.len());
        for id in picked {
            let Some(old) = self.load_job(id)? else {
                return Err(KvError(format!("ready index points at missing job {id}")));
            };
            let mut job = self.transition(&old, JobStatus::Running);
            job.attempt += 1;
            job.last_token = self.log_index;
            job.started_at = Some(self.clock);
            job.lease = Some(Lease {
                worker_id,
                fencing_token: self.log_index,
                expires_at: self.clock.saturating_add(lease_ms as Millis),
                duration_ms: lease_ms,
            });
            self.save_job(Some(&old), &job);
            jobs.push(job);
        }
        Ok(Outcome::Acquired { jobs })
    }

    /// Find a Running job whose lease carries `token`, or say why not.
    fn leased_job(&self, job_id: Uuid, token: u64) -> Result<Result<Job, Rejection>, KvError> {
        let Some(job) = self.load_job(job_id)? else {
            return Ok(Err(Rejection::JobNotFound));
        };
        match &job.lease {
            Some(l) if job.status == JobStatus::Running && l.fencing_token == token => Ok(Ok(job)),
            Some(l) => Ok(Err(Rejection::StaleToken { current: Some(l.fencing_token) })),
            None if token != job.last_token => Ok(Err(Rejection::StaleToken { current: None })),
            None => Ok(Err(Rejection::WrongStatus { status: job.status })),
        }
    }

    fn complete(&mut self, job_id: Uuid, token: u64, report: &CompletionReport) -> Result<Outcome, KvError> {
        let job = match self.leased_job(job_id, token)? {
            Ok(job) => job,
            Err(Rejection::WrongStatus { status }) => {
                // Same token, lease already closed: a retried report of the same
                // result returns the job as it is (the first report won).
                let job = self.load_job(job_id)?.ok_or_else(|| KvError("job vanished".into()))?;
                let same = matches!(
                    (report, status),
                    (CompletionReport::Succeeded { .. }, JobStatus::Completed)
                        | (CompletionReport::Failed { .. }, JobStatus::Failed | JobStatus::Dead | JobStatus::Pending)
                ) && job.last_error.is_none() == matches!(report, CompletionReport::Succeeded { .. });
                return Ok(if same {
                    Outcome::Job { job }
                } else {
                    Outcome::Rejected(Rejection::WrongStatus { status })
                });
            }
            Err(r) => return Ok(Outcome::Rejected(r)),
        };
        let next = match report {
            CompletionReport::Succeeded { result } => {
                if result.as_ref().is_some_and(|r| r.len() > limits::MAX_RESULT_BYTES) {
                    return Ok(Outcome::Rejected(Rejection::Invalid {
                        field: "result".into(),
                        message: format!("must be at most {} bytes", limits::MAX_RESULT_BYTES),
                    }));
                }
                let mut n = self.transition(&job, JobStatus::Completed);
                n.lease = None;
                n.completed_at = Some(self.clock);
                n.result = result.clone();
                n.last_error = None;
                self.save_job(Some(&job), &n);
                n
            }
            CompletionReport::Failed { error } => {
                let mut error = error.clone();
                truncate_utf8(&mut error, limits::MAX_ERROR_LEN);
                self.fail_attempt(&job, error, true)
            }
        };
        Ok(Outcome::Job { job: next })
    }

    fn release(&mut self, job_id: Uuid, token: u64) -> Result<Outcome, KvError> {
        let job = match self.leased_job(job_id, token)? {
            Ok(job) => job,
            Err(r) => return Ok(Outcome::Rejected(r)),
        };
        Ok(Outcome::Job { job: self.release_uncounted(&job) })
    }

    /// Back to Pending at once, and the attempt does not count.
    fn release_uncounted(&mut self, job: &Job) -> Job {
        let mut n = self.transition(job, JobStatus::Pending);
        n.attempt = n.attempt.saturating_sub(1);
        n.lease = None;
        n.ready_at = self.clock;
        self.save_job(Some(job), &n);
        n
    }

    fn cancel(&mut self, job_id: Uuid) -> Result<Outcome, KvError> {
        let Some(job) = self.load_job(job_id)? else {
            return Ok(Outcome::Rejected(Rejection::JobNotFound));
        };
        if !matches!(job.status, JobStatus::Pending | JobStatus::Failed) {
            return Ok(Outcome::Rejected(Rejection::WrongStatus { status: job.status }));
        }
        let mut n = self.transition(&job, JobStatus::Dead);
        n.completed_at = Some(self.clock);
        n.last_error = Some("cancelled".into());
        self.save_job(Some(&job), &n);
        Ok(Outcome::Job { job: n })
    }

    fn register(
        &mut self,
        worker_id: Uuid,
        name: &str,
        capacity: u32,
        job_types: &[String],
    ) -> Result<Outcome, KvError> {
        if capacity == 0 || capacity > limits::MAX_WORKER_CAPACITY {
            return Ok(Outcome::Rejected(Rejection::Invalid {
                field: "capacity".into(),
                message: format!("must be between 1 and {}", limits::MAX_WORKER_CAPACITY),
            }));
        }
        let registered_at = self.load_worker(worker_id)?.map_or(self.clock, |w| w.registered_at);
        let worker = Worker {
            id: worker_id,
            name: name.to_owned(),
            capacity,
            job_types: job_types.to_vec(),
            registered_at,
            last_heartbeat_at: self.clock,
            status: WorkerStatus::Active,
        };
        self.save_worker(&worker);
        Ok(Outcome::Worker { worker })
    }

    fn heartbeat(&mut self, worker_id: Uuid, jobs: Option<&[(Uuid, u64)]>) -> Result<Outcome, KvError> {
        let Some(mut worker) = self.load_worker(worker_id)? else {
            return Ok(Outcome::Rejected(Rejection::WorkerNotFound));
        };
        if worker.status == WorkerStatus::Dead {
            return Ok(Outcome::Rejected(Rejection::WorkerDead));
        }
        worker.last_heartbeat_at = self.clock;
        self.save_worker(&worker);
        let mut revoked = Vec::new();
        let held: Vec<Job> = match jobs {
            Some(list) => {
                let mut held = Vec::with_capacity(list.len());
                for &(job_id, token) in list {
                    match self.leased_job(job_id, token)? {
                        Ok(job) if job.lease.as_ref().is_some_and(|l| l.worker_id == worker_id) => held.push(job),
                        _ => revoked.push(job_id),
                    }
                }
                held
            }
            None => self.reader().running_jobs_of(worker_id)?,
        };
        for job in held {
            let mut n = job.clone();
            if let Some(l) = n.lease.as_mut() {
                l.expires_at = self.clock.saturating_add(l.duration_ms as Millis);
            }
            self.save_job(Some(&job), &n);
        }
        Ok(Outcome::Heartbeat { worker, revoked })
    }

    fn deregister(&mut self, worker_id: Uuid) -> Result<Outcome, KvError> {
        let Some(worker) = self.load_worker(worker_id)? else {
            return Ok(Outcome::Rejected(Rejection::WorkerNotFound));
        };
        for job in self.reader().running_jobs_of(worker_id)? {
            self.release_uncounted(&job);
        }
        self.kv.delete(keys::worker(worker_id));
        Ok(Outcome::Worker { worker })
    }

    fn expire_lease(&mut self, job_id: Uuid, token: u64) -> Result<Outcome, KvError> {
        let job = match self.leased_job(job_id, token)? {
            Ok(job) => job,
            Err(_) => return Ok(Outcome::Monitor { changed: 0 }),
        };
        if job.lease.as_ref().is_some_and(|l| l.expires_at > self.clock) {
            return Ok(Outcome::Monitor { changed: 0 }); // extended meanwhile
        }
        self.fail_attempt(&job, "lease expired".into(), false);
        Ok(Outcome::Monitor { changed: 1 })
    }

    fn mark_worker_dead(&mut self, worker_id: Uuid, last_heartbeat_at: Millis) -> Result<Outcome, KvError> {
        let Some(mut worker) = self.load_worker(worker_id)? else {
            return Ok(Outcome::Monitor { changed: 0 });
        };
        if worker.status == WorkerStatus::Dead || worker.last_heartbeat_at != last_heartbeat_at {
            return Ok(Outcome::Monitor { changed: 0 });
        }
        worker.status = WorkerStatus::Dead;
        self.save_worker(&worker);
        let mut changed = 1;
        for job in self.reader().running_jobs_of(worker_id)? {
            self.fail_attempt(&job, "worker declared dead".into(), false);
            changed += 1;
        }
        Ok(Outcome::Monitor { changed })
    }

    fn purge(&mut self, finished_before: Millis, max_jobs: u32) -> Result<Outcome, KvError> {
        let entries = self.kv.scan(&[keys::FINISHED], &[keys::FINISHED], max_jobs as usize)?;
        let mut changed = 0;
        for (k, v) in entries {
            if keys::time_from_bytes(&k[1..9]) >= finished_before {
                break;
            }
            let id = keys::id_from_value(&v)?;
            if let Some(job) = self.load_job(id)? {
                self.kv.delete(keys::job(id));
                self.kv.delete(keys::by_seq(job.seq));
                self.kv.delete(keys::by_status(job.status, job.seq));
                if let Some(r) = &job.request_id {
                    self.kv.delete(keys::request(r));
                }
            }
            self.kv.delete(k);
            changed += 1;
        }
        Ok(Outcome::Monitor { changed })
    }
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// Read-only queries over the state machine's key space.
pub struct Reader<'a, K: KvRead + ?Sized> {
    kv: &'a K,
}

impl<'a, K: KvRead + ?Sized> Reader<'a, K> {
    pub fn new(kv: &'a K) -> Self {
        Reader { kv }
    }

    /// The largest leader time applied so far (0 before any).
    pub fn clock(&self) -> Result<Millis, KvError> {
        Ok(self.kv.get(keys::META_CLOCK)?.map_or(0, |v| be_i64(&v)))
    }

    fn next_seq(&self) -> Result<u64, KvError> {
        Ok(self.kv.get(keys::META_NEXT_SEQ)?.map_or(1, |v| be_i64(&v) as u64))
    }

    pub fn job(&self, id: Uuid) -> Result<Option<Job>, KvError> {
        self.kv.get(&keys::job(id))?.map(|v| decode(&v)).transpose()
    }

    pub fn worker(&self, id: Uuid) -> Result<Option<Worker>, KvError> {
        self.kv.get(&keys::worker(id))?.map(|v| decode(&v)).transpose()
    }

    /// Jobs in submission order, optionally of one status, starting after the
    /// cursor `after_seq`. Returns the page and the cursor for the next page.
    pub fn list_jobs(
        &self,
        status: Option<JobStatus>,
        after_seq: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<Job>, Option<u64>), KvError> {
        let prefix = match status {
            Some(s) => keys::status_prefix(s),
            None => vec![keys::BY_SEQ],
        };
        let start = match after_seq {
            Some(seq) => {
                let mut k = prefix.clone();
                k.extend_from_slice(&seq.saturating_add(1).to_be_bytes());
                k
            }
            None => prefix.clone(),
        };
        let rows = self.kv.scan(&prefix, &start, limit.saturating_add(1))?;
        let more = rows.len() > limit;
        let mut jobs = Vec::with_capacity(rows.len().min(limit));
        for (_, v) in rows.into_iter().take(limit) {
            let id = keys::id_from_value(&v)?;
            let job = self.job(id)?.ok_or_else(|| KvError(format!("index points at missing job {id}")))?;
            jobs.push(job);
        }
        let next = if more { jobs.last().map(|j| j.seq) } else { None };
        Ok((jobs, next))
    }

    /// All workers, in id order.
    pub fn workers(&self) -> Result<Vec<Worker>, KvError> {
        self.kv.scan(&[keys::WORKER], &[keys::WORKER], usize::MAX)?.into_iter().map(|(_, v)| decode(&v)).collect()
    }

    /// Every Running job (bounded by the workers' total capacity), earliest
    /// lease expiry first.
    pub fn running_jobs(&self) -> Result<Vec<Job>, KvError> {
        let prefix = [keys::LEASE_EXPIRY];
        let mut out = Vec::new();
        for (_, v) in self.kv.scan(&prefix, &prefix, usize::MAX)? {
            let id = keys::id_from_value(&v)?;
            out.extend(self.job(id)?);
        }
        Ok(out)
    }

    /// Running jobs whose lease expires at or before `now`, earliest first,
    /// at most `max`. Reads only the due part of the lease-expiry index, so
    /// the leader's once-a-second check costs nothing per healthy lease.
    pub fn leases_due_by(&self, now: Millis, max: usize) -> Result<Vec<Job>, KvError> {
        let prefix = [keys::LEASE_EXPIRY];
        let mut start = prefix.to_vec();
        let mut out = Vec::new();
        while out.len() < max {
            let (page, more) = due_page(self.kv, &prefix, &mut start, now, DUE_PAGE.min(max - out.len()))?;
            for (_, id) in page {
                out.push(self.job(id)?.ok_or_else(|| KvError(format!("lease index points at missing job {id}")))?);
            }
            if !more {
                break;
            }
        }
        Ok(out)
    }

    pub fn running_jobs_of(&self, worker_id: Uuid) -> Result<Vec<Job>, KvError> {
        Ok(self
            .running_jobs()?
            .into_iter()
            .filter(|j| j.lease.as_ref().is_some_and(|l| l.worker_id == worker_id))
            .collect())
    }

    /// Ids of up to `max` ready jobs of the given types (empty: any type), best
    /// priority first, then submission order.
    pub fn ready_candidates(&self, job_types: &[String], max: usize) -> Result<Vec<Uuid>, KvError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        if job_types.is_empty() {
            return self
                .kv
                .scan(&[keys::READY_ANY], &[keys::READY_ANY], max)?
                .into_iter()
                .map(|(_, v)| keys::id_from_value(&v))
                .collect();
        }
        // Merge the per-type queues on (inverted priority, seq), the key suffix.
        let mut all: Vec<(Vec<u8>, Uuid)> = Vec::new();
        let mut seen_types: Vec<&str> = Vec::new();
        for t in job_types {
            if seen_types.contains(&t.as_str()) {
                continue;
            }
            seen_types.push(t);
            let prefix = keys::ready_type_prefix(t);
            for (k, v) in self.kv.scan(&prefix, &prefix, max)? {
                all.push((k[prefix.len()..].to_vec(), keys::id_from_value(&v)?));
            }
        }
        all.sort();
        Ok(all.into_iter().take(max).map(|(_, id)| id).collect())
    }

    /// Is anything ready (or due by `now`) for these types? A cheap check the
    /// leader makes before proposing an acquire for a long-polling worker.
    pub fn has_ready(&self, job_types: &[String], now: Millis) -> Result<bool, KvError> {
        if !self.ready_candidates(job_types, 1)?.is_empty() {
            return Ok(true);
        }
        Ok(self.next_delayed_at()?.is_some_and(|t| t <= now))
    }

    /// When the earliest delayed job becomes due, if any.
    pub fn next_delayed_at(&self) -> Result<Option<Millis>, KvError> {
        Ok(self.kv.scan(&[keys::DELAYED], &[keys::DELAYED], 1)?.first().map(|(k, _)| keys::time_from_bytes(&k[1..9])))
    }

    /// Ids and tokens of terminal jobs finished before `before` exist?
    pub fn oldest_finished_at(&self) -> Result<Option<Millis>, KvError> {
        Ok(self.kv.scan(&[keys::FINISHED], &[keys::FINISHED], 1)?.first().map(|(k, _)| keys::time_from_bytes(&k[1..9])))
    }

    /// Number of jobs per status (a scan of the status index; for metrics and
    /// tests, not for hot paths).
    pub fn count_by_status(&self, status: JobStatus) -> Result<usize, KvError> {
        let prefix = keys::status_prefix(status);
        Ok(self.kv.scan(&prefix, &prefix, usize::MAX)?.len())
    }
}

/// Index keys with the job ids they point at.
type DuePage = Vec<(Vec<u8>, Uuid)>;

/// One page of a time-keyed index (tag, time, seq -> job id), read from
/// `start`: the entries whose time is at or before `until`, at most
/// `page_len`, with `start` moved just past the last one returned. The flag
/// says whether more due entries may follow (the page was full and no
/// entry after `until` was met). The delayed and lease-expiry indexes are
/// read this way, in small pages, because only their front is ever due.
fn due_page<K: KvRead + ?Sized>(
    kv: &K,
    prefix: &[u8],
    start: &mut Vec<u8>,
    until: Millis,
    page_len: usize,
) -> Result<(DuePage, bool), KvError> {
    let rows = kv.scan(prefix, start, page_len)?;
    let full = rows.len() == page_len;
    let mut out = Vec::with_capacity(rows.len());
    for (k, v) in rows {
        if keys::time_from_bytes(&k[1..9]) > until {
            return Ok((out, false));
        }
        start.clear();
        start.extend_from_slice(&k);
        start.push(0);
        out.push((k, keys::id_from_value(&v)?));
    }
    Ok((out, full))
}

fn be_i64(v: &[u8]) -> i64 {
    let mut a = [0u8; 8];
    let n = v.len().min(8);
    a[8 - n..].copy_from_slice(&v[..n]);
    i64::from_be_bytes(a)
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
