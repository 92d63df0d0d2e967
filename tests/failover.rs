//! Fault tolerance on a real 3-node cluster: kill -9 of the leader under
//! load, a full-cluster restart (also after log purges, which makes every
//! node re-apply from the Raft log what its state machine had not flushed),
//! and a lagging node catching up by snapshot.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Cluster, Opts};
use serde_json::json;

/// Submit through any node, retrying with the same request id until a
/// definite answer (the way a careful client does). Returns the job id once
/// acknowledged, or None if the deadline passed without an answer.
async fn submit_acked(c: &Cluster, nodes: &[u64], request_id: &str, deadline: Instant) -> Option<String> {
    let mut i = 0usize;
    while Instant::now() < deadline {
        let node = nodes[i % nodes.len()];
        i += 1;
        let body = json!({"type": "load", "name": request_id, "requestId": request_id});
        let resp =
            c.http.post(format!("{}/api/jobs", c.url(node))).json(&body).timeout(Duration::from_secs(5)).send().await;
        if let Ok(r) = resp {
            if r.status().is_success() {
                let v: serde_json::Value = r.json().await.ok()?;
                return v["id"].as_str().map(str::to_owned);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// A split-IP cluster with the given propose timeout, one write acknowledged
/// through its leader, then that leader cut off from its peers (clients
/// still reach it). Returns the cluster and the cut-off leader.
async fn cut_off_leader(propose_timeout_ms: u64) -> (Cluster, u64) {
    let extra = vec![("propose_timeout_ms".into(), propose_timeout_ms.to_string())];
    let mut c = Cluster::start(Opts { split_ips: true, extra, ..Opts::default() }).await;
    let leader = c.leader(Duration::from_secs(20)).await;
    c.submit(leader, "echo", json!({"requestId": "before"})).await;
    c.partition(leader);
    (c, leader)
}

/// Steps: 4 clients submit continuously through all nodes; kill -9 the
/// leader mid-stream; clients keep going through the survivors; restart the
/// killed node; then every acknowledged job is present on all three nodes
/// (stale reads after catch-up) and the state digests are equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_loses_no_acknowledged_job() {
    // One runtime thread per node, as the local cluster (config/nodeN.toml)
    // and the benchmarks run: failover must not depend on a second thread.
    let opts = Opts { extra: vec![("runtime_threads".into(), "1".into())], ..Opts::default() };
    let c = Cluster::start(opts).await;
    let leader = c.leader(Duration::from_secs(10)).await;
    let acked = Arc::new(tokio::sync::Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(c);

    let mut clients = Vec::new();
    for client in 0..4 {
        let (c2, acked, stop) = (shared.clone(), acked.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let nodes: Vec<u64> = vec![1, 2, 3];
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let rid = format!("c{client}-{n}");
                n += 1;
                let deadline = Instant::now() + Duration::from_secs(20);
                if let Some(id) = submit_acked(&c2, &nodes, &rid, deadline).await {
                    acked.lock().await.push(id);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = acked.lock().await.len();
    assert!(before > 0, "no submits acknowledged before the fault");

    // kill -9 the leader while the clients keep submitting.
    let leader_pid = shared.nodes[&leader].pid().expect("leader running");
    unsafe { libc::kill(leader_pid, libc::SIGKILL) };
    let killed_at = Instant::now();
    // Measure: time until the next acknowledged submit after the kill.
    let acked_at_kill = acked.lock().await.len();
    common::eventually(Duration::from_secs(20), "a submit acknowledged after the kill", || async {
        (acked.lock().await.len() > acked_at_kill).then_some(())
    })
    .await;
    eprintln!("first acknowledged submit {:?} after kill -9 of leader", killed_at.elapsed());
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for h in clients {
        h.await.unwrap();
    }
    let mut c = Arc::try_unwrap(shared).ok().expect("clients finished");
    c.kill(leader); // reap the killed process
    c.start_node(leader);
    c.wait_ready(Duration::from_secs(30)).await;

    let ids: Vec<String> = acked.lock().await.clone();
    let index = c.max_applied().await;
    c.wait_applied(index, Duration::from_secs(30)).await;
    for node in [1, 2, 3] {
        for id in &ids {
            let (st, v) = c.get(node, &format!("/api/jobs/{id}?stale=true")).await;
            assert_eq!(st, 200, "acknowledged job {id} missing on node {node}: {v}");
        }
    }
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "a retried request id created a second job");
    c.assert_digests_equal().await;
}

/// Steps: create jobs and a worker holding a lease; kill -9 all three
/// nodes at once; start them again; every job, the worker and the lease
/// (token) are intact and the cluster accepts new writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_cluster_restart_keeps_state() {
    let mut c = Cluster::start(Opts::default()).await;
    let w = c.register_worker(1, &["t"], 2).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(c.submit(1 + (i % 3), "t", json!({"priority": i})).await["id"].as_str().unwrap().to_owned());
    }
    let (_, acq) = c.post(2, "/api/jobs/acquire", json!({"workerId": w})).await;
    let held = acq["jobs"][0].clone();
    for n in [1, 2, 3] {
        c.kill(n);
    }
    for n in [1, 2, 3] {
        c.start_node(n);
    }
    c.wait_ready(Duration::from_secs(60)).await;
    for id in &ids {
        let (st, v) = c.get(3, &format!("/api/jobs/{id}")).await;
        assert_eq!(st, 200, "{v}");
    }
    let (_, j) = c.get(1, &format!("/api/jobs/{}", held["id"].as_str().unwrap())).await;
    assert_eq!(j["status"], "Running");
    assert_eq!(j["fencingToken"], held["fencingToken"]);
    let (_, workers) = c.get(2, "/api/workers").await;
    assert_eq!(workers["workers"][0]["id"], w.as_str());
    c.submit(2, "t", json!({})).await;
    c.assert_digests_equal().await;
}

/// Steps: with a snapshot every 50 entries and only 20 kept behind it, write
/// 300 jobs from 4 concurrent clients until every node has built snapshots
/// and purged its log; kill -9 all three nodes at once; start them again.
/// Every job is there on every node and the digests agree. Why this matters:
/// apply steps skip RocksDB's WAL, so the kill loses each node's recent
/// state-machine writes and the restart re-applies them from the Raft log;
/// the entries it needs must not have been purged (a snapshot is published
/// only after the state machine is flushed past it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_all_after_log_purges_reapplies_from_the_log() {
    let opts =
        Opts { snapshot_logs: 50, extra: vec![("snapshot_catchup_logs".into(), "20".into())], ..Opts::default() };
    let mut c = Cluster::start(opts).await;
    let shared = Arc::new(c);
    let mut tasks = Vec::new();
    for k in 0..4u64 {
        let c2 = shared.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..75u64 {
                let v = c2.submit(1 + (i + k) % 3, "bulk", json!({"name": format!("j{k}-{i}")})).await;
                ids.push(v["id"].as_str().unwrap().to_owned());
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    c = Arc::try_unwrap(shared).ok().expect("tasks done");
    let index = c.max_applied().await;
    c.wait_applied(index, Duration::from_secs(30)).await;
    for n in [1, 2, 3] {
        let view = c.cluster_view(n).await.unwrap();
        assert!(view["purgedIndex"].as_u64().unwrap_or(0) > 0, "node {n} purged no log: {view}");
    }
    for n in [1, 2, 3] {
        c.kill(n);
    }
    for n in [1, 2, 3] {
        c.start_node(n);
    }
    c.wait_ready(Duration::from_secs(60)).await;
    c.wait_applied(index, Duration::from_secs(30)).await;
    for n in [1, 2, 3] {
        let (_, list) = c.get(n, "/api/jobs?stale=true&limit=1000").await;
        let listed: BTreeSet<&str> =
            list["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
        for id in &ids {
            assert!(listed.contains(id.as_str()), "job {id} missing on node {n} after the restart");
        }
        assert_eq!(listed.len(), ids.len(), "node {n}");
    }
    c.submit(2, "bulk", json!({})).await;
    c.assert_digests_equal().await;
}

/// Steps: with snapshots every 50 entries, stop one follower, write 400
/// jobs, restart it: it catches up (the log it missed was purged, so this
/// goes through snapshot install) and its digest equals the others'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_node_catches_up_by_snapshot() {
    let mut c = Cluster::start(Opts { snapshot_logs: 50, ..Opts::default() }).await;
    let f = c.follower().await;
    c.kill(f);
    let live: Vec<u64> = c.running();
    let mut tasks = Vec::new();
    let shared = Arc::new(c);
    for k in 0..4 {
        let (c2, live) = (shared.clone(), live.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..100 {
                c2.submit(live[(i + k) % live.len()], "bulk", json!({"name": format!("j{k}-{i}")})).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut c = Arc::try_unwrap(shared).ok().expect("tasks done");
    let l = c.leader(Duration::from_secs(5)).await;
    let view = c.cluster_view(l).await.unwrap();
    assert!(view["snapshotIndex"].as_u64().unwrap_or(0) > 50, "no snapshot taken: {view}");
    c.start_node(f);
    c.wait_ready(Duration::from_secs(60)).await;
    c.assert_digests_equal().await;
    let (_, list) = c.get(f, "/api/jobs?stale=true&limit=1000").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 400);
}

/// Steps: SIGTERM a follower: it exits 0 promptly; the other two keep
/// serving writes; SIGTERM the leader too: it exits 0 and the remaining
/// node cannot commit alone (503, nothing acknowledged); restart both and
/// every acknowledged job is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_and_no_quorum_writes() {
    let mut c = Cluster::start(Opts::default()).await;
    let f = c.follower().await;
    let status = c.stop(f).expect("was running");
    assert!(status.success(), "SIGTERM exit status: {status:?}");
    let live = c.running();
    let job = c.submit(live[0], "t", json!({})).await;

    let l = c.leader(Duration::from_secs(10)).await;
    assert!(c.stop(l).expect("was running").success());
    let last = c.running()[0];
    let r = c
        .http
        .post(format!("{}/api/jobs", c.url(last)))
        .json(&json!({"type": "t", "requestId": "during-outage"}))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("answered");
    assert_eq!(r.status().as_u16(), 503, "a lone node must not acknowledge writes");

    c.start_node(f);
    c.start_node(l);
    c.wait_ready(Duration::from_secs(30)).await;
    let (st, _) = c.get(f, &format!("/api/jobs/{}", job["id"].as_str().unwrap())).await;
    assert_eq!(st, 200);
    c.assert_digests_equal().await;
}

/// Regression (found by the chaos checker): a frozen leader accepts
/// connections and never answers, so a relayed write used to hang until it
/// resumed. Steps: SIGSTOP the leader; submit through a follower with a
/// request id; the answer (201, or 503 meaning "retry") comes well before
/// the pause ends; retrying the same request id succeeds on the new leader;
/// resume the old leader: exactly one job exists and digests agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_leader_does_not_stall_relayed_writes() {
    let c = Cluster::start(Opts::default()).await;
    let leader = c.leader(Duration::from_secs(10)).await;
    let follower = c.follower().await;
    c.pause(leader);
    let body = json!({"type": "t", "requestId": "frozen-1"});
    let started = Instant::now();
    let mut created = None;
    while created.is_none() {
        assert!(started.elapsed() < Duration::from_secs(8), "no answer while the old leader is frozen");
        let r = c
            .http
            .post(format!("{}/api/jobs", c.url(follower)))
            .json(&body)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("the follower answers");
        let status = r.status().as_u16();
        let v: serde_json::Value = r.json().await.unwrap_or_default();
        match status {
            200 | 201 => created = Some(v),
            503 => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("unexpected {other}: {v}"),
        }
    }
    eprintln!("write acknowledged {:?} after freezing the leader", started.elapsed());
    c.resume(leader);
    c.wait_ready(Duration::from_secs(20)).await;
    // Just after SIGCONT the old leader may still believe it leads until it
    // hears the new term; meanwhile it answers the documented 503 (retry).
    let deadline = Instant::now() + Duration::from_secs(10);
    let list = loop {
        let (st, list) = c.get(leader, "/api/jobs").await;
        match st {
            200 => break list,
            503 if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            _ => panic!("read on the resumed old leader: {st} {list}"),
        }
    };
    let jobs = list["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{list}");
    assert_eq!(jobs[0]["id"], created.unwrap()["id"]);
    c.assert_digests_equal().await;
}

/// Regression (found by the chaos partition runs): a leader cut off from its
/// peers, while clients still reach it, must never acknowledge a write, and
/// must say so quickly instead of holding the client for the whole propose
/// timeout (set to 30 s here so the difference cannot be noise).
/// Steps: split-IP cluster; partition the leader; a submit through it gets a
/// 503 (not a 2xx) well before 30 s, and so does the next one; the other two
/// elect a leader and acknowledge a submit; heal; the old leader rejoins as a
/// follower, every node agrees, digests are equal, and the acknowledged job
/// is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_leader_never_acknowledges_and_answers_fast() {
    let (mut c, old) = cut_off_leader(30_000).await;

    for attempt in ["cut-1", "cut-2"] {
        let t0 = Instant::now();
        let (st, body) = c.post(old, "/api/jobs", json!({"type": "echo", "requestId": attempt})).await;
        let took = t0.elapsed();
        assert_eq!(st, 503, "a cut-off leader must not acknowledge: {st} {body}");
        assert!(took < Duration::from_secs(15), "answered after {took:?}, i.e. held until the propose timeout");
    }

    let others: Vec<u64> = c.running().into_iter().filter(|&n| n != old).collect();
    let acked = submit_acked(&c, &others, "during", Instant::now() + Duration::from_secs(20)).await;
    let acked = acked.expect("the majority side acknowledges writes while the old leader is cut off");

    c.heal();
    common::eventually(Duration::from_secs(20), "one leader that every node follows", || async {
        let mut leaders = BTreeSet::new();
        for n in c.running() {
            let v = c.cluster_view(n).await?;
            leaders.insert(v["leaderId"].as_u64()?);
        }
        (leaders.len() == 1).then_some(())
    })
    .await;
    let (st, job) = c.get(old, &format!("/api/jobs/{acked}")).await;
    assert_eq!(st, 200, "{job}");
    c.assert_digests_equal().await;
}

/// A leader that was cut off with writes in flight, deposed, and later
/// elected again must take writes again. Background: the partition soak
/// found a node whose proposer had been left with no free in-flight slot
/// (entries of its cut-off term that openraft never answered), so that once
/// re-elected it acknowledged nothing although Raft had a healthy quorum; the
/// proposer now bounds each entry by the propose timeout. This test drives
/// that sequence, but it does not reproduce the unanswered entries on demand
/// (openraft answered them on step-down here even without the bound), so it
/// guards the sequence and the election path, not that bug by itself.
/// Steps: split-IP cluster with a 3 s propose timeout; partition leader A;
/// submit through A one request at a time (each becomes its own entry, none
/// can commit); the others elect B; after the propose timeout heal; A follows
/// B and drops those entries. Then make A the only node that can win: stop
/// the third node C, commit a write on A and B (C's log is now shorter), kill
/// B, start C. C's pre-vote is refused by A, which campaigns at once and is
/// elected. A submit through A must be acknowledged; digests agree once B is
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposed_leader_elected_again_accepts_writes() {
    let (c, a) = cut_off_leader(3_000).await;
    let cut_at = Instant::now();

    // Spaced so that each request finds a free slot and leaves as its own
    // entry; six of them cover the four slots. Their answers do not matter
    // (a cut-off leader answers 503); they must merely be appended.
    let shared = Arc::new(c);
    let mut stuck = Vec::new();
    for i in 0..6 {
        let c2 = shared.clone();
        stuck.push(tokio::spawn(async move {
            let _ = c2
                .http
                .post(format!("{}/api/jobs", c2.url(a)))
                .json(&json!({"type": "echo", "requestId": format!("cut-{i}")}))
                .timeout(Duration::from_secs(15))
                .send()
                .await;
        }));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    for t in stuck {
        t.await.unwrap();
    }
    let mut c = Arc::try_unwrap(shared).ok().expect("requests finished");

    let others: Vec<u64> = c.running().into_iter().filter(|&n| n != a).collect();
    submit_acked(&c, &others, "during", Instant::now() + Duration::from_secs(20))
        .await
        .expect("the majority side acknowledges writes while A is cut off");
    // Keep A cut off past the propose timeout, so its stuck entries time out
    // while it still believes it leads.
    tokio::time::sleep_until((cut_at + Duration::from_millis(3500)).into()).await;
    c.heal();
    let b = common::eventually(Duration::from_secs(20), "A follows the new leader", || async {
        let v = c.cluster_view(a).await?;
        let leader = v["leaderId"].as_u64()?;
        (v["role"] == "Follower" && leader != a).then_some(leader)
    })
    .await;
    let third = others.into_iter().find(|&n| n != b).expect("a third node");
    // Make A the only node that can win: it gets a write the third node
    // misses (so the third's log is shorter), then B goes away.
    c.kill(third);
    submit_acked(&c, &[b, a], "while-third-down", Instant::now() + Duration::from_secs(20))
        .await
        .expect("A and B acknowledge writes without the third node");
    let index = c.max_applied().await;
    c.wait_applied(index, Duration::from_secs(20)).await;
    c.kill(b);
    c.start_node(third);
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.cluster_view(a).await.is_none_or(|v| v["role"] != "Leader") {
        assert!(Instant::now() < deadline, "A not elected again; its log:\n{}", c.log(a));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let acked = submit_acked(&c, &[a], "after", Instant::now() + Duration::from_secs(15)).await;
    assert!(acked.is_some(), "A, leader again with a quorum, acknowledged no write; log:\n{}", c.log(a));
    c.start_node(b);
    c.wait_ready(Duration::from_secs(30)).await;
    c.assert_digests_equal().await;
}

/// Pre-vote: a follower cut off from its peers must not raise its term
/// (without pre-vote it does on every election timeout), so that when the
/// partition heals it cannot depose the healthy leader.
/// Steps: split-IP cluster; partition a follower F for 3 s (about six
/// election timeouts); the leader keeps acknowledging writes meanwhile; F's
/// term stays the leader's; heal; F catches up and follows the same leader
/// in the same term, and a write through F is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healed_follower_does_not_depose_the_leader() {
    let mut c = Cluster::start(Opts { split_ips: true, ..Opts::default() }).await;
    let leader = c.leader(Duration::from_secs(20)).await;
    let term = c.cluster_view(leader).await.expect("leader view")["term"].as_u64().expect("term");
    let f = c.follower().await;
    c.partition(f);
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(3) {
        c.submit(leader, "t", json!({"requestId": format!("p-{n}")})).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cut_off = c.cluster_view(f).await.expect("F answers clients");
    assert_eq!(cut_off["term"].as_u64(), Some(term), "the cut-off follower raised its term: {cut_off}");
    c.heal();
    let index = c.max_applied().await;
    c.wait_applied(index, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for node in c.running() {
        let v = c.cluster_view(node).await.expect("view");
        assert_eq!(v["leaderId"].as_u64(), Some(leader), "leader changed after the heal: node {node}: {v}");
        assert_eq!(v["term"].as_u64(), Some(term), "term changed after the heal: node {node}: {v}");
    }
    c.submit(f, "t", json!({"requestId": "after-heal"})).await;
    c.assert_digests_equal().await;
}
