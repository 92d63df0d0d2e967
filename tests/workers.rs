//! Workers against a real 3-node cluster: `jobsched-worker` processes (and
//! the Python example worker) run jobs while the tests kill, pause and stop
//! workers and coordinator nodes. What is checked comes from the cluster's
//! API, from side effects the jobs leave in files, from `/proc`, and from the
//! workers' JSON logs.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{event_job_id, eventually, Cluster, Opts, WorkerOpts, WorkerProc};
use serde_json::{json, Value};

// ----- helpers ---------------------------------------------------------------

/// The job as the first running node that answers 200 sees it
/// (linearizable read).
async fn try_job(c: &Cluster, id: &str) -> Option<Value> {
    for node in c.running() {
        let r = c.http.get(format!("{}/api/jobs/{id}", c.url(node))).timeout(Duration::from_secs(5)).send().await;
        if let Ok(r) = r {
            if r.status().as_u16() == 200 {
                if let Ok(v) = r.json::<Value>().await {
                    return Some(v);
                }
            }
        }
    }
    None
}

async fn job(c: &Cluster, id: &str) -> Value {
    eventually(Duration::from_secs(20), &format!("a read of job {id}"), || try_job(c, id)).await
}

/// Poll job `id` until `pred` holds.
async fn wait_job(c: &Cluster, id: &str, what: &str, max: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let pred = &pred;
    eventually(max, &format!("job {id}: {what}"), move || async move { try_job(c, id).await.filter(|j| pred(j)) }).await
}

/// Every job in the cluster by id (one list call; tests stay below 1000).
async fn all_jobs(c: &Cluster, status: Option<&str>) -> Option<BTreeMap<String, Value>> {
    let query = status.map(|s| format!("&status={s}")).unwrap_or_default();
    let v = c.get_any(&format!("/api/jobs?limit=1000{query}")).await?;
    let jobs = v["jobs"].as_array()?;
    assert!(v["nextCursor"].is_null(), "more than 1000 jobs");
    Some(jobs.iter().map(|j| (j["id"].as_str().unwrap_or("").to_owned(), j.clone())).collect())
}

/// Wait until every job in the cluster is Completed or Dead.
async fn wait_all_finished(c: &Cluster, max: Duration) -> BTreeMap<String, Value> {
    eventually(max, "every job Completed or Dead", || async {
        let jobs = all_jobs(c, None).await?;
        jobs.values().all(|j| j["status"] == "Completed" || j["status"] == "Dead").then_some(jobs)
    })
    .await
}

/// `GET /api/workers?status=..` from the first node that answers.
async fn workers(c: &Cluster, status: &str) -> Option<Vec<Value>> {
    c.get_any(&format!("/api/workers?status={status}")).await?["workers"].as_array().cloned()
}

/// The worker with this id in the `status` listing, once it is there.
async fn wait_listed(c: &Cluster, id: &str, status: &str) -> Value {
    eventually(Duration::from_secs(30), &format!("worker {id} listed as {status}"), || async {
        workers(c, status).await?.into_iter().find(|w| w["id"] == id)
    })
    .await
}

async fn is_listed(c: &Cluster, id: &str, status: &str) -> bool {
    let ws = eventually(Duration::from_secs(20), "a worker listing", || workers(c, status)).await;
    ws.iter().any(|w| w["id"] == id)
}

fn id_of(job: &Value) -> String {
    job["id"].as_str().expect("job id").to_owned()
}

/// Milliseconds since the epoch of an RFC 3339 time (job fields).
fn ms(v: &Value) -> i64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    chrono::DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("bad time {s}: {e}")).timestamp_millis()
}

/// Microseconds since the epoch of a log event.
fn event_us(e: &Value) -> i64 {
    let s = e["timestamp"].as_str().unwrap_or_else(|| panic!("event without timestamp: {e}"));
    chrono::DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("bad time {s}: {e}")).timestamp_micros()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A field of the `job` span an event was logged in.
fn job_span_field<'a>(e: &'a Value, field: &str) -> &'a Value {
    e["spans"]
        .as_array()
        .and_then(|spans| spans.iter().find(|s| s["name"] == "job"))
        .map_or(&Value::Null, |s| &s[field])
}

/// How many events with `message` each job's span has in a worker's log.
fn count_by_job(w: &WorkerProc, message: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for e in w.events() {
        if e["message"] == message {
            if let Some(id) = event_job_id(&e) {
                *out.entry(id.to_owned()).or_default() += 1;
            }
        }
    }
    out
}

/// The events with `message` in job `job_id`'s span, once there are at
/// least `n` (a worker logs a report after the cluster answered it, so the
/// line may lag behind what the API already shows).
async fn wait_job_events(w: &WorkerProc, job_id: &str, message: &str, n: usize) -> Vec<Value> {
    eventually(
        Duration::from_secs(10),
        &format!("{n} {message:?} events of job {job_id} in {}'s log", w.name),
        || async {
            let events = w.job_events(job_id, message);
            (events.len() >= n).then_some(events)
        },
    )
    .await
}

