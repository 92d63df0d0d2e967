//! End-to-end API behaviour on a real 3-node cluster (separate processes,
//! real RocksDB, HTTP on 127.0.0.1).

mod common;

use std::time::Duration;

use common::{Cluster, Opts};
use serde_json::{json, Value};

/// Steps: start 3 nodes; submit the README's curl body on a follower; the
/// response is 201 with a Pending job; read it back linearizably from every
/// node and with stale=true from every node once applied; list by status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_on_follower_is_readable_on_every_node() {
    let c = Cluster::start(Opts::default()).await;
    let f = c.follower().await;
    let (st, job) = c
        .post(
            f,
            "/api/jobs",
            json!({"name":"My Job","type":"sample","payload":"Hello, World!","maxRetries":3,"priority":5}),
        )
        .await;
    assert_eq!(st, 201, "{job}");
    assert_eq!(job["status"], "Pending");
    assert_eq!(job["payload"], "Hello, World!");
    assert_eq!(job["maxRetries"], 3);
    assert_eq!(job["priority"], 5);
    let id = job["id"].as_str().unwrap().to_owned();

    for node in c.running() {
        let (st, got) = c.get(node, &format!("/api/jobs/{id}")).await;
        assert_eq!(st, 200, "node {node}: {got}");
        assert_eq!(got["name"], "My Job");
    }
    let index = c.max_applied().await;
    c.wait_applied(index, Duration::from_secs(10)).await;
    for node in c.running() {
        let (st, got) = c.get(node, &format!("/api/jobs/{id}?stale=true")).await;
        assert_eq!(st, 200, "stale read on node {node}: {got}");
        assert_eq!(got["id"], id.as_str());
    }
    let (st, list) = c.get(f, "/api/jobs?status=pending").await;
    assert_eq!(st, 200);
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
    assert!(list["nextCursor"].is_null());
}

/// Relays from a follower travel in batches; every client still gets its
/// own answer. Steps: fire 300 concurrent submits at a follower, each with
/// its own name and requestId, plus invalid ones (negative maxRetries) and
/// reads mixed in; every valid submit is 201 with its own name, every
/// invalid one its own 422 and nothing else; the follower reports fewer
/// relay batches than relayed items; a malformed batch body on the internal
/// endpoint is a 400 and the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_requests_are_batched_and_each_gets_its_own_answer() {
    let c = Cluster::start(Opts::default()).await;
    let f = c.follower().await;
    let n = 300;
    let mut tasks = Vec::new();
    for i in 0..n {
        let http = reqwest::Client::new();
        let url = c.url(f);
        tasks.push(tokio::spawn(async move {
            let body = if i % 10 == 7 {
                json!({"name": format!("bad-{i}"), "type": "echo", "maxRetries": -1})
            } else {
                json!({"name": format!("job-{i}"), "type": "echo", "requestId": format!("req-{i}")})
            };
            let r = http.post(format!("{url}/api/jobs")).json(&body).send().await.expect("submit");
            let st = r.status().as_u16();
            (i, st, r.json::<Value>().await.unwrap_or(Value::Null))
        }));
        if i % 50 == 0 {
            let http = reqwest::Client::new();
            let url = c.url(f);
            tasks.push(tokio::spawn(async move {
                let r = http.get(format!("{url}/api/jobs?limit=1")).send().await.expect("list");
                (usize::MAX, r.status().as_u16(), Value::Null)
            }));
        }
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let (i, st, body) = t.await.unwrap();
        if i == usize::MAX {
            assert_eq!(st, 200, "relayed read");
        } else if i % 10 == 7 {
            assert_eq!(st, 422, "item {i}: {body}");
            assert_eq!(body["error"]["field"], "maxRetries", "item {i}: {body}");
        } else {
            assert_eq!(st, 201, "item {i}: {body}");
            assert_eq!(body["name"], format!("job-{i}"), "item {i} got someone else's answer: {body}");
            assert!(ids.insert(body["id"].as_str().unwrap().to_owned()), "duplicate job id: {body}");
        }
    }
    assert_eq!(ids.len(), n - n / 10);
    let (_, list) = c.get(f, "/api/jobs?limit=1000").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), ids.len(), "no job from the refused items");

    let (_, view) = c.get(f, "/api/cluster").await;
    let items = view["relayedItems"].as_u64().unwrap();
    let batches = view["relayBatches"].as_u64().unwrap();
    assert!(items >= n as u64, "{view}");
    assert!(batches < items, "300 concurrent relays should share batches: {view}");

    let (st, body) = c.post_raw(f, "/raft/relay", "not a batch").await;
    assert_eq!(st, 400, "{body}");
    let (st, _) = c.get(f, "/api/jobs?limit=1").await;
    assert_eq!(st, 200);
}

