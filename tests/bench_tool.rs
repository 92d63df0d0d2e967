//! `jobsched-bench` against a real 3-node cluster: every mode the benchmark
//! script uses runs briefly (small sizes, debug build), and what the tool
//! reports is checked against what the cluster then holds. A load generator
//! that miscounts (jobs it says were submitted that the cluster never got,
//! completions it counts twice, a preload that stops short) would make every
//! figure in docs/benchmarks.md wrong without anything failing; this is the
//! test that would notice. `etcd-put` needs an etcd and is left to
//! `scripts/bench.sh`; `failover` kills nodes through shell commands, which
//! `tests/failover.rs` covers for the cluster itself.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use common::{bin, Cluster, Opts};
use serde_json::Value;

/// Run the tool with `--json` against the cluster and return its figures.
fn bench(c: &Cluster, args: &[&str]) -> Value {
    let urls: Vec<String> = c.running().into_iter().map(|id| c.url(id)).collect();
    let out = Command::new(bin("jobsched-bench"))
        .arg("--json")
        .arg("--coordinators")
        .arg(urls.join(","))
        .args(args)
        .output()
        .expect("run jobsched-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "jobsched-bench {args:?} failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON line in {stdout}"));
    serde_json::from_str(line).expect("the JSON line parses")
}

/// Every job the cluster holds, read page by page through the list API
/// (linearizable reads): (type, status) -> count.
async fn job_counts(c: &Cluster) -> BTreeMap<(String, String), u64> {
    let mut counts = BTreeMap::new();
    let mut cursor = String::new();
    loop {
        let (st, page) = c.get(1, &format!("/api/jobs?limit=1000&cursor={cursor}")).await;
        assert_eq!(st, 200, "list jobs: {page}");
        for j in page["jobs"].as_array().expect("jobs array") {
            let key = (j["type"].as_str().unwrap_or("?").to_string(), j["status"].as_str().unwrap_or("?").to_string());
            *counts.entry(key).or_insert(0) += 1;
        }
        match page["nextCursor"].as_str() {
            Some(next) => cursor = next.to_string(),
            None => return counts,
        }
    }
}

fn count(counts: &BTreeMap<(String, String), u64>, job_type: &str, status: &str) -> u64 {
    counts.get(&(job_type.to_string(), status.to_string())).copied().unwrap_or(0)
}

fn num(v: &Value, field: &str) -> f64 {
    v[field].as_f64().unwrap_or_else(|| panic!("{field} missing in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_reports_what_the_cluster_did() {
    let c = Cluster::start(Opts::default()).await;

    // submit, one job per request, a fixed number of requests: each one is
    // a job in the cluster, nothing more, nothing less.
    let s = bench(&c, &["submit", "-c", "6", "--total", "300"]);
    assert_eq!((num(&s, "ok"), num(&s, "errors"), num(&s, "items")), (300.0, 0.0, 300.0), "{s}");
    assert!(num(&s, "perSecond") > 0.0 && num(&s, "p50Ms") > 0.0 && num(&s, "p99Ms") >= num(&s, "p50Ms"), "{s}");
    let counts = job_counts(&c).await;
    assert_eq!(count(&counts, "bench", "Pending"), 300, "{counts:?}");

    // submit through the batch endpoint: requests and items counted apart.
    let s = bench(&c, &["submit", "-c", "3", "--total", "20", "--batch", "10"]);
    assert_eq!((num(&s, "ok"), num(&s, "items"), num(&s, "errors")), (20.0, 200.0, 0.0), "{s}");
    // Every connection on one node (the placement runs' --node).
    let s = bench(&c, &["submit", "-c", "2", "--total", "40", "--node", "2"]);
    assert_eq!((num(&s, "ok"), num(&s, "errors")), (40.0, 0.0), "{s}");
    let counts = job_counts(&c).await;
    assert_eq!(count(&counts, "bench", "Pending"), 540, "{counts:?}");

    // preload --finish: the retained history of the scale run, all of it
    // submitted, acquired and completed.
    let p = bench(&c, &["preload", "-n", "250", "--batch", "100", "--job-type", "history", "--finish"]);
    assert_eq!((num(&p, "items"), num(&p, "finished")), (250.0, 250.0), "{p}");
    let counts = job_counts(&c).await;
    assert_eq!(count(&counts, "history", "Completed"), 250, "{counts:?}");
    assert_eq!(counts.keys().filter(|(t, _)| t == "history").count(), 1, "{counts:?}");

    // acquire over a preloaded pool until it runs out: the jobs it counts
    // are the pool, each acquired once and (with --complete) completed. One
    // worker: with several, a call still in flight when another finds the
    // queue empty ends after the window closed and is not counted.
    let p = bench(&c, &["preload", "-n", "120", "--batch", "50", "--job-type", "pool"]);
    assert_eq!(num(&p, "items"), 120.0, "{p}");
    let a = bench(&c, &["acquire", "-c", "1", "--max-jobs", "7", "--job-type", "pool", "--complete", "-d", "60"]);
    assert_eq!(a["exhausted"], Value::Bool(true), "the pool of 120 ran out well within 60 s: {a}");
    assert_eq!((num(&a, "items"), num(&a, "errors")), (120.0, 0.0), "{a}");
    let counts = job_counts(&c).await;
    assert_eq!(count(&counts, "pool", "Completed"), 120, "{counts:?}");

    // e2e: submitters and HTTP workers. Its figures count only the measured
    // window (after a 1 s warm-up), so the cluster holds at least as many
    // completed jobs of the run's type (a fresh `e2e-<uuid>` per run) as
    // the tool reports.
    let e = bench(&c, &["e2e", "-c", "4", "--workers", "2", "--slots", "3", "-d", "2"]);
    let completed_in_window = num(&e, "completedPerSecond") * num(&e, "seconds");
    assert!(completed_in_window >= 1.0, "e2e completed nothing: {e}");
    assert!(num(&e, "acquireCallsPerJob") > 0.0 && num(&e, "reportCallsPerJob") > 0.0, "{e}");
    let counts = job_counts(&c).await;
    let e2e_types: BTreeSet<&String> = counts.keys().map(|(t, _)| t).filter(|t| t.starts_with("e2e-")).collect();
    assert_eq!(e2e_types.len(), 1, "one job type per e2e run: {counts:?}");
    let e2e_type = e2e_types.into_iter().next().expect("one type");
    let completed_in_cluster = count(&counts, e2e_type, "Completed");
    assert!(
        completed_in_cluster as f64 + 0.5 >= completed_in_window,
        "the tool counted {completed_in_window:.0} completions, the cluster holds {completed_in_cluster}: {e}"
    );

    // pickup: an idle long-polling worker gets each submitted job.
    let k = bench(&c, &["pickup", "-n", "5"]);
    assert_eq!(num(&k, "samples"), 5.0, "{k}");
    assert!(num(&k, "fromAckP50Ms") >= 0.0 && num(&k, "fromSendP50Ms") >= num(&k, "fromAckP50Ms"), "{k}");
    let counts = job_counts(&c).await;
    let picked: u64 =
        counts.iter().filter(|((t, s), _)| t.starts_with("pickup-") && s == "Completed").map(|(_, n)| n).sum();
    assert_eq!(picked, 5, "{counts:?}");

    c.assert_digests_equal().await;
}