/// Payload of a `shell` job running `command` under `sh -c` with `$1..`.
fn sh(command: &str, args: &[&str]) -> Value {
    json!({"shell": true, "command": command, "args": args})
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// The pid a job wrote into `file` (waits for the complete line).
async fn read_pid(file: &Path) -> i32 {
    eventually(Duration::from_secs(20), &format!("a pid in {}", file.display()), || async {
        let s = std::fs::read_to_string(file).ok()?;
        if !s.ends_with('\n') {
            return None;
        }
        s.trim().parse().ok()
    })
    .await
}

/// The command name and state of a live (not zombie) process.
fn process(pid: i32) -> Option<(String, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "<pid> (<comm>) <state> ..."
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let state = stat[close + 1..].trim_start().chars().next()?;
    (!matches!(state, 'Z' | 'X')).then(|| (stat[open + 1..close].to_owned(), state))
}

/// Is `pid` still one of a shell job's processes (`sh` before it execs,
/// then `sleep`)? The names guard against the pid being reused by another
/// program; a zombie counts as gone.
fn job_process_alive(pid: i32) -> bool {
    process(pid).is_some_and(|(comm, _)| comm == "sh" || comm == "sleep")
}

/// Wait until `pid` runs `sleep` (the job's shell has exec'd it).
async fn wait_sleeping(pid: i32) {
    eventually(Duration::from_secs(20), &format!("process {pid} running sleep"), || async {
        process(pid).is_some_and(|(comm, _)| comm == "sleep").then_some(())
    })
    .await;
}

/// POST a completion with `token` for job `id` and return (status, body).
async fn complete_with(c: &Cluster, id: &str, token: u64) -> (u16, Value) {
    let node = c.running()[0];
    c.post(
        node,
        &format!("/api/jobs/{id}/complete"),
        json!({"fencingToken": token, "success": true, "result": {"late": true}}),
    )
    .await
}

// ----- tests -------------------------------------------------------------------

/// Steps: start 3 nodes and 2 worker processes (capacity 4, types echo and
/// shell); both are listed by GET /api/workers with their name, capacity and
/// types; submit 60 shell jobs through all three nodes, each running
/// `echo <tag> >> runs.txt`; wait until every job is finished; then each is
/// Completed as attempt 1 with exit code 0, its tag is in runs.txt exactly
/// once, and the two workers' logs hold exactly one accepted report for it,
/// carrying the job's fencing token; SIGTERM both workers: exit 0, no longer
/// listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_cluster_runs_each_job_exactly_once() {
    let c = Cluster::start(Opts::default()).await;
    let base = WorkerOpts::new("w1").job_types(&["echo", "shell"]).capacity(4);
    let mut w1 = c.spawn_worker(&base);
    let mut w2 = c.spawn_worker(&WorkerOpts { name: "w2".into(), ..base.clone() });
    for w in [&w1, &w2] {
        let listed = wait_listed(&c, &w.id, "active").await;
        assert_eq!(listed["name"], w.name.as_str(), "{listed}");
        assert_eq!(listed["capacity"], 4, "{listed}");
        assert_eq!(listed["jobTypes"], json!(["echo", "shell"]), "{listed}");
        assert_eq!(listed["status"], "Active", "{listed}");
    }

    const N: usize = 60;
    let runs = c.dir.path().join("runs.txt");
    let mut tags = BTreeMap::new(); // job id -> tag
    for i in 0..N {
        let tag = format!("job-{i}");
        let payload = sh("echo \"$1\" >> \"$2\"", &[&tag, path_str(&runs)]);
        let v = c.submit(1 + (i % 3) as u64, "shell", json!({"payload": payload})).await;
        tags.insert(id_of(&v), tag);
    }
    let done = wait_all_finished(&c, Duration::from_secs(60)).await;
    assert_eq!(done.len(), N);

    let text = std::fs::read_to_string(&runs).expect("runs.txt");
    let mut runs_of: BTreeMap<&str, usize> = BTreeMap::new();
    for line in text.lines() {
        *runs_of.entry(line).or_default() += 1;
    }
    assert_eq!(text.lines().count(), N, "executions in runs.txt");
    // Stopped workers have written their whole logs.
    for w in [&mut w1, &mut w2] {
        let st = w.stop(Duration::from_secs(20)).await;
        assert!(st.success(), "worker {} exit: {st:?}", w.name);
        assert!(!is_listed(&c, &w.id, "all").await, "worker {} still listed after SIGTERM", w.name);
    }
    let reported = [count_by_job(&w1, "result reported"), count_by_job(&w2, "result reported")];
    for (id, tag) in &tags {
        let j = &done[id];
        assert_eq!(j["status"], "Completed", "{j}");
        assert_eq!(j["attempt"], 1, "{j}");
        assert_eq!(j["result"]["exitCode"], 0, "{j}");
        assert_eq!(runs_of.get(tag.as_str()), Some(&1), "{tag} ran {:?} times", runs_of.get(tag.as_str()));
        let n: usize = reported.iter().map(|r| r.get(id).copied().unwrap_or(0)).sum();
        assert_eq!(n, 1, "job {id}: {n} accepted reports in the worker logs");
    }
    // The accepted report carried the token of the job's lease.
    for w in [&w1, &w2] {
        for e in w.events().iter().filter(|e| e["message"] == "result reported") {
            let id = event_job_id(e).expect("report in a job span");
            assert_eq!(job_span_field(e, "token"), &done[id]["fencingToken"], "{e}");
            assert_eq!(e["status"], "Completed", "{e}");
        }
    }
    eprintln!("jobs run: {} by w1, {} by w2", reported[0].values().sum::<usize>(), reported[1].values().sum::<usize>());
}