/// Steps: register a worker; submit 3 jobs of different priority; acquire
/// returns the highest priority first with attempt 1 and a fencing token;
/// complete it (through another node); a second completion with an old
/// token is 409; the same completion repeated is idempotent (200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_complete_and_fencing() {
    let c = Cluster::start(Opts::default()).await;
    let nodes = c.running();
    let worker = c.register_worker(nodes[0], &["sample"], 4).await;
    let low = c.submit(nodes[1], "sample", json!({"priority": 1})).await;
    let high = c.submit(nodes[2], "sample", json!({"priority": 9})).await;
    let _other_type = c.submit(nodes[0], "other", json!({"priority": 100})).await;

    let (st, acq) = c.post(nodes[1], "/api/jobs/acquire", json!({"workerId": worker})).await;
    assert_eq!(st, 200, "{acq}");
    let jobs = acq["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["id"], high["id"]);
    assert_eq!(jobs[0]["status"], "Running");
    assert_eq!(jobs[0]["attempt"], 1);
    let token = jobs[0]["fencingToken"].as_u64().unwrap();

    let path = format!("/api/jobs/{}/complete", high["id"].as_str().unwrap());
    let (st, done) =
        c.post(nodes[2], &path, json!({"fencingToken": token, "success": true, "result": {"ok": 1}})).await;
    assert_eq!(st, 200, "{done}");
    assert_eq!(done["status"], "Completed");
    assert_eq!(done["result"], json!({"ok": 1}));
    // A retried identical report returns the job, not an error.
    let (st, again) = c.post(nodes[0], &path, json!({"fencingToken": token, "success": true})).await;
    assert_eq!(st, 200, "{again}");
    // A wrong token is rejected.
    let (st, stale) = c.post(nodes[0], &path, json!({"fencingToken": token + 1000, "success": true})).await;
    assert_eq!(st, 409, "{stale}");
    assert_eq!(stale["error"]["code"], "stale_token");

    // Next acquire gets the low-priority sample job, never the other type.
    let (_, acq) = c.post(nodes[0], "/api/jobs/acquire", json!({"workerId": worker, "maxJobs": 4})).await;
    let ids: Vec<&Value> = acq["jobs"].as_array().unwrap().iter().map(|j| &j["id"]).collect();
    assert_eq!(ids, vec![&low["id"]]);
}

/// Steps: submit with a request id twice (on different nodes): one job, the
/// second answer is 200 with the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_makes_submit_idempotent() {
    let c = Cluster::start(Opts::default()).await;
    let body = json!({"name": "once", "type": "echo", "requestId": "req-42"});
    let (st1, a) = c.post(1, "/api/jobs", body.clone()).await;
    let (st2, b) = c.post(2, "/api/jobs", body).await;
    assert_eq!((st1, st2), (201, 200), "{a} {b}");
    assert_eq!(a["id"], b["id"]);
    let (_, list) = c.get(3, "/api/jobs").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
}

