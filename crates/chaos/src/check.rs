//! `check`: judges a history against the cluster's final state. It owns the
//! safety properties (no lost acknowledged job, no job from nowhere, fenced
//! completions, bounded attempts, everything terminal after the drain,
//! replicas agreeing) and the availability figure (longest gap between
//! acknowledged submits around each fault).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::cluster;
use crate::history::{self, Event, Outcome};

/// Prints the verdict and returns whether it passed.
pub async fn check(nodes: &[String], path: &Path, digest_wait: f64) -> Result<bool> {
    let events = history::read(path)?;
    let Some(Event::Start { run_id, .. }) = events.first() else { bail!("history does not begin with a start record") };
    let job_name = format!("chaos-{run_id}");
    let http = reqwest::Client::builder().build()?;
    let mut failures: Vec<String> = Vec::new();
    // Print at most this many examples per kind of failure.
    const EXAMPLES: usize = 5;
    let mut fail = |kind: &str, n: usize, examples: Vec<String>| {
        if n > 0 {
            failures.push(format!(
                "{kind}: {n} (e.g. {})",
                examples.into_iter().take(EXAMPLES).collect::<Vec<_>>().join("; ")
            ));
        }
    };

    // --- what the history says -------------------------------------------
    let mut submits: HashMap<&str, (Outcome, Option<&str>)> = HashMap::new();
    let (mut ok, mut failed, mut unknown) = (0usize, 0usize, 0usize);
    let mut acquires: HashMap<&str, Vec<(u32, u64)>> = HashMap::new();
    let mut accepted: HashMap<&str, Vec<(u64, bool)>> = HashMap::new();
    let mut rejected: Vec<(&str, u64, u16, Option<&str>)> = Vec::new();
    let mut complete_unknown = 0usize;
    let mut ok_returns: Vec<u64> = Vec::new();
    let mut faults: Vec<(u64, &str)> = Vec::new();
    let mut drain: Option<(bool, usize)> = None;
    for e in &events {
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
            Event::Complete { job_id, token, success, status, code, .. } => match status {
                200..=299 => accepted.entry(job_id).or_default().push((*token, *success)),
                0 => complete_unknown += 1,
                _ => rejected.push((job_id, *token, *status, code.as_deref())),
            },
            Event::FaultStart { t_ms, cmd, .. } => faults.push((*t_ms, cmd)),
            Event::DrainEnd { drained, remaining, .. } => drain = Some((*drained, *remaining)),
            _ => {}
        }
    }

    // --- the cluster's final state ----------------------------------------
    let all = cluster::all_jobs(&http, nodes).await?;
    let other_runs = all.iter().filter(|j| j.job_type == "chaos" && j.name != job_name).count();
    let jobs: BTreeMap<String, _> =
        all.into_iter().filter(|j| j.name == job_name).map(|j| (j.id.to_string(), j)).collect();

    // 1. Every acknowledged submit exists (and is the job we were told).
    let lost: Vec<String> = submits
        .iter()
        .filter(|(_, (o, _))| *o == Outcome::Ok)
        .filter(|(rid, (_, id))| id.and_then(|id| jobs.get(id)).is_none_or(|j| j.request_id.as_deref() != Some(**rid)))
        .map(|(rid, (_, id))| format!("requestId {rid} job {}", id.unwrap_or("?")))
        .collect();
    fail("lost acknowledged submits", lost.len(), lost);

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
    fail("jobs without an ok/unknown submit", ghosts.len(), ghosts);
    let dups: Vec<String> =
        by_rid.iter().filter(|(_, v)| v.len() > 1).map(|(rid, v)| format!("requestId {rid}: {v:?}")).collect();
    fail("duplicate jobs for one requestId", dups.len(), dups);

    // 3. At most one token's successful completion is accepted per job, and it
    //    is the final token of a Completed job.
    let mut double = Vec::new();
    for (id, acc) in &accepted {
        let tokens: HashSet<u64> = acc.iter().filter(|(_, s)| *s).map(|(t, _)| *t).collect();
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
    fail("conflicting accepted completions", double.len(), double);

    // 4. Rejected completions carried a stale token: the job was acquired
    //    again with a newer token, or its final token differs.
    let mut bad_reject = Vec::new();
    for (id, token, status, code) in &rejected {
        let reacquired = acquires.get(id).is_some_and(|a| a.iter().any(|(_, t)| t > token));
        let final_differs = jobs.get(*id).is_some_and(|j| j.fencing_token != Some(*token));
        if !(reacquired || final_differs) {
            let final_status = jobs.get(*id).map(|j| j.status.as_str()).unwrap_or("missing");
            bad_reject.push(format!("job {id} token {token} -> {status} {code:?} (final {final_status})"));
        }
    }
    fail("completions rejected with the current token", bad_reject.len(), bad_reject);

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
    fail("attempts over maxRetries + 1", over.len(), over);

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
    fail("jobs not terminal", open.len(), open);

    // 7. Replicas agree: equal digests at one applied index. Writes may still
    //    be in flight (the local worker, leader monitors), so poll until all
    //    nodes report the same index; equal index with unequal digest is a
    //    divergence at once.
    let end = Instant::now() + Duration::from_secs_f64(digest_wait);
    let digest_line = loop {
        let ds = cluster::digests(&http, nodes).await;
        let all_ok: Option<Vec<_>> = ds.into_iter().collect();
        if let Some(ds) = &all_ok {
            let idx: HashSet<_> = ds.iter().map(|d| d.applied_index).collect();
            if idx.len() == 1 {
                let digests: HashSet<_> = ds.iter().map(|d| d.digest.as_str()).collect();
                let line = format!(
                    "applied index {:?}: {}",
                    ds[0].applied_index,
                    ds.iter()
                        .map(|d| format!("node {} {} ({} keys)", d.node_id, d.digest, d.keys))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                if digests.len() != 1 {
                    fail("replica divergence", 1, vec![line.clone()]);
                }
                break line;
            }
        }
        if Instant::now() >= end {
            let line = format!("no common applied index within {digest_wait} s: {all_ok:?}");
            fail("replica digests not comparable", 1, vec![line.clone()]);
            break line;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // --- availability: the longest gap between acknowledged submits that
    // overlaps the window after each fault start (until the next fault, at
    // most 10 s). Client-observed, so it includes retry pauses and request
    // timeouts, not just the election.
    ok_returns.sort_unstable();
    let mut gaps = Vec::new();
    for (k, (f, cmd)) in faults.iter().enumerate() {
        let next = faults.get(k + 1).map(|(t, _)| *t).unwrap_or(u64::MAX);
        let window_end = next.min(f + 10_000);
        let gap =
            ok_returns.windows(2).filter(|w| w[1] > *f && w[0] < window_end).map(|w| w[1] - w[0]).max().unwrap_or(0);
        gaps.push(gap);
        println!("fault {k} at {:.1}s ({cmd}): longest submit gap {gap} ms", *f as f64 / 1000.0);
    }
    let mut sorted = gaps.clone();
    sorted.sort_unstable();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    let max = sorted.last().copied().unwrap_or(0);

    let accepted_total: usize = accepted.values().map(Vec::len).sum();
    println!("history: {} events; submits ok={ok} failed={failed} unknown={unknown}", events.len());
    println!(
        "workers: acquires={} completions accepted={accepted_total} rejected={} unknown={complete_unknown}",
        acquires.values().map(Vec::len).sum::<usize>(),
        rejected.len()
    );
    println!(
        "cluster: {} jobs of this run {status_counts:?}; {from_unknown} from unknown submits; {other_runs} chaos jobs of other runs ignored",
        jobs.len()
    );
    if let Some((d, r)) = drain {
        println!("drain: {}", if d { "complete".to_string() } else { format!("timed out with {r} open") });
    }
    println!("digests: {digest_line}");
    println!("write unavailability per fault: median {median} ms, max {max} ms over {} faults", gaps.len());
    if failures.is_empty() {
        println!("VERDICT: PASS");
        Ok(true)
    } else {
        for f in &failures {
            println!("  FAIL {f}");
        }
        println!("VERDICT: FAIL");
        Ok(false)
    }
}