/// Steps: worker_timeout 3 s; worker A (lease 2 s, heartbeat 0.5 s) alone
/// acquires a 5 s `sample` job (attempt 1, token T1); start worker B;
/// `kill -9` A; the job's lease expires (A is declared dead) and B runs it as
/// attempt 2 with a larger token; a completion sent with T1 gets 409
/// stale_token, once while attempt 2 runs (or right after it ended) and again
/// after it completed, and changes nothing; the job ends Completed with B's
/// result, which B's log shows it reported for attempt 2; A is listed dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_job_reruns_elsewhere_and_late_completion_is_fenced() {
    let c = Cluster::start(Opts { worker_timeout_ms: 3000, ..Opts::default() }).await;
    let mut a = c.spawn_worker(&WorkerOpts::new("a").job_types(&["sample"]).lease(2, 0.5));
    let id = id_of(&c.submit(1, "sample", json!({"payload": {"durationMs": 5000}})).await);
    let first = wait_job(&c, &id, "Running on worker a", Duration::from_secs(30), |j| {
        j["status"] == "Running" && j["workerId"] == a.id.as_str()
    })
    .await;
    assert_eq!(first["attempt"], 1, "{first}");
    let t1 = first["fencingToken"].as_u64().expect("token");

    let b = c.spawn_worker(&WorkerOpts::new("b").job_types(&["sample"]).lease(2, 0.5));
    wait_listed(&c, &b.id, "active").await;
    a.kill();
    let killed = Instant::now();

    let second = wait_job(&c, &id, "attempt 2", Duration::from_secs(30), |j| j["attempt"] == 2).await;
    eprintln!("attempt 2 seen {:?} after kill -9 of worker a: {second}", killed.elapsed());
    let (st, body) = complete_with(&c, &id, t1).await;
    assert_eq!(st, 409, "late completion with T1 during attempt 2: {body}");
    assert_eq!(body["error"]["code"], "stale_token", "{body}");

    let done = wait_job(&c, &id, "Completed", Duration::from_secs(30), |j| j["status"] == "Completed").await;
    assert_eq!(done["attempt"], 2, "{done}");
    assert_eq!(done["result"], json!({"sleptMs": 5000}), "{done}");
    let t2 = done["fencingToken"].as_u64().expect("token");
    assert!(t2 > t1, "token of attempt 2 ({t2}) must exceed T1 ({t1})");
    let (st, body) = complete_with(&c, &id, t1).await;
    assert_eq!(st, 409, "late completion with T1 after completion: {body}");
    assert_eq!(body["error"]["code"], "stale_token", "{body}");
    assert_eq!(job(&c, &id).await, done, "a rejected completion changed the job");

    let reports = wait_job_events(&b, &id, "result reported", 1).await;
    assert_eq!(reports.len(), 1, "B's reports: {reports:?}");
    assert_eq!(job_span_field(&reports[0], "attempt"), 2);
    assert_eq!(job_span_field(&reports[0], "token"), t2);
    wait_listed(&c, &a.id, "dead").await;
}