/// Steps: worker acquires with a 1 s lease and never heartbeats; the leader's
/// lease monitor re-queues the job (Pending, attempt 1 kept, lastError set);
/// a new acquisition gets attempt 2 and a larger token; the first worker's
/// late completion is rejected with 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_requeues_and_fences_the_old_holder() {
    let c = Cluster::start(Opts::default()).await;
    let w = c.register_worker(1, &["sample"], 1).await;
    let job = c.submit(2, "sample", json!({"maxRetries": 2})).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let (_, acq) = c.post(3, "/api/jobs/acquire", json!({"workerId": w, "leaseSeconds": 1})).await;
    let token1 = acq["jobs"][0]["fencingToken"].as_u64().expect("acquired");

    let requeued = common::eventually(Duration::from_secs(15), "lease expiry", || async {
        let (_, j) = c.get(1, &format!("/api/jobs/{id}")).await;
        (j["status"] == "Pending").then_some(j)
    })
    .await;
    assert_eq!(requeued["attempt"], 1);
    assert_eq!(requeued["lastError"], "lease expired");

    let w2 = c.register_worker(2, &["sample"], 1).await;
    let (_, acq2) = c.post(1, "/api/jobs/acquire", json!({"workerId": w2})).await;
    assert_eq!(acq2["jobs"][0]["attempt"], 2);
    let token2 = acq2["jobs"][0]["fencingToken"].as_u64().unwrap();
    assert!(token2 > token1);

    let (st, err) =
        c.post(2, &format!("/api/jobs/{id}/complete"), json!({"fencingToken": token1, "success": true})).await;
    assert_eq!(st, 409, "{err}");
    let (st, _) =
        c.post(3, &format!("/api/jobs/{id}/complete"), json!({"fencingToken": token2, "success": true})).await;
    assert_eq!(st, 200);
}

/// Steps: a failing job with maxRetries 1 fails twice and ends Dead, with a
/// backoff (Failed, runAt in the future) in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_retry_with_backoff_then_die() {
    let c = Cluster::start(Opts::default()).await;
    let w = c.register_worker(1, &["flaky"], 1).await;
    let job = c.submit(1, "flaky", json!({"maxRetries": 1})).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let complete = format!("/api/jobs/{id}/complete");

    let (_, acq) = c.post(2, "/api/jobs/acquire", json!({"workerId": w})).await;
    let t1 = acq["jobs"][0]["fencingToken"].as_u64().unwrap();
    let (st, failed) = c.post(2, &complete, json!({"fencingToken": t1, "success": false, "error": "boom"})).await;
    assert_eq!(st, 200);
    assert_eq!(failed["status"], "Failed");
    assert_eq!(failed["lastError"], "boom");
    // Not acquirable before the backoff passes.
    let (_, none) = c.post(2, "/api/jobs/acquire", json!({"workerId": w})).await;
    assert_eq!(none["jobs"].as_array().unwrap().len(), 0);
    // Long poll until the retry comes due (first backoff is 0.5-1 s).
    let (_, acq) = c.post(3, "/api/jobs/acquire", json!({"workerId": w, "waitSeconds": 10})).await;
    assert_eq!(acq["jobs"][0]["attempt"], 2, "{acq}");
    let t2 = acq["jobs"][0]["fencingToken"].as_u64().unwrap();
    let (_, dead) = c.post(1, &complete, json!({"fencingToken": t2, "success": false, "error": "boom again"})).await;
    assert_eq!(dead["status"], "Dead");
    assert!(dead["completedAt"].is_string());
}

/// Steps: a long poll on a follower is parked; a submit on another node
/// wakes it and hands the job over well before the wait ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_acquire_wakes_on_submit() {
    let c = Cluster::start(Opts::default()).await;
    let w = c.register_worker(1, &["quick"], 1).await;
    let f = c.follower().await;
    let poll = c.post(f, "/api/jobs/acquire", json!({"workerId": w, "waitSeconds": 20}));
    let submit = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.submit(1, "quick", json!({})).await
    };
    let started = std::time::Instant::now();
    let ((st, acq), job) = tokio::join!(poll, submit);
    assert_eq!(st, 200);
    assert_eq!(acq["jobs"][0]["id"], job["id"]);
    assert!(started.elapsed() < Duration::from_secs(10), "long poll did not wake: {:?}", started.elapsed());
}

