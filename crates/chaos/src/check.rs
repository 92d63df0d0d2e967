//! `check`: judges a history against the cluster's final state. It owns the
//! safety properties (no lost acknowledged job, no job from nowhere, fenced
//! completions, stale completions rejected, bounded attempts, legal
//! transitions, everything terminal after the drain, replicas agreeing) and
//! the availability figures (longest gap between acknowledged submits around
//! each fault, per fault kind).
//!
//! The judging itself is the pure function [`judge`] (history + final jobs +
//! digests in, [`Verdict`] out) so that it can be tested on deliberately
//! broken histories; [`check`] only fetches the cluster state and prints.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use jobsched_api::{DigestView, JobView};

use crate::cluster;
use crate::history::{self, Event, Outcome, WorkerFaultKind};

/// Print at most this many examples per kind of failure.
const EXAMPLES: usize = 5;

/// Failover targets from the issue, with the default configuration.
const TARGET_MEDIAN_MS: u64 = 1000;
const TARGET_MAX_MS: u64 = 3000;

/// The checker's findings: `failures` empty means PASS; `report` holds the
/// counts and figures, one line each.
#[derive(Debug, Default)]
pub struct Verdict {
    pub failures: Vec<String>,
    pub report: Vec<String>,
    /// Client-observed write unavailability (ms) of each fault that hit the
    /// leader alone (kill -9, SIGSTOP, partition of the leader).
    pub failover_gaps: Vec<u64>,
}

impl Verdict {
    pub fn pass(&self) -> bool {
        self.failures.is_empty()
    }

    fn fail(&mut self, kind: &str, examples: Vec<String>) {
        if !examples.is_empty() {
            self.failures.push(format!(
                "{kind}: {} (e.g. {})",
                examples.len(),
                examples.iter().take(EXAMPLES).cloned().collect::<Vec<_>>().join("; ")
            ));
        }
    }
}

/// Prints the verdict and returns whether it passed.
pub async fn check(nodes: &[String], path: &Path, digest_wait: f64) -> Result<bool> {
    let events = history::read(path)?;
    let http = reqwest::Client::builder().build()?;
    let after_seq = match events.first() {
        Some(Event::Start { after_seq, .. }) => *after_seq,
        _ => None,
    };
    let all = cluster::jobs_after(&http, nodes, after_seq).await?;
    let digests = settled_digests(&http, nodes, Duration::from_secs_f64(digest_wait)).await;
    let v = judge(&events, all, &digests)?;
    for line in &v.report {
        println!("{line}");
    }
    if v.pass() {
        println!("VERDICT: PASS");
    } else {
        for f in &v.failures {
            println!("  FAIL {f}");
        }
        println!("VERDICT: FAIL");
    }
    Ok(v.pass())
}