/// Steps: 2 workers (lease 5 s) run a stream of shell jobs that each append
/// `<tag> <shell pid>` to runs.txt and print the pid; a client submits
/// through all nodes (retrying with the same requestId); once jobs flow,
/// `kill -9` the leader; keep submitting through the survivors; restart the
/// killed node; then: every acknowledged job exists and every job ended
/// Completed; per job the executions in runs.txt are at least 1 and at most
/// its attempt count (exactly 1 when attempt is 1), the accepted result
/// comes from one of them, and the worker logs show at most one accepted
/// report per job; both workers are still running, exit 0 on SIGTERM, and
/// the three nodes end with equal digests at the same index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_while_workers_run_loses_and_doubles_nothing() {
    let mut c = Cluster::start(Opts::default()).await;
    let mut opts = WorkerOpts::new("w1").job_types(&["shell"]).capacity(4).lease(5, 1.0);
    opts.request_timeout_seconds = 2.0;
    let mut w1 = c.spawn_worker(&opts);
    let mut w2 = c.spawn_worker(&WorkerOpts { name: "w2".into(), ..opts.clone() });
    wait_listed(&c, &w1.id, "active").await;
    wait_listed(&c, &w2.id, "active").await;

    let runs = c.dir.path().join("runs.txt");
    let urls: Vec<String> = c.nodes.values().map(|n| n.url()).collect();
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let submitter = {
        let (acked, stop, runs) = (acked.clone(), stop.clone(), path_str(&runs).to_owned());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let tag = format!("s{i}");
                i += 1;
                let body = json!({"name": tag, "type": "shell", "requestId": tag,
                    "payload": sh("echo \"$1 $$\" >> \"$2\"; echo \"$$\"", &[&tag, &runs])});
                let deadline = Instant::now() + Duration::from_secs(30);
                let mut k = i;
                loop {
                    assert!(Instant::now() < deadline, "submit {tag} not acknowledged within 30 s");
                    let url = &urls[k % urls.len()];
                    k += 1;
                    let r =
                        http.post(format!("{url}/api/jobs")).json(&body).timeout(Duration::from_secs(5)).send().await;
                    if let Ok(r) = r {
                        if r.status().is_success() {
                            if let Ok(v) = r.json::<Value>().await {
                                acked.lock().unwrap().push(id_of(&v));
                                break;
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };

    eventually(Duration::from_secs(40), "25 acknowledged and 10 completed jobs before the fault", || async {
        if acked.lock().unwrap().len() < 25 {
            return None;
        }
        (all_jobs(&c, Some("Completed")).await?.len() >= 10).then_some(())
    })
    .await;
    let leader = c.leader(Duration::from_secs(10)).await;
    let acked_at_kill = acked.lock().unwrap().len();
    c.kill(leader);
    let killed = Instant::now();
    eventually(Duration::from_secs(40), "25 more acknowledged jobs after the kill", || async {
        (acked.lock().unwrap().len() >= acked_at_kill + 25).then_some(())
    })
    .await;
    eprintln!("25 jobs acknowledged {:?} after kill -9 of leader {leader}", killed.elapsed());
    stop.store(true, Ordering::Relaxed);
    submitter.await.expect("submitter");
    c.start_node(leader);
    c.wait_ready(Duration::from_secs(60)).await;

    let all = wait_all_finished(&c, Duration::from_secs(60)).await;
    let acked = acked.lock().unwrap().clone();
    for id in &acked {
        assert!(all.contains_key(id), "acknowledged job {id} is missing");
    }
    let text = std::fs::read_to_string(&runs).expect("runs.txt");
    let mut execs: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for line in text.lines() {
        let (tag, pid) = line.split_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
        execs.entry(tag).or_default().push(pid);
    }
    assert!(w1.is_running() && w2.is_running(), "a worker process died during the failover");
    // Stopped workers have written their whole logs.
    for w in [&mut w1, &mut w2] {
        let st = w.stop(Duration::from_secs(20)).await;
        assert!(st.success(), "worker {} exit: {st:?}", w.name);
    }
    let reported = [count_by_job(&w1, "result reported"), count_by_job(&w2, "result reported")];
    let mut reruns = 0;
    for (id, j) in &all {
        assert_eq!(j["status"], "Completed", "{j}");
        let tag = j["name"].as_str().expect("name");
        let attempt = j["attempt"].as_u64().expect("attempt") as usize;
        let ran = execs.get(tag).cloned().unwrap_or_default();
        assert!(
            !ran.is_empty() && ran.len() <= attempt,
            "job {id} ({tag}): {} executions, attempt {attempt}",
            ran.len()
        );
        let accepted = j["result"]["stdout"].as_str().unwrap_or("").trim();
        assert!(ran.contains(&accepted), "job {id}: accepted result {accepted:?} is none of its runs {ran:?}");
        let n: usize = reported.iter().map(|r| r.get(id).copied().unwrap_or(0)).sum();
        assert!(n <= 1, "job {id}: {n} accepted reports");
        if attempt > 1 {
            reruns += 1;
            eprintln!("job {id} ({tag}) needed attempt {attempt}, executions {}", ran.len());
        }
    }
    eprintln!("{} jobs ({} acknowledged), {reruns} needed more than one attempt", all.len(), acked.len());
    c.assert_digests_equal().await;
}

/// Steps: a worker (capacity 3, drain timeout 3 s, lease 30 s) runs two
/// shell jobs: LONG writes its pid and sleeps for the seconds in a file (60),
/// SHORT waits until a `go` file exists; SIGTERM the worker; once its log
/// says it is draining, submit a third job and create `go`; SHORT finishes
/// within the drain and is reported Completed (attempt 1); after the drain
/// timeout LONG is cancelled (its `sleep` dies) and released: Pending with
/// attempt 0 (the release did not count) and no lease; the third job was
/// never started by the draining worker and is Pending with attempt 0; the
/// worker exits 0 well before LONG or its lease would end and is no longer
/// listed (not even with status=all); its log shows SHORT's report, then
/// LONG's release, then the deregistration. Then, with the file set to 0, a
/// new worker completes LONG as attempt 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_releases_the_job_and_deregisters() {
    let c = Cluster::start(Opts::default()).await;
    let dir = c.dir.path();
    let (pidfile, secs, go) = (dir.join("long.pid"), dir.join("long.secs"), dir.join("go"));
    std::fs::write(&secs, "60").expect("write secs");
    // Capacity 3: a slot stays free, so a long poll is open at SIGTERM.
    let mut opts = WorkerOpts::new("draining").job_types(&["shell"]).capacity(3).lease(30, 1.0);
    opts.drain_timeout_seconds = 3.0;
    let mut w = c.spawn_worker(&opts);
    let long = sh("echo $$ > \"$1\"; exec sleep \"$(cat \"$2\")\"", &[path_str(&pidfile), path_str(&secs)]);
    let long = id_of(&c.submit(1, "shell", json!({"payload": long})).await);
    let short = sh("while [ ! -e \"$1\" ]; do sleep 0.1; done", &[path_str(&go)]);
    let short = id_of(&c.submit(2, "shell", json!({"payload": short})).await);
    for id in [&long, &short] {
        let running = wait_job(&c, id, "Running on the worker", Duration::from_secs(30), |j| {
            j["status"] == "Running" && j["workerId"] == w.id.as_str()
        })
        .await;
        assert_eq!(running["attempt"], 1, "{running}");
    }
    let pid = read_pid(&pidfile).await;
    wait_sleeping(pid).await;

    let term = Instant::now();
    w.sigterm();
    eventually(Duration::from_secs(10), "the worker draining", || async {
        w.events().iter().any(|e| e["message"] == "shutting down: acquiring stopped, draining").then_some(())
    })
    .await;
    let late = id_of(&c.submit(3, "shell", json!({"payload": sh("true", &[])})).await);
    std::fs::write(&go, "").expect("create go");
    let st = w.wait_exit(Duration::from_secs(30)).await;
    let took = term.elapsed();
    eprintln!("worker exited {took:?} after SIGTERM: {st:?}");
    assert!(st.success(), "exit status {st:?}");
    assert!(took < Duration::from_secs(15), "drain took {took:?}");

    let s = job(&c, &short).await;
    assert_eq!(s["status"], "Completed", "the job finishing within the drain: {s}");
    assert_eq!(s["attempt"], 1, "{s}");
    let j = job(&c, &long).await;
    assert_eq!(j["status"], "Pending", "{j}");
    assert_eq!(j["attempt"], 0, "{j}");
    assert!(j["workerId"].is_null() && j["leaseExpiresAt"].is_null(), "{j}");
    assert!(!job_process_alive(pid), "the job's sleep {pid} survived the drain");
    let l = job(&c, &late).await;
    assert_eq!(l["status"], "Pending", "{l}");
    assert_eq!(l["attempt"], 0, "{l}");
    eprintln!("job submitted during the drain: leased by the abandoned long poll: {}", !l["fencingToken"].is_null());
    assert!(w.job_events(&late, "job started").is_empty(), "the draining worker started a new job");
    assert!(!is_listed(&c, &w.id, "all").await, "worker still listed after SIGTERM");

    let events = w.events();
    let pos = |what: &str, f: &dyn Fn(&Value) -> bool| {
        events.iter().position(f).unwrap_or_else(|| panic!("the log lacks {what}"))
    };
    let reported = pos("SHORT's report", &|e| {
        e["message"] == "result reported" && event_job_id(e) == Some(short.as_str()) && e["status"] == "Completed"
    });
    let released = pos("LONG's release", &|e| {
        e["message"] == "lease released" && event_job_id(e) == Some(long.as_str()) && e["status"] == "Pending"
    });
    let dereg = pos("the deregistration", &|e| e["message"] == "deregistered; worker stopped");
    assert!(reported < released && released < dereg, "log order: report {reported}, release {released}, dereg {dereg}");

    std::fs::write(&secs, "0").expect("write secs");
    let w2 = c.spawn_worker(&WorkerOpts::new("second").job_types(&["shell"]));
    let done = wait_job(&c, &long, "Completed", Duration::from_secs(30), |j| j["status"] == "Completed").await;
    assert_eq!(done["attempt"], 1, "the released attempt must not count: {done}");
    assert_eq!(wait_job_events(&w2, &long, "result reported", 1).await.len(), 1);
}

/// Steps: a shell job with timeoutSeconds 1 and maxRetries 0 starts a
/// background `sleep 30` (pid in one file), writes its own pid to another and
/// execs `sleep 30`; it ends Dead with lastError "timed out ..." long before
/// 30 s; both sleep processes are gone (the whole process group was killed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_timeout_kills_the_process_group() {
    let c = Cluster::start(Opts::default()).await;
    let _w = c.spawn_worker(&WorkerOpts::new("timeouts").job_types(&["shell"]));
    let (main_pid, bg_pid) = (c.dir.path().join("main.pid"), c.dir.path().join("bg.pid"));
    let payload =
        sh("sleep 30 & echo $! > \"$2\"; echo $$ > \"$1\"; exec sleep 30", &[path_str(&main_pid), path_str(&bg_pid)]);
    let id = id_of(&c.submit(2, "shell", json!({"payload": payload, "timeoutSeconds": 1, "maxRetries": 0})).await);
    let done = wait_job(&c, &id, "Dead", Duration::from_secs(30), |j| j["status"] == "Dead").await;
    let err = done["lastError"].as_str().unwrap_or("");
    eprintln!("timed-out job: lastError {err:?}");
    assert!(err.starts_with("timed out"), "{done}");
    assert_eq!(done["attempt"], 1, "{done}");
    let ran_ms = ms(&done["completedAt"]) - ms(&done["startedAt"]);
    assert!(ran_ms < 10_000, "the attempt took {ran_ms} ms; the timeout is 1 s");
    let (p1, p2) = (read_pid(&main_pid).await, read_pid(&bg_pid).await);
    eventually(Duration::from_secs(10), "both sleep processes gone", || async {
        (!job_process_alive(p1) && !job_process_alive(p2)).then_some(())
    })
    .await;
}

/// Steps: a `fail` job with maxRetries 2 and message "boom"; it ends Dead
/// with attempt 3 and lastError "boom"; the worker's log shows 3 starts with
/// attempts 1, 2, 3, three failure reports (Failed, Failed, Dead), and
/// between consecutive starts at least the cluster's retry delay for that
/// job and attempt (exponential from 1 s with deterministic jitter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_job_is_retried_with_backoff_then_dead() {
    let c = Cluster::start(Opts::default()).await;
    let w = c.spawn_worker(&WorkerOpts::new("failer").job_types(&["fail"]));
    let id = id_of(&c.submit(3, "fail", json!({"payload": {"message": "boom"}, "maxRetries": 2})).await);
    let done = wait_job(&c, &id, "Dead", Duration::from_secs(30), |j| j["status"] == "Dead").await;
    assert_eq!(done["attempt"], 3, "{done}");
    assert_eq!(done["lastError"], "boom", "{done}");
    assert!(done["completedAt"].is_string(), "{done}");

    let reports = wait_job_events(&w, &id, "result reported", 3).await;
    let reports: Vec<Value> = reports.iter().map(|e| e["status"].clone()).collect();
    assert_eq!(reports, [json!("Failed"), json!("Failed"), json!("Dead")]);
    let starts = w.job_events(&id, "job started");
    let attempts: Vec<&Value> = starts.iter().map(|e| job_span_field(e, "attempt")).collect();
    assert_eq!(attempts, [1, 2, 3], "starts: {starts:?}");
    let uuid = uuid::Uuid::parse_str(&id).expect("uuid");
    for k in 1..=2u32 {
        let gap_us = event_us(&starts[k as usize]) - event_us(&starts[k as usize - 1]);
        let delay_ms = jobsched_core::backoff::retry_delay_ms(uuid, k) as i64;
        eprintln!("attempt {k} -> {}: {} ms apart, retry delay {delay_ms} ms", k + 1, gap_us / 1000);
        // The cluster stamps times in whole milliseconds: 1 ms of rounding.
        assert!(gap_us + 1000 >= delay_ms * 1000, "attempt {} started {gap_us} us after attempt {k}", k + 1);
    }
}