/// Steps: worker A long-polls through a follower and its client gives up
/// after 1 s (the connection closes); then a job is submitted and worker B
/// asks for it. B must get it: the relayed poll A abandoned must have been
/// cancelled on the leader too, not left waiting to lease the job to a
/// client that is gone (it would sit Running until its lease expired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_long_poll_through_a_follower_takes_no_job() {
    let c = Cluster::start(Opts::default()).await;
    let leader = c.leader(Duration::from_secs(10)).await;
    let f = c.follower().await;
    let a = c.register_worker(leader, &["abandoned"], 1).await;
    let b = c.register_worker(leader, &["abandoned"], 1).await;
    let impatient = reqwest::Client::builder().timeout(Duration::from_secs(1)).build().unwrap();
    let gave_up = impatient
        .post(format!("{}/api/jobs/acquire", c.url(f)))
        .json(&json!({"workerId": a, "waitSeconds": 20}))
        .send()
        .await;
    assert!(gave_up.is_err_and(|e| e.is_timeout()), "the client gave up on its long poll");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let job = c.submit(leader, "abandoned", json!({})).await;
    let (st, acq) = c.post(leader, "/api/jobs/acquire", json!({"workerId": b, "waitSeconds": 5})).await;
    assert_eq!(st, 200, "{acq}");
    assert_eq!(acq["jobs"][0]["id"], job["id"], "worker B got the job: {acq}");
    let (_, view) = c.get(leader, &format!("/api/jobs/{}", job["id"].as_str().unwrap())).await;
    assert_eq!(view["workerId"].as_str(), Some(b.as_str()), "{view}");
}