/// Digests of all nodes once they report the same applied index. Writes may
/// still be in flight (leader monitors), so poll; returns the last reading
/// when they never line up within `wait` (judged "not comparable").
async fn settled_digests(http: &reqwest::Client, nodes: &[String], wait: Duration) -> Vec<Option<DigestView>> {
    let end = Instant::now() + wait;
    loop {
        let ds = cluster::digests(http, nodes).await;
        let idx: HashSet<_> = ds.iter().map(|d| d.as_ref().map(|d| d.applied_index)).collect();
        if (idx.len() == 1 && ds.iter().all(Option::is_some)) || Instant::now() >= end {
            return ds;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A fault as the availability figures need it.
struct FaultRec<'a> {
    index: usize,
    t_ms: u64,
    kind: &'a str,
    leader: Option<u64>,
    target: Option<u64>,
    cmd: &'a str,
}

/// A worker fault: which worker slot, what, and the (job, token) it held.
struct WorkerFaultRec<'a> {
    worker: usize,
    kind: WorkerFaultKind,
    jobs: &'a [(String, u64)],
}

fn median_max(v: &[u64]) -> (u64, u64) {
    let mut s = v.to_vec();
    s.sort_unstable();
    (s.get(s.len() / 2).copied().unwrap_or(0), s.last().copied().unwrap_or(0))
}

/// Judges `events` against the cluster's final jobs (`all`: every job, this
/// run's are picked by name) and the nodes' digests (one entry per node,
/// `None` for a node that did not answer).
pub fn judge(events: &[Event], all: Vec<JobView>, digests: &[Option<DigestView>]) -> Result<Verdict> {
    let Some(Event::Start { run_id, .. }) = events.first() else { bail!("history does not begin with a start record") };
    let job_name = format!("chaos-{run_id}");
    let mut v = Verdict::default();

    // --- what the history says -------------------------------------------
    let mut submits: HashMap<&str, (Outcome, Option<&str>)> = HashMap::new();
    let (mut ok, mut failed, mut unknown) = (0usize, 0usize, 0usize);
    let mut acquires: HashMap<&str, Vec<(u32, u64)>> = HashMap::new();
    // job -> (token, success, status) of every completion report
    let mut completions: HashMap<&str, Vec<(u64, bool, u16)>> = HashMap::new();
    let mut rejected: Vec<(&str, u64, u16, Option<&str>)> = Vec::new();
    let mut complete_unknown = 0usize;
    let mut ok_returns: Vec<u64> = Vec::new();
    let mut faults: Vec<FaultRec> = Vec::new();
    let mut worker_faults: HashMap<usize, WorkerFaultRec> = HashMap::new();
    let mut resumes: HashMap<usize, u64> = HashMap::new();
    // fault index -> when its command returned (restart / heal included)
    let mut fault_ends: HashMap<usize, u64> = HashMap::new();
    // index -> (time every node had caught up, or the wait gave up; caught up)
    let mut settled: HashMap<usize, (u64, bool)> = HashMap::new();
    let mut fault_failed: Vec<String> = Vec::new();
    let mut drain: Option<(bool, usize)> = None;
    for e in events {
        match e {
            Event::Submit { request_id, job_id, outcome, return_ms, .. } => {
                submits.insert(request_id, (*outcome, job_id.as_deref()));
                match outcome {
                    Outcome::Ok => {
                        ok += 1;
                        ok_returns.push(*return_ms);
                    }
                    Outcome::Failed => failed += 1,
                    Outcome::Unknown => unknown += 1,
                }
            }
            Event::Acquire { job_id, attempt, token, .. } => {
                acquires.entry(job_id).or_default().push((*attempt, *token))
            }
            Event::Complete { job_id, token, success, status, code, .. } => {
                completions.entry(job_id).or_default().push((*token, *success, *status));
                match status {
                    200..=299 => {}
                    0 => complete_unknown += 1,
                    _ => rejected.push((job_id, *token, *status, code.as_deref())),
                }
            }
            Event::FaultStart { index, t_ms, kind, leader, target, cmd } => {
                faults.push(FaultRec { index: *index, t_ms: *t_ms, kind, leader: *leader, target: *target, cmd })
            }
            Event::FaultEnd { index, t_ms, exit_code } => {
                fault_ends.insert(*index, *t_ms);
                if *exit_code != Some(0) {
                    fault_failed.push(format!("fault {index} exit code {exit_code:?}"));
                }
            }
            Event::WorkerFault { index, worker, kind, jobs, .. } => {
                worker_faults.insert(*index, WorkerFaultRec { worker: *worker, kind: *kind, jobs });
            }
            Event::WorkerResume { index, t_ms, .. } => {
                resumes.insert(*index, *t_ms);
            }
            Event::DrainEnd { drained, remaining, .. } => drain = Some((*drained, *remaining)),
            Event::Settled { index, t_ms, caught_up } => {
                settled.insert(*index, (*t_ms, *caught_up));
            }
            _ => {}
        }
    }
    let accepted_success = |id: &str| -> HashSet<u64> {
        completions
            .get(id)
            .into_iter()
            .flatten()
            .filter(|(_, s, st)| *s && (200..300).contains(st))
            .map(|(t, _, _)| *t)
            .collect()
    };

    // 0. Every fault really happened: a fault command that failed (no root
    //    for iptables, no worker got a job, ...) means that part of the run
    //    tested nothing, which must not pass silently.
    v.fail("faults that failed to run", fault_failed);

    // --- the cluster's final state ----------------------------------------
    let other_runs = all.iter().filter(|j| j.job_type == "chaos" && j.name != job_name).count();
    let jobs: BTreeMap<String, JobView> =
        all.into_iter().filter(|j| j.name == job_name).map(|j| (j.id.to_string(), j)).collect();

    // 1. Every acknowledged submit exists (and is the job we were told).
    let lost: Vec<String> = submits
        .iter()
        .filter(|(_, (o, _))| *o == Outcome::Ok)
        .filter(|(rid, (_, id))| id.and_then(|id| jobs.get(id)).is_none_or(|j| j.request_id.as_deref() != Some(**rid)))
        .map(|(rid, (_, id))| format!("requestId {rid} job {}", id.unwrap_or("?")))
        .collect();
    v.fail("lost acknowledged submits", lost);

    // 2. Every job comes from a recorded submit (ok or unknown), once.
    let mut by_rid: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut ghosts = Vec::new();
    let mut from_unknown = 0usize;
    for (id, j) in &jobs {
        let rid = j.request_id.as_deref().unwrap_or("");
        by_rid.entry(rid).or_default().push(id);
        match submits.get(rid) {
            Some((Outcome::Ok, _)) => {}
            Some((Outcome::Unknown, _)) => from_unknown += 1,
            _ => ghosts.push(format!("job {id} requestId {rid:?}")),
        }
    }
    v.fail("jobs without an ok/unknown submit", ghosts);
    let dups: Vec<String> =
        by_rid.iter().filter(|(_, ids)| ids.len() > 1).map(|(rid, ids)| format!("requestId {rid}: {ids:?}")).collect();
    v.fail("duplicate jobs for one requestId", dups);

    // 3. At most one token's successful completion is accepted per job, and it
    //    is the final token of a Completed job.
    let mut double = Vec::new();
    for id in completions.keys() {
        let tokens = accepted_success(id);
        if tokens.len() > 1 {
            double.push(format!("job {id} tokens {tokens:?}"));
        } else if let (Some(t), Some(j)) = (tokens.iter().next(), jobs.get(*id)) {
            if j.status != "Completed" || j.fencing_token != Some(*t) {
                double.push(format!(
                    "job {id}: accepted success with token {t}, final {} token {:?}",
                    j.status, j.fencing_token
                ));
            }
        }
    }
    v.fail("conflicting accepted completions", double);

    // 4. A rejected completion must have carried a stale token or come after
    //    the attempt ended otherwise: it is wrong only when the job was not
    //    acquired again and its final state still shows that token as the
    //    live (Running) or successful (Completed) attempt.
    let mut bad_reject = Vec::new();
    for (id, token, status, code) in &rejected {
        let reacquired = acquires.get(id).is_some_and(|a| a.iter().any(|(_, t)| t > token));
        let Some(j) = jobs.get(*id) else { continue }; // reported as lost / ghost
        if !reacquired && j.fencing_token == Some(*token) && matches!(j.status.as_str(), "Completed" | "Running") {
            bad_reject.push(format!("job {id} token {token} -> {status} {code:?} (final {})", j.status));
        }
    }
    v.fail("completions rejected while their token was current", bad_reject);

    // 5. attempt <= maxRetries + 1, in the final state and in every acquire.
    let mut over = Vec::new();
    for (id, j) in &jobs {
        let max_seen = acquires.get(id.as_str()).into_iter().flatten().map(|(a, _)| *a).max().unwrap_or(0);
        if j.attempt.max(max_seen) > j.max_retries + 1 {
            over.push(format!(
                "job {id} attempt {} (acquired up to {max_seen}), maxRetries {}",
                j.attempt, j.max_retries
            ));
        }
    }
    v.fail("attempts over maxRetries + 1", over);

    // 6. Every job is terminal after the drain.
    let mut status_counts: BTreeMap<&str, usize> = BTreeMap::new();
    for j in jobs.values() {
        *status_counts.entry(j.status.as_str()).or_default() += 1;
    }
    let open: Vec<String> = jobs
        .iter()
        .filter(|(_, j)| !matches!(j.status.as_str(), "Completed" | "Dead"))
        .map(|(id, j)| format!("job {id} {} attempt {}", j.status, j.attempt))
        .collect();
    v.fail("jobs not terminal", open);

    // 7. Legal transitions, as far as a client can see them. Each acquisition
    //    starts a new attempt with a new token (order by token, the attempt
    //    must rise too, and no token is handed out twice); Completed is
    //    terminal (no acquisition after an accepted success); a Completed job
    //    was completed by us with its final token; Dead only once attempts
    //    are used up; attempts never go back.
    let mut illegal = Vec::new();
    for (id, j) in &jobs {
        let mut acq = acquires.get(id.as_str()).cloned().unwrap_or_default();
        acq.sort_by_key(|(_, t)| *t);
        for w in acq.windows(2) {
            if w[1].1 == w[0].1 {
                illegal.push(format!("job {id}: token {} handed out twice", w[0].1));
            } else if w[1].0 <= w[0].0 {
                illegal.push(format!(
                    "job {id}: token {} at attempt {}, then token {} at attempt {}",
                    w[0].1, w[0].0, w[1].1, w[1].0
                ));
            }
        }
        let success = accepted_success(id);
        if let Some(t) = success.iter().min() {
            if let Some((_, later)) = acq.iter().find(|(_, tok)| tok > t) {
                illegal
                    .push(format!("job {id}: acquired with token {later} after success with token {t} was accepted"));
            }
        }
        if j.status == "Completed" {
            let ours = completions
                .get(id.as_str())
                .into_iter()
                .flatten()
                .any(|(t, s, st)| *s && Some(*t) == j.fencing_token && (*st == 0 || (200..300).contains(st)));
            if !ours {
                illegal.push(format!(
                    "job {id}: Completed with token {:?} that no report of ours completed",
                    j.fencing_token
                ));
            }
            let failed_same = completions
                .get(id.as_str())
                .into_iter()
                .flatten()
                .any(|(t, s, st)| !*s && Some(*t) == j.fencing_token && (200..300).contains(st));
            if failed_same {
                illegal.push(format!("job {id}: Completed with a token whose failure report was accepted"));
            }
        }
        if j.status == "Dead" && j.attempt != j.max_retries + 1 {
            illegal.push(format!("job {id}: Dead at attempt {} of {}", j.attempt, j.max_retries + 1));
        }
        if let Some((a, t)) = acq.last() {
            if j.attempt < *a {
                illegal.push(format!("job {id}: final attempt {} below acquired attempt {a} (token {t})", j.attempt));
            }
        }
    }
    v.fail("illegal transitions", illegal);

    // 8. Worker faults. A frozen worker's completions after it resumed must
    //    all be rejected: it was frozen for longer than the lease and the
    //    worker timeout, so every job it held was expired and its token is
    //    stale. And the property must have been exercised: when pauses with
    //    held jobs ran, at least one such stale completion was seen.
    let mut late_accepts = Vec::new();
    let (mut stale_seen, mut paused_jobs, mut abandoned) = (0usize, 0usize, 0usize);
    for (index, WorkerFaultRec { worker: w, kind, jobs: held }) in &worker_faults {
        match kind {
            WorkerFaultKind::Kill => abandoned += held.len(),
            WorkerFaultKind::Pause => {
                paused_jobs += held.len();
                let Some(resume) = resumes.get(index) else { continue };
                for e in events {
                    let Event::Complete { worker, invoke_ms, job_id, token, status, .. } = e else { continue };
                    if worker != w || invoke_ms < resume || !held.iter().any(|(j, t)| j == job_id && t == token) {
                        continue;
                    }
                    match status {
                        200..=299 => late_accepts.push(format!("job {job_id} token {token} after pause {index}")),
                        409 => stale_seen += 1,
                        _ => {}
                    }
                }
            }
        }
    }
    v.fail("completions accepted after a pause longer than the lease", late_accepts);
    if paused_jobs > 0 && stale_seen == 0 {
        v.fail(
            "stale completions not exercised",
            vec![format!("{paused_jobs} jobs held through worker pauses, no 409 seen on resume")],
        );
    }

    // 9. Replicas agree: equal digests at one applied index.
    let all_ok: Option<Vec<&DigestView>> = digests.iter().map(Option::as_ref).collect();
    let digest_line = match all_ok {
        Some(ds) if !ds.is_empty() && ds.iter().all(|d| d.applied_index == ds[0].applied_index) => {
            let line = format!(
                "applied index {:?}: {}",
                ds[0].applied_index,
                ds.iter()
                    .map(|d| format!("node {} {} ({} keys)", d.node_id, d.digest, d.keys))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if ds.iter().any(|d| d.digest != ds[0].digest) {
                v.fail("replica divergence", vec![line.clone()]);
            }
            line
        }
        _ => {
            let line = format!("no common applied index: {digests:?}");
            v.fail("replica digests not comparable", vec![line.clone()]);
            line
        }
    };

    // --- availability: the longest gap between acknowledged submits that
    // overlaps the fault's window: from its start until 5 s after its
    // command returned (so the disruption a restarted or healed node may
    // cause on rejoining counts too), cut at the next fault's start.
    // Client-observed, so it includes retry pauses and request timeouts, not
    // just the election.
    ok_returns.sort_unstable();
    let mut by_kind: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    // Catch-up after each fault (ms from its end until every node had
    // applied what the leader had then), and how many never caught up.
    let mut catch_up: BTreeMap<&str, (Vec<u64>, usize)> = BTreeMap::new();
    let mut fault_lines = Vec::new();
    for (k, FaultRec { index, t_ms: f, kind, leader, target, cmd }) in faults.iter().enumerate() {
        let next = faults.get(k + 1).map(|x| x.t_ms).unwrap_or(u64::MAX);
        let end = fault_ends.get(index).copied().unwrap_or(*f);
        let window_end = next.min(end + 5_000);
        let gap =
            ok_returns.windows(2).filter(|w| w[1] > *f && w[0] < window_end).map(|w| w[1] - w[0]).max().unwrap_or(0);
        by_kind.entry(*kind).or_default().push(gap);
        if let Some(&(at, caught_up)) = settled.get(index) {
            let entry = catch_up.entry(*kind).or_default();
            if caught_up {
                entry.0.push(at.saturating_sub(end));
            } else {
                entry.1 += 1;
            }
        }
        let hit_leader = target.is_some() && target == leader;
        if hit_leader {
            v.failover_gaps.push(gap);
        }
        fault_lines.push(format!(
            "  fault {k} at {:.1}s [{kind}]{}: longest submit gap {gap} ms ({cmd})",
            *f as f64 / 1000.0,
            if hit_leader { " (leader)" } else { "" }
        ));
    }

    let accepted_total: usize = completions.values().flatten().filter(|(_, _, st)| (200..300).contains(st)).count();
    let r = &mut v.report;
    r.extend(fault_lines);
    r.push(format!("history: {} events; submits ok={ok} failed={failed} unknown={unknown}", events.len()));
    r.push(format!(
        "workers: acquires={} completions accepted={accepted_total} rejected={} (409 stale after pause: {stale_seen}) unknown={complete_unknown}",
        acquires.values().map(Vec::len).sum::<usize>(),
        rejected.len()
    ));
    r.push(format!(
        "worker faults: {} kills abandoning {abandoned} jobs, {} pauses holding {paused_jobs} jobs",
        worker_faults.values().filter(|f| f.kind == WorkerFaultKind::Kill).count(),
        worker_faults.values().filter(|f| f.kind == WorkerFaultKind::Pause).count()
    ));
    r.push(format!(
        "cluster: {} jobs of this run {status_counts:?}; {from_unknown} from unknown submits; {other_runs} chaos jobs of other runs ignored",
        jobs.len()
    ));
    if let Some((d, rem)) = drain {
        r.push(format!("drain: {}", if d { "complete".to_string() } else { format!("timed out with {rem} open") }));
    }
    r.push(format!("digests: {digest_line}"));
    for (kind, gaps) in &by_kind {
        let (m, x) = median_max(gaps);
        r.push(format!("unavailability [{kind}]: median {m} ms, max {x} ms over {} faults", gaps.len()));
    }
    for (kind, (times, behind)) in &catch_up {
        let (m, x) = median_max(times);
        let behind = if *behind > 0 { format!("; {behind} never caught up") } else { String::new() };
        r.push(format!(
            "catch-up after [{kind}] (until every node applied the leader's log): median {m} ms, max {x} ms over {} faults{behind}",
            times.len()
        ));
    }
    let (m, x) = median_max(&v.failover_gaps);
    let met = m < TARGET_MEDIAN_MS && x < TARGET_MAX_MS;
    let n = v.failover_gaps.len();
    v.report.push(format!(
        "failover (single-node faults on the leader): median {m} ms, max {x} ms over {n} faults; target median < {TARGET_MEDIAN_MS} ms, max < {TARGET_MAX_MS} ms: {}",
        if n == 0 { "n/a" } else if met { "met" } else { "MISSED" }
    ));
    if n == 0 {
        v.report.pop();
        v.report.push("failover: no fault hit the leader".into());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    //! Deliberately broken histories: each must turn the verdict to FAIL,
    //! and the intact one must PASS, so no check is vacuous.

    use chrono::Utc;
    use uuid::Uuid;

    use super::*;

    const RUN: &str = "r1";

    fn start() -> Event {
        Event::Start {
            run_id: RUN.into(),
            wall_start: String::new(),
            coordinators: vec![],
            submitters: 1,
            workers: 1,
            after_seq: None,
        }
    }

    fn submit(rid: &str, job: Option<Uuid>, outcome: Outcome, t: u64) -> Event {
        Event::Submit {
            submitter: 0,
            request_id: rid.into(),
            invoke_ms: t,
            return_ms: t + 5,
            node: "n1".into(),
            tries: 1,
            job_id: job.map(|j| j.to_string()),
            outcome,
            status: Some(201),
            error: None,
        }
    }

    fn acquire(job: Uuid, attempt: u32, token: u64, t: u64) -> Event {
        Event::Acquire { worker: 0, t_ms: t, node: "n1".into(), job_id: job.to_string(), attempt, token }
    }

    fn complete(job: Uuid, token: u64, success: bool, status: u16, t: u64) -> Event {
        Event::Complete {
            worker: 0,
            invoke_ms: t,
            return_ms: t + 5,
            node: "n1".into(),
            job_id: job.to_string(),
            token,
            success,
            status,
            code: (status == 409).then(|| "stale_token".into()),
        }
    }

    fn job(id: Uuid, rid: &str, status: &str, attempt: u32, token: u64) -> JobView {
        let now = Utc::now();
        JobView {
            id,
            seq: 0,
            name: format!("chaos-{RUN}"),
            job_type: "chaos".into(),
            payload: serde_json::Value::Null,
            priority: 0,
            max_retries: 3,
            attempt,
            status: status.into(),
            worker_id: None,
            fencing_token: Some(token),
            lease_expires_at: None,
            run_at: now,
            timeout_seconds: None,
            created_at: now,
            started_at: Some(now),
            completed_at: Some(now),
            updated_at: now,
            last_error: None,
            result: None,
            request_id: Some(rid.into()),
        }
    }

    fn digest(node: u64, index: u64, d: &str) -> Option<DigestView> {
        Some(DigestView { node_id: node, applied_index: Some(index), digest: d.into(), keys: 10 })
    }

    /// A healthy history: two jobs, one retried after a planned failure, one
    /// held through a worker pause and re-run by another attempt.
    struct World {
        events: Vec<Event>,
        jobs: Vec<JobView>,
        digests: Vec<Option<DigestView>>,
        a: Uuid,
        b: Uuid,
    }

    fn world() -> World {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let events = vec![
            start(),
            submit("ra", Some(a), Outcome::Ok, 10),
            submit("rb", Some(b), Outcome::Ok, 20),
            acquire(a, 1, 100, 30),
            complete(a, 100, false, 200, 40),
            acquire(a, 2, 105, 50),
            complete(a, 105, true, 200, 60),
            acquire(b, 1, 101, 70),
            Event::FaultStart {
                index: 0,
                t_ms: 70,
                kind: "worker-pause".into(),
                leader: Some(1),
                target: None,
                cmd: "@worker-pause 8".into(),
            },
            Event::WorkerFault {
                index: 0,
                t_ms: 71,
                worker: 0,
                kind: WorkerFaultKind::Pause,
                frozen_ms: 8000,
                jobs: vec![(b.to_string(), 101)],
            },
            acquire(b, 2, 110, 5000),
            complete(b, 110, true, 200, 5100),
            Event::WorkerResume { index: 0, t_ms: 8100, worker: 0 },
            complete(b, 101, true, 409, 8200),
            Event::DrainEnd { t_ms: 9000, drained: true, remaining: 0 },
        ];
        let jobs = vec![job(a, "ra", "Completed", 2, 105), job(b, "rb", "Completed", 2, 110)];
        let digests = vec![digest(1, 50, "x"), digest(2, 50, "x"), digest(3, 50, "x")];
        World { events, jobs, digests, a, b }
    }

    fn verdict(w: &World) -> Verdict {
        judge(&w.events, w.jobs.clone(), &w.digests).unwrap()
    }

    fn assert_fails(w: &World, what: &str) {
        let v = verdict(w);
        assert!(!v.pass(), "expected FAIL ({what}), got PASS");
        assert!(v.failures.iter().any(|f| f.starts_with(what)), "expected a {what:?} failure, got {:?}", v.failures);
    }

    #[test]
    fn intact_history_passes() {
        let v = verdict(&world());
        assert!(v.pass(), "{:?}", v.failures);
    }

    #[test]
    fn failed_fault_command_fails() {
        let mut w = world();
        w.events.insert(14, Event::FaultEnd { index: 0, t_ms: 8100, exit_code: Some(1) });
        assert_fails(&w, "faults that failed to run");
        let mut w = world();
        w.events.insert(14, Event::FaultEnd { index: 0, t_ms: 8100, exit_code: Some(0) });
        assert!(verdict(&w).pass());
    }

    #[test]
    fn lost_acknowledged_submit_fails() {
        let mut w = world();
        w.jobs.retain(|j| j.id != w.b);
        assert_fails(&w, "lost acknowledged submits");
    }

    #[test]
    fn job_from_nowhere_fails() {
        let mut w = world();
        w.jobs.push(job(Uuid::new_v4(), "never-sent", "Dead", 4, 7));
        assert_fails(&w, "jobs without an ok/unknown submit");
        // A failed (definitely rejected) submit must not have created a job either.
        let mut w = world();
        let c = Uuid::new_v4();
        w.events.insert(1, submit("rc", None, Outcome::Failed, 5));
        w.jobs.push(job(c, "rc", "Dead", 4, 7));
        assert_fails(&w, "jobs without an ok/unknown submit");
    }

    #[test]
    fn job_from_unknown_submit_is_allowed() {
        let mut w = world();
        let c = Uuid::new_v4();
        w.events.insert(1, submit("rc", None, Outcome::Unknown, 5));
        w.events.insert(2, acquire(c, 1, 120, 6));
        w.events.insert(3, complete(c, 120, true, 200, 7));
        w.jobs.push(job(c, "rc", "Completed", 1, 120));
        assert!(verdict(&w).pass(), "{:?}", verdict(&w).failures);
    }

    #[test]
    fn double_accepted_completion_fails() {
        // Job a's first attempt (token 100) "succeeds" too: two accepted
        // successes with different (attempt, token).
        let mut w = world();
        let a = w.a;
        w.events.push(complete(a, 100, true, 200, 45));
        assert_fails(&w, "conflicting accepted completions");
    }

    #[test]
    fn attempts_over_the_bound_fail() {
        let mut w = world();
        let a = w.a;
        w.events.push(acquire(a, 5, 200, 7000));
        w.jobs[0].attempt = 5;
        assert_fails(&w, "attempts over maxRetries + 1");
    }

    #[test]
    fn non_terminal_after_drain_fails() {
        let mut w = world();
        w.jobs[1].status = "Running".into();
        assert_fails(&w, "jobs not terminal");
    }

    #[test]
    fn unequal_digests_fail() {
        let mut w = world();
        w.digests[2] = digest(3, 50, "y");
        assert_fails(&w, "replica divergence");
        let mut w = world();
        w.digests[2] = digest(3, 49, "x");
        assert_fails(&w, "replica digests not comparable");
        let mut w = world();
        w.digests[1] = None;
        assert_fails(&w, "replica digests not comparable");
    }

    #[test]
    fn reacquired_completed_job_is_illegal() {
        let mut w = world();
        let a = w.a;
        w.events.push(acquire(a, 3, 130, 7000));
        w.jobs[0].attempt = 3;
        assert_fails(&w, "illegal transitions");
    }

    #[test]
    fn token_handed_out_twice_is_illegal() {
        let mut w = world();
        let a = w.a;
        w.events.push(acquire(a, 2, 105, 55));
        assert_fails(&w, "illegal transitions");
    }

    #[test]
    fn early_dead_is_illegal() {
        let mut w = world();
        w.jobs[0].status = "Dead".into();
        w.events.retain(|e| !matches!(e, Event::Complete { token: 105, .. }));
        assert_fails(&w, "illegal transitions");
    }

    #[test]
    fn completed_without_our_report_is_illegal() {
        let mut w = world();
        w.events.retain(|e| !matches!(e, Event::Complete { token: 110, .. }));
        assert_fails(&w, "illegal transitions");
    }

    #[test]
    fn completion_accepted_after_pause_fails() {
        let mut w = world();
        for e in &mut w.events {
            if let Event::Complete { token: 101, status, .. } = e {
                *status = 200;
            }
        }
        assert_fails(&w, "completions accepted after a pause longer than the lease");
    }

    #[test]
    fn pause_without_any_stale_rejection_fails() {
        let mut w = world();
        w.events.retain(|e| !matches!(e, Event::Complete { token: 101, .. }));
        assert_fails(&w, "stale completions not exercised");
    }

    #[test]
    fn rejection_of_the_current_token_fails() {
        // b's second attempt (token 110) is the final, Completed one; a 409
        // for it means the server refused a valid completion.
        let mut w = world();
        let b = w.b;
        w.events.push(complete(b, 110, true, 409, 5150));
        assert_fails(&w, "completions rejected while their token was current");
    }

    #[test]
    fn failover_figures_only_count_leader_faults() {
        let mut w = world();
        w.events.insert(
            3,
            Event::FaultStart {
                index: 1,
                t_ms: 12,
                kind: "leader-kill".into(),
                leader: Some(2),
                target: Some(2),
                cmd: "kill 2".into(),
            },
        );
        let v = verdict(&w);
        assert!(v.pass(), "{:?}", v.failures);
        assert_eq!(v.failover_gaps, vec![10]);
    }
}