/// Steps: run examples/python_worker.py (stdlib only) against all three
/// nodes; it is listed with its name, capacity 1 and types py-echo, py-sum;
/// a py-echo job completes as attempt 1 with the payload as result and a
/// py-sum job with the sum; its heartbeats move lastHeartbeatAt; SIGTERM
/// makes it deregister (not listed even with status=all) and exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_worker_on_the_real_cluster() {
    let c = Cluster::start(Opts::default()).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python_worker.py");
    let log_path = c.dir.path().join("worker-python.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let child = std::process::Command::new("python3")
        .arg(script)
        .args(["--coordinators", &c.coordinators(), "--name", "py-worker"])
        .args(["--wait-seconds", "2", "--heartbeat-seconds", "0.5"])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log)
        .spawn()
        .expect("python3 must be installed to run the example worker");
    let mut py = WorkerProc { id: String::new(), name: "python".into(), child: Some(child), log_path };

    let listed = eventually(Duration::from_secs(30), "the python worker registered", || async {
        workers(&c, "active").await?.into_iter().find(|w| w["name"] == "py-worker")
    })
    .await;
    py.id = listed["id"].as_str().expect("id").to_owned();
    assert_eq!(listed["capacity"], 1, "{listed}");
    assert_eq!(listed["jobTypes"], json!(["py-echo", "py-sum"]), "{listed}");
    let first_beat = ms(&listed["lastHeartbeatAt"]);

    let payload = json!({"hello": "world", "n": [1, 2]});
    let echo = id_of(&c.submit(1, "py-echo", json!({"payload": payload})).await);
    let sum = id_of(&c.submit(2, "py-sum", json!({"payload": {"numbers": [1, 2, 3]}})).await);
    let done = wait_job(&c, &echo, "Completed", Duration::from_secs(30), |j| j["status"] == "Completed").await;
    assert_eq!(done["attempt"], 1, "{done}");
    assert_eq!(done["result"], payload, "{done}");
    let done = wait_job(&c, &sum, "Completed", Duration::from_secs(30), |j| j["status"] == "Completed").await;
    assert_eq!(done["result"], json!({"sum": 6}), "{done}");
    eventually(Duration::from_secs(20), "a heartbeat from the python worker", || async {
        let w = workers(&c, "active").await?.into_iter().find(|w| w["id"] == py.id.as_str())?;
        (ms(&w["lastHeartbeatAt"]) > first_beat).then_some(())
    })
    .await;

    let st = py.stop(Duration::from_secs(20)).await;
    assert!(st.success(), "python worker exit: {st:?}\n{}", py.log());
    assert!(!is_listed(&c, &py.id, "all").await, "python worker still listed after SIGTERM");
}