/// Steps: send each kind of bad input to a follower and to the leader: the
/// status and error code match the table, and the job count is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_json_errors_and_changes_nothing() {
    let c = Cluster::start(Opts::default()).await;
    let leader = c.leader(Duration::from_secs(10)).await;
    let follower = c.follower().await;
    let w = c.register_worker(leader, &["x"], 1).await;
    let big_name = "n".repeat(300);
    let huge = format!("{{\"type\":\"x\",\"payload\":\"{}\"}}", "p".repeat(2 << 20));
    let unknown = uuid::Uuid::new_v4();
    for node in [follower, leader] {
        let complete_unknown = format!("/api/jobs/{unknown}/complete");
        let cases: Vec<(&str, String, u16, &str)> = vec![
            ("/api/jobs", "{not json".into(), 400, "invalid_json"),
            ("/api/jobs", "".into(), 400, "invalid_json"),
            ("/api/jobs", r#"{"type":""}"#.into(), 422, "validation_failed"),
            ("/api/jobs", r#"{"name":"x"}"#.into(), 422, "validation_failed"),
            ("/api/jobs", r#"{"type":"x","maxRetries":-1}"#.into(), 422, "validation_failed"),
            ("/api/jobs", r#"{"type":"x","priority":100000}"#.into(), 422, "validation_failed"),
            ("/api/jobs", format!(r#"{{"type":"x","name":"{big_name}"}}"#), 422, "validation_failed"),
            ("/api/jobs", r#"{"type":"x","maxRetries":"three"}"#.into(), 422, "validation_failed"),
            ("/api/jobs", huge.clone(), 413, "payload_too_large"),
            ("/api/jobs/acquire", format!(r#"{{"workerId":"{w}","maxJobs":0}}"#), 422, "validation_failed"),
            ("/api/jobs/acquire", r#"{"workerId":"nope"}"#.into(), 422, "validation_failed"),
            ("/api/jobs/acquire", format!(r#"{{"workerId":"{unknown}"}}"#), 404, "not_found"),
            (&complete_unknown, r#"{"fencingToken":1}"#.into(), 404, "not_found"),
            ("/api/workers/register", r#"{"name":"w","capacity":-5}"#.into(), 422, "validation_failed"),
        ];
        for (path, body, status, code) in cases {
            let (st, v) = c.post_raw(node, path, body.clone()).await;
            assert_eq!(st, status, "node {node} POST {path} {}: {v}", &body[..body.len().min(60)]);
            assert_eq!(v["error"]["code"], code, "node {node} POST {path}: {v}");
            assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        let (st, v) = c.get(node, &format!("/api/jobs/{unknown}")).await;
        assert_eq!((st, v["error"]["code"].as_str()), (404, Some("not_found")));
        let (st, v) = c.get(node, "/api/jobs/not-a-uuid").await;
        assert_eq!(st, 400, "{v}");
        let (st, v) = c.get(node, "/api/jobs?status=Bogus").await;
        assert_eq!((st, v["error"]["field"].as_str()), (422, Some("status")));
        let (st, _) = c.get(node, "/api/jobs?limit=0").await;
        assert_eq!(st, 422);
    }
    // The field is named for validation errors.
    let (_, v) = c.post_raw(leader, "/api/jobs", r#"{"type":"x","maxRetries":-1}"#).await;
    assert_eq!(v["error"]["field"], "maxRetries");
    // Nothing was created by any of the bad requests, and all nodes are up.
    let (_, list) = c.get(follower, "/api/jobs").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 0, "{list}");
    for node in c.running() {
        let (st, _) = c.get(node, "/health").await;
        assert_eq!(st, 200);
    }
}

/// Open a raw connection to `addr` and ask for a peer stream with the given
/// `Upgrade` header; returns the connection and the answer's status code.
async fn peer_stream_handshake(addr: &str, upgrade: &str) -> (tokio::io::BufReader<tokio::net::TcpStream>, u16) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut io = tokio::io::BufReader::new(tcp);
    let hello =
        format!("GET /raft/stream HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n\r\n");
    io.get_mut().write_all(hello.as_bytes()).await.unwrap();
    let mut status_line = String::new();
    io.read_line(&mut status_line).await.unwrap();
    let status = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status line");
    loop {
        let mut line = String::new();
        io.read_line(&mut line).await.unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    (io, status)
}

/// Send one frame (u32 LE length + body) and read the answer frame; `None`
/// when the node closed the connection instead of answering.
async fn peer_stream_exchange(io: &mut tokio::io::BufReader<tokio::net::TcpStream>, frame: &[u8]) -> Option<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    io.get_mut().write_all(frame).await.ok()?;
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await.ok()?;
    let mut body = vec![0; u32::from_le_bytes(len) as usize];
    io.read_exact(&mut body).await.ok()?;
    Some(body)
}

fn peer_frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// Steps: talk to a follower's peer-stream endpoint (`GET /raft/stream`, the
/// node-to-node transport) by hand: a wrong `Upgrade` header gets 426; a
/// well-formed but stale vote request (term 0) gets a real answer (status 0,
/// not granted, the node's higher term); a relay batch frame gets its
/// item's HTTP answer; an unknown RPC kind, an undecodable append and an
/// undecodable relay batch each get status 1 with a reason and a closed
/// connection; an oversized length prefix gets a closed connection. Then the
/// cluster still elects nothing new, accepts a job, and all nodes agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_stream_endpoint_rejects_bad_frames_and_changes_nothing() {
    let c = Cluster::start(Opts::default()).await;
    let leader = c.leader(Duration::from_secs(10)).await;
    let follower = c.follower().await;
    let before = c.cluster_view(follower).await.expect("cluster view");
    let addr = c.url(follower).trim_start_matches("http://").to_owned();

    let (_, status) = peer_stream_handshake(&addr, "websocket").await;
    assert_eq!(status, 426, "wrong Upgrade header");

    // Vote request (kind 2), wire version 1, bincode: vote {term 0, node 99,
    // committed false}, last_log_id None.
    let (mut io, status) = peer_stream_handshake(&addr, "jobsched-raft/1").await;
    assert_eq!(status, 101);
    let mut vote = vec![2u8, 1];
    vote.extend_from_slice(&0u64.to_le_bytes());
    vote.extend_from_slice(&99u64.to_le_bytes());
    vote.extend_from_slice(&[0, 0]);
    let answer = peer_stream_exchange(&mut io, &peer_frame(&vote)).await.expect("an answer to a stale vote");
    // status 0, wire version 1, Result::Ok (u32 variant 0), VoteResponse { vote: {term, node, committed}, granted, .. }
    assert_eq!(&answer[..6], &[0, 1, 0, 0, 0, 0], "ok answer: {answer:?}");
    let term = u64::from_le_bytes(answer[6..14].try_into().unwrap());
    assert!(term >= 1, "the node answers with its own, higher term: {answer:?}");
    assert_eq!(answer[23], 0, "vote not granted: {answer:?}");
    // The same connection serves the next request.
    let again = peer_stream_exchange(&mut io, &peer_frame(&vote)).await.expect("second answer");
    assert_eq!(&again[..6], &[0, 1, 0, 0, 0, 0]);

    // A relay batch (kind 4, the coordinator's application frame): version 1,
    // one item: method, path, no headers, empty body; each field u32-length
    // prefixed. The answer: status 0, then version 1, one reply: HTTP status
    // u16, headers, body.
    let mut relay = vec![4u8, 1];
    relay.extend_from_slice(&1u32.to_le_bytes());
    for field in [&b"GET"[..], b"/api/jobs?limit=1"] {
        relay.extend_from_slice(&(field.len() as u32).to_le_bytes());
        relay.extend_from_slice(field);
    }
    relay.extend_from_slice(&0u32.to_le_bytes());
    relay.extend_from_slice(&0u32.to_le_bytes());
    let answer = peer_stream_exchange(&mut io, &peer_frame(&relay)).await.expect("an answer to a relay batch");
    assert_eq!(&answer[..6], &[0, 1, 1, 0, 0, 0], "one relayed reply: {answer:?}");
    assert_eq!(u16::from_le_bytes([answer[6], answer[7]]), 200, "GET /api/jobs relayed: {answer:?}");
    assert!(String::from_utf8_lossy(&answer).contains("\"jobs\""), "{}", String::from_utf8_lossy(&answer));

    for (what, body) in
        [("unknown kind", vec![9u8, 1, 0]), ("bad append", vec![1u8, 1, 0xff, 0xff]), ("bad relay batch", vec![4u8, 7])]
    {
        let (mut io, _) = peer_stream_handshake(&addr, "jobsched-raft/1").await;
        let answer = peer_stream_exchange(&mut io, &peer_frame(&body)).await.expect(what);
        assert_eq!(answer[0], 1, "{what}: error status");
        assert!(!String::from_utf8_lossy(&answer[1..]).is_empty(), "{what}: a reason");
        assert!(peer_stream_exchange(&mut io, &peer_frame(&vote)).await.is_none(), "{what}: connection closed");
    }
    let (mut io, _) = peer_stream_handshake(&addr, "jobsched-raft/1").await;
    assert!(peer_stream_exchange(&mut io, &u32::MAX.to_le_bytes()).await.is_none(), "oversized frame: closed");

    let job = c.submit(follower, "x", serde_json::json!({})).await;
    let id = job["id"].as_str().unwrap().to_owned();
    for node in c.running() {
        let (st, v) = c.get(node, &format!("/api/jobs/{id}")).await;
        assert_eq!(st, 200, "node {node}: {v}");
    }
    let after = c.cluster_view(follower).await.expect("cluster view");
    assert_eq!(c.leader(Duration::from_secs(10)).await, leader, "no leader change");
    assert_eq!(before["term"], after["term"], "no new term: {before} {after}");
    c.assert_digests_equal().await;
}

/// Steps: /health, /ready, /api/cluster and the OpenAPI document answer on
/// every node; exactly one node says Leader; the Swagger UI page loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_endpoints_and_swagger() {
    let c = Cluster::start(Opts::default()).await;
    let mut leaders = 0;
    for node in c.running() {
        let (st, v) = c.get(node, "/api/cluster").await;
        assert_eq!(st, 200);
        assert_eq!(v["members"].as_array().unwrap().len(), 3);
        leaders += usize::from(v["role"] == "Leader");
        let (st, _) = c.get(node, "/ready").await;
        assert_eq!(st, 200);
        let (st, doc) = c.get(node, "/api-docs/openapi.json").await;
        assert_eq!(st, 200);
        assert!(doc["paths"]["/api/jobs"].is_object());
    }
    assert_eq!(leaders, 1);
    let page = c.http.get(format!("{}/swagger/", c.url(1))).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("swagger"));
}

/// Steps: batch-submit 3 jobs (with request ids) on a follower: 201, created
/// 3, in order, all Pending and stamped with the same time (one Raft entry),
/// their ids UUID v7 increasing in item order and below a later submit's;
/// the same batch again: 200, created 0, the same ids; a batch with one
/// invalid item is refused as a whole with the item named in `field`, and
/// creates nothing; an empty batch is 422. Then acquire all three and report
/// them in one batched completion where one token is wrong: two Completed,
/// one `stale_token` error, and that job is still Running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_submit_and_batched_completions() {
    let c = Cluster::start(Opts::default()).await;
    let f = c.follower().await;
    let batch = json!({"jobs": [
        {"type": "sample", "name": "a", "requestId": "batch-a", "priority": 3},
        {"type": "sample", "name": "b", "requestId": "batch-b"},
        {"type": "sample", "name": "c", "requestId": "batch-c", "payload": {"k": 1}},
    ]});
    let (st, first) = c.post(f, "/api/jobs/batch", batch.clone()).await;
    assert_eq!(st, 201, "{first}");
    assert_eq!(first["created"], 3);
    let jobs = first["jobs"].as_array().unwrap();
    let names: Vec<&str> = jobs.iter().map(|j| j["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert!(jobs.iter().all(|j| j["status"] == "Pending"));
    assert!(jobs.iter().all(|j| j["createdAt"] == jobs[0]["createdAt"]), "one entry, one leader time: {first}");
    assert_eq!(jobs[2]["payload"], json!({"k": 1}));
    // Ids are time-ordered (UUID v7), increasing in submission order, so the
    // records of jobs submitted together are stored together.
    let uuid_of = |j: &Value| uuid::Uuid::parse_str(j["id"].as_str().unwrap()).unwrap();
    let batch_ids: Vec<uuid::Uuid> = jobs.iter().map(uuid_of).collect();
    assert!(batch_ids.iter().all(|id| id.get_version_num() == 7), "{batch_ids:?}");
    assert!(batch_ids.windows(2).all(|w| w[0] < w[1]), "not in item order: {batch_ids:?}");
    let (st, later) = c.post(f, "/api/jobs", json!({"type": "other"})).await;
    assert_eq!(st, 201, "{later}");
    assert!(uuid_of(&later) > batch_ids[2], "a later submit sorts after the batch: {later}");

    let (st, retry) = c.post(c.running()[0], "/api/jobs/batch", batch).await;
    assert_eq!(st, 200, "{retry}");
    assert_eq!(retry["created"], 0);
    let ids = |v: &Value| v["jobs"].as_array().unwrap().iter().map(|j| j["id"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(&retry), ids(&first));

    let (st, bad) =
        c.post(f, "/api/jobs/batch", json!({"jobs": [{"type": "sample"}, {"type": "sample", "priority": 5000}]})).await;
    assert_eq!(st, 422, "{bad}");
    assert_eq!(bad["error"]["field"], "jobs[1].priority");
    let (st, empty) = c.post(f, "/api/jobs/batch", json!({"jobs": []})).await;
    assert_eq!(st, 422, "{empty}");
    let (_, all) = c.get(f, "/api/jobs?limit=100").await;
    assert_eq!(all["jobs"].as_array().unwrap().len(), 4, "refused batches created nothing: {all}");

    let worker = c.register_worker(f, &["sample"], 10).await;
    let (st, acq) = c.post(f, "/api/jobs/acquire", json!({"workerId": worker, "maxJobs": 3})).await;
    assert_eq!(st, 200, "{acq}");
    let held = acq["jobs"].as_array().unwrap();
    assert_eq!(held.len(), 3);
    let token = |j: &Value| j["fencingToken"].as_u64().unwrap();
    let (st, done) = c
        .post(
            f,
            "/api/jobs/complete",
            json!({"completions": [
                {"jobId": held[0]["id"], "fencingToken": token(&held[0]), "result": {"n": 0}},
                {"jobId": held[1]["id"], "fencingToken": token(&held[1]) + 1000},
                {"jobId": held[2]["id"], "fencingToken": token(&held[2]), "success": false, "error": "boom"},
            ]}),
        )
        .await;
    assert_eq!(st, 200, "{done}");
    let results = done["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["jobId"], held[0]["id"]);
    assert_eq!(results[0]["job"]["status"], "Completed");
    assert_eq!(results[0]["job"]["result"], json!({"n": 0}));
    assert_eq!(results[1]["error"]["code"], "stale_token", "{done}");
    assert!(results[1]["job"].is_null());
    assert_eq!(results[2]["job"]["status"], "Failed");
    assert_eq!(results[2]["job"]["lastError"], "boom");
    let (_, still) = c.get(f, &format!("/api/jobs/{}", held[1]["id"].as_str().unwrap())).await;
    assert_eq!(still["status"], "Running", "a refused item changes nothing: {still}");

    let (st, bad) =
        c.post(f, "/api/jobs/complete", json!({"completions": [{"jobId": "nope", "fencingToken": 1}]})).await;
    assert!(st == 400 || st == 422, "{st} {bad}");
    c.assert_digests_equal().await;
}

/// Steps: pipe 2500 JSON lines into `jobsched submit-batch -` (3 requests of
/// at most 1000); it prints created 2500 and the jobs in input order; the
/// cluster lists them all; running it again with the same request ids
/// creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_submit_batch_from_json_lines() {
    use std::io::Write;
    let c = Cluster::start(Opts::default()).await;
    let coordinators = c.running().iter().map(|&n| c.url(n)).collect::<Vec<_>>().join(",");
    let lines: String =
        (0..2500).map(|i| format!("{{\"type\":\"echo\",\"payload\":{i},\"requestId\":\"cli-{i}\"}}\n")).collect();
    let run = || {
        let mut child = std::process::Command::new(common::bin("jobsched"))
            .args(["--coordinators", &coordinators, "submit-batch", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start jobsched");
        child.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "jobsched submit-batch failed");
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let first = tokio::task::block_in_place(run);
    assert_eq!(first["created"], 2500);
    let jobs = first["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2500);
    assert!(jobs.iter().enumerate().all(|(i, j)| j["payload"] == i), "input order kept");
    let (_, page) = c.get(c.running()[1], "/api/jobs?status=Pending&limit=1000").await;
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1000);
    assert!(page["nextCursor"].is_string());
    // `seq` is the submission order and a cursor: listing after job 1000's
    // seq starts at job 1001.
    let seqs: Vec<u64> = jobs.iter().map(|j| j["seq"].as_u64().expect("seq")).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seq increases in input order");
    let (st, after) = c.get(c.running()[1], &format!("/api/jobs?cursor={}&limit=10", seqs[999])).await;
    assert_eq!(st, 200, "{after}");
    assert_eq!(after["jobs"][0]["id"], jobs[1000]["id"]);
    assert_eq!(after["jobs"][0]["seq"], seqs[1000]);
    let again = tokio::task::block_in_place(run);
    assert_eq!(again["created"], 0);
}
