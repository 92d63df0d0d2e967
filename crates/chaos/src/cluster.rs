//! Views of the cluster through the public API: who leads, the job list
//! (paginated, optionally from a run's start marker), and the per-node state
//! digests; plus the one write outside the workload, the start marker. Shared by the
//! fault loop and the drain in `run` and by `check`.

use std::time::Duration;

use anyhow::{bail, Result};
use jobsched_api::{ClusterView, DigestView, JobList, JobView};

/// The current leader: among the nodes that answer and say `role=Leader`,
/// the one with the highest term (a paused or partitioned old leader may
/// still believe it leads, at a lower term).
pub async fn leader(http: &reqwest::Client, nodes: &[String]) -> Option<u64> {
    let mut best: Option<(u64, u64)> = None;
    for n in nodes {
        let Ok(r) = http.get(format!("{n}/api/cluster")).timeout(Duration::from_secs(1)).send().await else {
            continue;
        };
        let Ok(c) = r.json::<ClusterView>().await else { continue };
        if c.role == "Leader" && best.is_none_or(|(t, _)| c.term > t) {
            best = Some((c.term, c.node_id));
        }
    }
    best.map(|(_, id)| id)
}

/// Every job submitted after the job with seq `after` (all jobs for
/// `None`), in submission order, following `nextCursor`. Tries the nodes in
/// turn so one dead node does not stop the read.
pub async fn jobs_after(http: &reqwest::Client, nodes: &[String], after: Option<u64>) -> Result<Vec<JobView>> {
    jobs_from_any(http, nodes, None, after).await
}

/// Submits a marker job and cancels it again; returns its `seq`. Every job
/// submitted after this returns gets a greater seq (seqs are assigned in log
/// order when the entry is applied, and the marker was applied before the
/// submit was acknowledged), so the checker can list a run's jobs from here
/// instead of paging through the millions that earlier runs left. `None`
/// when no node took the marker within `wait` (the checker then lists all).
pub async fn mark_start(http: &reqwest::Client, nodes: &[String], name: &str, wait: Duration) -> Option<u64> {
    let body = serde_json::json!({
        "name": name, "type": "chaos-marker", "maxRetries": 0,
        "requestId": format!("{name}-{}", uuid::Uuid::new_v4()),
    });
    let end = std::time::Instant::now() + wait;
    while std::time::Instant::now() < end {
        for n in nodes {
            let Ok(r) = http.post(format!("{n}/api/jobs")).json(&body).timeout(Duration::from_secs(5)).send().await
            else {
                continue;
            };
            let Ok(job) = r.error_for_status().map(|r| r.json::<JobView>()) else { continue };
            let Ok(job) = job.await else { continue };
            // Nobody acquires its type; cancelled so no Pending job is left
            // behind. Best effort: a leftover marker is harmless.
            for m in nodes {
                let url = format!("{m}/api/jobs/{}/cancel", job.id);
                if http.post(url).timeout(Duration::from_secs(5)).send().await.is_ok_and(|r| r.status().is_success()) {
                    break;
                }
            }
            return Some(job.seq);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// The jobs that are not finished (Pending, Running or Failed awaiting a
/// retry), by the status index: cheap however many finished jobs the
/// cluster retains (a soak leaves millions).
pub async fn open_jobs(http: &reqwest::Client, nodes: &[String]) -> Result<Vec<JobView>> {
    let mut open = Vec::new();
    for status in ["Pending", "Running", "Failed"] {
        open.extend(jobs_from_any(http, nodes, Some(status), None).await?);
    }
    Ok(open)
}

/// The job list (optionally one status, optionally after a seq) from the
/// first node that answers it completely.
async fn jobs_from_any(
    http: &reqwest::Client,
    nodes: &[String],
    status: Option<&str>,
    after: Option<u64>,
) -> Result<Vec<JobView>> {
    let mut last_err = None;
    for n in nodes {
        match jobs_from(http, n, status, after.map(|s| s.to_string())).await {
            Ok(j) => return Ok(j),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no coordinators given")))
}

async fn jobs_from(
    http: &reqwest::Client,
    node: &str,
    status: Option<&str>,
    mut cursor: Option<String>,
) -> Result<Vec<JobView>> {
    let mut jobs = Vec::new();
    loop {
        let mut req = http.get(format!("{node}/api/jobs")).query(&[("limit", "1000")]);
        if let Some(s) = status {
            req = req.query(&[("status", s)]);
        }
        if let Some(c) = &cursor {
            req = req.query(&[("cursor", c.as_str())]);
        }
        let r = req.timeout(Duration::from_secs(10)).send().await?;
        if !r.status().is_success() {
            bail!("{node}: GET /api/jobs answered {}", r.status());
        }
        let page: JobList = r.json().await?;
        jobs.extend(page.jobs);
        match page.next_cursor {
            Some(c) if !c.is_empty() => cursor = Some(c),
            _ => return Ok(jobs),
        }
    }
}

/// One digest per node; `None` for a node that did not answer.
pub async fn digests(http: &reqwest::Client, nodes: &[String]) -> Vec<Option<DigestView>> {
    let mut out = Vec::new();
    for n in nodes {
        let d = match http.get(format!("{n}/api/debug/digest")).timeout(Duration::from_secs(5)).send().await {
            Ok(r) if r.status().is_success() => r.json::<DigestView>().await.ok(),
            _ => None,
        };
        out.push(d);
    }
    out
}