/// Steps: one idle worker long-polls (20 s wait); after a warm-up job, submit
/// 6 echo jobs one at a time, alternately to the leader and a follower, each
/// after the previous completed; per job log the pickup latency, from the
/// submit's acknowledgement (and from createdAt) to startedAt; assert only a
/// generous bound (2 s): a poll interval would show up as seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_long_polling_worker_picks_up_at_once() {
    let c = Cluster::start(Opts::default()).await;
    let mut opts = WorkerOpts::new("poller").job_types(&["echo"]);
    opts.poll_wait_seconds = 20.0;
    let _w = c.spawn_worker(&opts);
    let warm = id_of(&c.submit(1, "echo", json!({})).await);
    wait_job(&c, &warm, "Completed", Duration::from_secs(30), |j| j["status"] == "Completed").await;
    let leader = c.leader(Duration::from_secs(10)).await;
    let follower = c.follower().await;
    let mut from_ack = Vec::new();
    for i in 0..6 {
        let node = if i % 2 == 0 { leader } else { follower };
        let sent = now_ms();
        let id = id_of(&c.submit(node, "echo", json!({"payload": {"i": i}})).await);
        let acked = now_ms();
        let done = wait_job(&c, &id, "Completed", Duration::from_secs(10), |j| j["status"] == "Completed").await;
        assert_eq!(done["result"], json!({"i": i}), "echo returns the payload: {done}");
        let started = ms(&done["startedAt"]);
        let created = ms(&done["createdAt"]);
        eprintln!(
            "pickup via node {node} ({}): ack -> startedAt {} ms, createdAt -> startedAt {} ms (submit round trip {} ms)",
            if node == leader { "leader" } else { "follower" },
            started - acked,
            started - created,
            acked - sent
        );
        assert!(started - acked < 2000 && started - created < 2000, "slow pickup: {done}");
        from_ack.push(started - acked);
    }
    from_ack.sort();
    eprintln!("pickup latency ack -> startedAt (ms), sorted: {from_ack:?}");
}

/// Steps: submit 4 `sample` jobs of 3 s before any worker runs; start one
/// worker with capacity 2, a 2 s lease and 0.3 s heartbeats; all complete as
/// attempt 1 although each ran longer than the lease (its heartbeats listed
/// the jobs and extended their leases); from the worker's own log (handler
/// started / succeeded) it never ran more than 2 handlers at once, and it did
/// run 2; from the jobs' startedAt and completedAt (leader time) the cluster
/// saw between 2 and 4 of them leased at once (a finished job stays leased
/// until its report is acknowledged, while its slot already runs the next
/// one; the 3 x capacity bound itself is checked against a stub coordinator
/// in `crates/worker/tests/runtime.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_bounds_running_jobs_and_heartbeats_keep_long_jobs() {
    let c = Cluster::start(Opts::default()).await;
    let mut ids = Vec::new();
    for i in 0..4u64 {
        ids.push(id_of(&c.submit(1 + i % 3, "sample", json!({"payload": {"durationMs": 3000}})).await));
    }
    let mut w = c.spawn_worker(&WorkerOpts::new("two").job_types(&["sample"]).capacity(2).lease(2, 0.3));
    let done = wait_all_finished(&c, Duration::from_secs(60)).await;
    let mut leased = Vec::new();
    for id in &ids {
        let j = &done[id];
        assert_eq!(j["status"], "Completed", "{j}");
        assert_eq!(j["attempt"], 1, "lease lost although heartbeats ran: {j}");
        let (s, e) = (ms(&j["startedAt"]), ms(&j["completedAt"]));
        assert!(e - s >= 3000, "{j}");
        leased.push((s, e));
    }
    assert!(w.stop(Duration::from_secs(20)).await.success());
    let mut running = Vec::new();
    for id in &ids {
        let started = w.job_events(id, "job started");
        let finished = w.job_events(id, "job succeeded");
        assert_eq!((started.len(), finished.len()), (1, 1), "job {id}: one run in the worker log");
        running.push((event_us(&started[0]), event_us(&finished[0])));
    }
    assert_eq!(most_at_once(&running), 2, "handlers running at once (worker log)");
    let seen = most_at_once(&leased);
    assert!((2..=4).contains(&seen), "jobs leased to the worker at once (cluster view): {seen}");
}

/// The most half-open intervals `[start, end)` that overlap at one moment.
fn most_at_once(intervals: &[(i64, i64)]) -> i32 {
    let mut edges: Vec<(i64, i32)> = intervals.iter().flat_map(|&(s, e)| [(s, 1), (e, -1)]).collect();
    // At equal times an end (-1) sorts before a start.
    edges.sort();
    let (mut now, mut max) = (0, 0);
    for (_, d) in edges {
        now += d;
        max = max.max(now);
    }
    max
}

/// Steps: worker_timeout 3 s; worker A (capacity 1, types echo and shell,
/// lease 2 s) runs a shell job that sleeps 60 s on its first run (pid in a
/// file, a marker file makes later runs exit 0); start worker B (shell
/// only); SIGSTOP A until the cluster lists it dead and B has completed the
/// job as attempt 2; SIGCONT A: it registers again under the same id, its
/// heartbeat learns the lease was revoked, the stale run is cancelled (its
/// sleep dies) and its result dropped; A then runs a new echo job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_worker_is_buried_then_re_registers_and_cancels_its_revoked_job() {
    let c = Cluster::start(Opts { worker_timeout_ms: 3000, ..Opts::default() }).await;
    let a = c.spawn_worker(&WorkerOpts::new("a").job_types(&["echo", "shell"]).capacity(1).lease(2, 0.5));
    let (pidfile, marker) = (c.dir.path().join("a.pid"), c.dir.path().join("marker"));
    let payload = sh(
        "if [ -e \"$2\" ]; then exit 0; fi; : > \"$2\"; echo $$ > \"$1\"; exec sleep 60",
        &[path_str(&pidfile), path_str(&marker)],
    );
    let id = id_of(&c.submit(1, "shell", json!({"payload": payload})).await);
    let first = wait_job(&c, &id, "Running on worker a", Duration::from_secs(30), |j| {
        j["status"] == "Running" && j["workerId"] == a.id.as_str()
    })
    .await;
    let t1 = first["fencingToken"].clone();
    let pid = read_pid(&pidfile).await;
    wait_sleeping(pid).await;
    let b = c.spawn_worker(&WorkerOpts::new("b").job_types(&["shell"]).lease(2, 0.5));
    wait_listed(&c, &b.id, "active").await;

    a.pause();
    let paused = Instant::now();
    wait_listed(&c, &a.id, "dead").await;
    let done = wait_job(&c, &id, "Completed by b", Duration::from_secs(30), |j| j["status"] == "Completed").await;
    eprintln!("worker a dead and its job re-run {:?} after SIGSTOP", paused.elapsed());
    assert_eq!(done["attempt"], 2, "{done}");
    assert_eq!(wait_job_events(&b, &id, "result reported", 1).await.len(), 1, "b reported the job");
    assert!(job_process_alive(pid), "a's stale run is still sleeping while a is stopped");

    a.resume();
    let again = wait_listed(&c, &a.id, "active").await;
    assert_eq!(again["name"], "a");
    eventually(Duration::from_secs(20), "a's stale run cancelled", || async {
        (!job_process_alive(pid)).then_some(())
    })
    .await;
    eventually(Duration::from_secs(20), "a logs the revocation and the dropped result", || async {
        let events = a.events();
        let revoked = events
            .iter()
            .any(|e| e["message"] == "lease revoked by the cluster; stopping the job" && e["job_id"] == id.as_str());
        (revoked && !a.job_events(&id, "lease revoked while running; result dropped").is_empty()).then_some(())
    })
    .await;
    assert!(a.job_events(&id, "result reported").is_empty(), "a reported its revoked run");
    for e in a.job_events(&id, "job started") {
        assert_eq!(job_span_field(&e, "token"), &t1, "a ran the job only under T1: {e}");
    }
    assert_eq!(job(&c, &id).await, done, "the revoked run changed the job");

    let echo = id_of(&c.submit(2, "echo", json!({"payload": "after"})).await);
    let d = wait_job(&c, &echo, "Completed", Duration::from_secs(30), |j| j["status"] == "Completed").await;
    assert_eq!(d["attempt"], 1, "{d}");
    let reports = wait_job_events(&a, &echo, "result reported", 1).await;
    assert_eq!(reports.len(), 1, "a ran the echo job after re-registering");
}

/// Steps: lease 30 s; worker W (request timeout 1 s, client debug logs) runs
/// a 1.5 s `sample` job; SIGSTOP all three nodes; the handler finishes while
/// no node can answer and W's log shows its report failing; SIGCONT the
/// nodes; the report is retried and lands: the job is Completed as attempt 1
/// under its original token, reported once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_report_is_retried_until_the_cluster_answers() {
    let c = Cluster::start(Opts::default()).await;
    let mut opts = WorkerOpts::new("reporter").job_types(&["sample"]).lease(30, 1.0);
    opts.request_timeout_seconds = 1.0;
    opts.rust_log = "info,jobsched_client=debug".into();
    let w = c.spawn_worker(&opts);
    let id = id_of(&c.submit(1, "sample", json!({"payload": {"durationMs": 1500}})).await);
    let running = wait_job(&c, &id, "Running", Duration::from_secs(30), |j| j["status"] == "Running").await;
    let token = running["fencingToken"].clone();

    for n in [1, 2, 3] {
        c.pause(n);
    }
    let paused = Instant::now();
    eventually(Duration::from_secs(30), "a failed report attempt after the job succeeded", || async {
        let events = w.events();
        let ok = events.iter().position(|e| e["message"] == "job succeeded" && event_job_id(e) == Some(id.as_str()))?;
        events[ok..]
            .iter()
            .any(|e| {
                e["message"] == "coordinator request failed; trying another node"
                    && event_job_id(e) == Some(id.as_str())
            })
            .then_some(())
    })
    .await;
    for n in [1, 2, 3] {
        c.resume(n);
    }
    eprintln!("cluster paused for {:?}", paused.elapsed());
    let done = wait_job(&c, &id, "Completed", Duration::from_secs(30), |j| j["status"] == "Completed").await;
    assert_eq!(done["attempt"], 1, "{done}");
    assert_eq!(done["fencingToken"], token, "{done}");
    assert_eq!(done["result"], json!({"sleptMs": 1500}), "{done}");
    eventually(Duration::from_secs(10), "the report logged", || async {
        (w.job_events(&id, "result reported").len() == 1).then_some(())
    })
    .await;
}

/// Steps: worker W (capacity 2, lease 5 s, 20 s long polls) runs a shell
/// job J that sleeps 60 s on its first run (pid in a file; a marker file
/// makes later runs sleep 8 s, longer than the lease, then exit 0); SIGSTOP
/// W for longer than the lease (but not the 30 s worker timeout): the lease
/// expires and W's still-open long poll acquires J again (attempt 2, new
/// token) while W is stopped; SIGCONT W: it runs attempt 2 and must stop the
/// stale attempt 1 at once (its sleep dies, its result is dropped) while
/// keeping attempt 2's lease alive by heartbeats: J ends Completed as
/// attempt 2, started only twice and reported once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_acquired_again_by_the_same_worker_stops_the_stale_run() {
    let c = Cluster::start(Opts::default()).await;
    let mut opts = WorkerOpts::new("w").job_types(&["shell"]).capacity(2).lease(5, 1.0);
    opts.poll_wait_seconds = 20.0;
    let w = c.spawn_worker(&opts);
    let (pidfile, marker) = (c.dir.path().join("w.pid"), c.dir.path().join("marker"));
    let payload = sh(
        "if [ -e \"$2\" ]; then sleep 8; exit 0; fi; : > \"$2\"; echo $$ > \"$1\"; exec sleep 60",
        &[path_str(&pidfile), path_str(&marker)],
    );
    let id = id_of(&c.submit(1, "shell", json!({"payload": payload})).await);
    let first = wait_job(&c, &id, "Running", Duration::from_secs(30), |j| j["status"] == "Running").await;
    let t1 = first["fencingToken"].as_u64().expect("token");
    let pid = read_pid(&pidfile).await;
    wait_sleeping(pid).await;

    w.pause();
    let again = wait_job(&c, &id, "attempt 2 leased to the stopped worker", Duration::from_secs(20), |j| {
        j["attempt"] == 2 && j["status"] == "Running"
    })
    .await;
    assert_eq!(again["workerId"], w.id.as_str(), "{again}");
    let t2 = again["fencingToken"].as_u64().expect("token");
    assert!(t2 > t1);
    w.resume();
    let resumed = Instant::now();

    // Well before attempt 1's 60 s sleep would end by itself.
    eventually(Duration::from_secs(15), "the stale run's sleep killed", || async {
        (!job_process_alive(pid)).then_some(())
    })
    .await;
    eprintln!("stale run stopped {:?} after SIGCONT", resumed.elapsed());
    let done = wait_job(&c, &id, "Completed", Duration::from_secs(30), |j| j["status"] == "Completed").await;
    assert_eq!(done["attempt"], 2, "{done}");
    assert_eq!(done["fencingToken"], t2, "{done}");
    let starts: Vec<Value> =
        w.job_events(&id, "job started").iter().map(|e| job_span_field(e, "token").clone()).collect();
    assert_eq!(starts, [json!(t1), json!(t2)], "runs of the job");
    let reports = wait_job_events(&w, &id, "result reported", 1).await;
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(job_span_field(&reports[0], "token"), t2);
    let dropped = wait_job_events(&w, &id, "lease revoked while running; result dropped", 1).await;
    assert_eq!(dropped.len(), 1, "attempt 1's result dropped once: {dropped:?}");
    assert_eq!(job_span_field(&dropped[0], "token"), t1);
    assert_eq!(job(&c, &id).await, done);
}

/// Steps: submit 200 echo jobs in one batch before any worker runs; start
/// one worker with capacity 16 (debug logs); every job ends Completed as
/// attempt 1 with its payload as result; the worker's log holds exactly one
/// accepted report per job, and its reporter sent results that finished
/// together in batched calls (`POST /api/jobs/complete`) of more than one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_worker_reports_results_in_batches() {
    let c = Cluster::start(Opts::default()).await;
    const N: usize = 200;
    let jobs: Vec<Value> =
        (0..N).map(|i| json!({"name": format!("e{i}"), "type": "echo", "payload": {"i": i}})).collect();
    let (status, body) = c.post(1, "/api/jobs/batch", json!({ "jobs": jobs })).await;
    assert_eq!((status, &body["created"]), (201, &json!(N)), "batch submit");
    let mut opts = WorkerOpts::new("busy").job_types(&["echo"]).capacity(16);
    opts.rust_log = "info,jobsched_worker=debug".into();
    let mut w = c.spawn_worker(&opts);
    let done = wait_all_finished(&c, Duration::from_secs(60)).await;
    assert_eq!(done.len(), N);
    let st = w.stop(Duration::from_secs(20)).await;
    assert!(st.success(), "worker exit: {st:?}");
    let reported = count_by_job(&w, "result reported");
    for (id, j) in &done {
        assert_eq!(j["status"], "Completed", "{j}");
        assert_eq!(j["attempt"], 1, "{j}");
        assert_eq!(j["result"], j["payload"], "{j}");
        assert_eq!(reported.get(id), Some(&1), "job {id}: accepted reports in the worker log");
    }
    let sizes: Vec<u64> = w
        .events()
        .iter()
        .filter(|e| e["message"] == "batched report answered")
        .filter_map(|e| e["results"].as_u64())
        .collect();
    assert!(sizes.iter().any(|&n| n > 1), "no batched report: {sizes:?}");
    eprintln!("batched reports: {} calls, {} results", sizes.len(), sizes.iter().sum::<u64>());
}
