//! The client's retry and failover rules against real local HTTP stubs (not
//! the coordinator: these test the client's side of the protocol only).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use jobsched_client::{AcquireRequest, Client, ClientError, CompleteRequest, CreateJobRequest};
use serde_json::{json, Value};
use uuid::Uuid;

/// What a stub node answers, in order; the last entry repeats.
#[derive(Clone)]
enum Reply {
    Json(u16, Value),
    /// Hold the request this long, then answer 200 with the value.
    Slow(Duration, Value),
}

struct Stub {
    script: Mutex<VecDeque<Reply>>,
    seen: Mutex<Vec<(Method, String, Value)>>,
}

impl Stub {
    fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
    fn bodies(&self) -> Vec<Value> {
        self.seen.lock().unwrap().iter().map(|(_, _, b)| b.clone()).collect()
    }
}

async fn answer(State(stub): State<Arc<Stub>>, method: Method, uri: Uri, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    stub.seen.lock().unwrap().push((method, uri.to_string(), body));
    let reply = {
        let mut s = stub.script.lock().unwrap();
        if s.len() > 1 {
            s.pop_front().unwrap()
        } else {
            s.front().cloned().unwrap()
        }
    };
    match reply {
        Reply::Json(status, v) => (StatusCode::from_u16(status).unwrap(), axum::Json(v)).into_response(),
        Reply::Slow(d, v) => {
            tokio::time::sleep(d).await;
            axum::Json(v).into_response()
        }
    }
}

async fn stub(replies: Vec<Reply>) -> (String, Arc<Stub>) {
    let state = Arc::new(Stub { script: Mutex::new(replies.into()), seen: Mutex::new(Vec::new()) });
    let app = Router::new().fallback(answer).with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), state)
}

/// An address nothing listens on (bound, then closed).
async fn dead_node() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

fn no_leader(leader: Option<&str>) -> Reply {
    let mut e = json!({"error": {"code": "no_leader", "message": "election in progress"}});
    if let Some(l) = leader {
        e["error"]["leader"] = json!(l);
    }
    Reply::Json(503, e)
}

fn cluster_view() -> Value {
    json!({"nodeId": 1, "role": "Leader", "leaderId": 1, "term": 3, "members": []})
}

fn job_view(request_id: &str) -> Value {
    json!({
        "id": Uuid::new_v4(), "name": "n", "type": "echo", "payload": {}, "priority": 0, "maxRetries": 3,
        "attempt": 0, "status": "Pending", "workerId": null, "fencingToken": null, "leaseExpiresAt": null,
        "runAt": "2024-01-01T00:00:00Z", "timeoutSeconds": null, "createdAt": "2024-01-01T00:00:00Z",
        "startedAt": null, "completedAt": null, "updatedAt": "2024-01-01T00:00:00Z", "lastError": null,
        "result": null, "requestId": request_id
    })
}

fn client(nodes: &[&str]) -> Client {
    Client::builder()
        .coordinators(nodes)
        .request_timeout(Duration::from_secs(2))
        .retry_budget(Duration::from_secs(5))
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .build()
        .unwrap()
}

#[tokio::test]
async fn fails_over_past_a_dead_node_and_a_503_and_remembers_the_node() {
    // Steps: nodes = [closed port, stub answering 503 then 200]; a read
    // succeeds via retries; the stub becomes the preferred node.
    let dead = dead_node().await;
    let (url, node) = stub(vec![no_leader(None), Reply::Json(200, cluster_view())]).await;
    let c = client(&[&dead, &url]);

    let view = c.cluster().await.unwrap();
    assert_eq!(view.term, 3);
    // dead (refused) -> stub 503 -> (round over, backoff) dead -> stub 200
    assert_eq!(node.hits(), 2);
    assert_eq!(c.preferred_node(), url);

    // The next call starts at the node that worked: one hit, no detour.
    c.cluster().await.unwrap();
    assert_eq!(node.hits(), 3);
}

#[tokio::test]
async fn submit_retries_with_one_generated_request_id() {
    // Steps: node A answers 503, node B 201; the submit lands on B with the
    // same generated requestId A saw; a caller-given id is sent unchanged.
    let (a, node_a) = stub(vec![no_leader(None)]).await;
    let (b, node_b) = stub(vec![Reply::Json(201, job_view("x"))]).await;
    let c = client(&[&a, &b]);

    let submitted = c.submit(CreateJobRequest { job_type: "echo".into(), ..Default::default() }).await.unwrap();
    assert!(submitted.created);
    let first = node_a.bodies()[0]["requestId"].as_str().unwrap().to_owned();
    let second = node_b.bodies()[0]["requestId"].as_str().unwrap().to_owned();
    assert_eq!(first, second, "a retried submit carries the same request id");
    assert!(Uuid::parse_str(&first).is_ok(), "generated ids are UUIDs: {first}");

    // A caller's id is kept; a 200 means an earlier submit matched.
    let (c_url, node_c) = stub(vec![Reply::Json(200, job_view("mine"))]).await;
    let submitted = client(&[&c_url])
        .submit(CreateJobRequest { job_type: "echo".into(), request_id: Some("mine".into()), ..Default::default() })
        .await
        .unwrap();
    assert!(!submitted.created);
    assert_eq!(node_c.bodies()[0]["requestId"], "mine");
}

#[tokio::test]
async fn acquire_is_not_repeated_after_an_ambiguous_failure() {
    // Steps: acquire against a 500 node, then a hanging node: each error is
    // returned without trying the healthy node; against a closed port and a
    // no_leader node it is retried and reaches the healthy node.
    let acquire = AcquireRequest {
        worker_id: Uuid::new_v4(),
        job_types: None,
        max_jobs: Some(1),
        lease_seconds: None,
        wait_seconds: Some(0.0),
    };

    // A 500 may come after the acquisition was applied: no retry.
    let (a, node_a) = stub(vec![Reply::Json(500, json!({"error": {"code": "internal", "message": "x"}}))]).await;
    let (b, node_b) = stub(vec![Reply::Json(200, json!({"jobs": []}))]).await;
    let err = client(&[&a, &b]).acquire(&acquire).await.unwrap_err();
    assert_eq!(err.status(), Some(500));
    assert_eq!((node_a.hits(), node_b.hits()), (1, 0));

    // A timeout leaves the outcome unknown: no retry either.
    let (slow, node_slow) = stub(vec![Reply::Slow(Duration::from_secs(10), json!({"jobs": []}))]).await;
    let c = Client::builder().coordinators([&slow, &b]).request_timeout(Duration::from_millis(300)).build().unwrap();
    let err = c.acquire(&acquire).await.unwrap_err();
    assert!(matches!(err, ClientError::Uncertain { .. }), "{err:?}");
    assert_eq!((node_slow.hits(), node_b.hits()), (1, 0));

    // Refused connections and no_leader prove nothing happened: retried.
    let dead = dead_node().await;
    let (nl, node_nl) = stub(vec![no_leader(None)]).await;
    let resp = client(&[&dead, &nl, &b]).acquire(&acquire).await.unwrap();
    assert!(resp.jobs.is_empty());
    assert_eq!((node_nl.hits(), node_b.hits()), (1, 1));
}

#[tokio::test]
async fn idempotent_calls_move_on_after_a_timeout() {
    // Steps: first node hangs; a read times out there and succeeds on the second.
    let (slow, node_slow) = stub(vec![Reply::Slow(Duration::from_secs(10), cluster_view())]).await;
    let (fast, node_fast) = stub(vec![Reply::Json(200, cluster_view())]).await;
    let c = Client::builder().coordinators([&slow, &fast]).request_timeout(Duration::from_millis(300)).build().unwrap();
    let started = Instant::now();
    c.cluster().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!((node_slow.hits(), node_fast.hits()), (1, 1));
}

#[tokio::test]
async fn api_errors_are_returned_at_once() {
    // Steps: a 409 stale_token on complete is returned as is, no other node tried.
    let (a, node_a) =
        stub(vec![Reply::Json(409, json!({"error": {"code": "stale_token", "message": "lease moved on"}}))]).await;
    let (b, node_b) = stub(vec![Reply::Json(200, json!({}))]).await;
    let req = CompleteRequest { fencing_token: 7, worker_id: None, success: true, result: None, error: None };
    let err = client(&[&a, &b]).complete(Uuid::new_v4(), &req).await.unwrap_err();
    assert!(err.is_stale_token(), "{err:?}");
    assert_eq!((node_a.hits(), node_b.hits()), (1, 0));
    assert_eq!(node_a.bodies()[0]["fencingToken"], 7);
}

#[tokio::test]
async fn gives_up_when_the_budget_is_spent() {
    // Steps: every node fails; the call ends with Unavailable near the budget.
    let (a, _) = stub(vec![no_leader(None)]).await;
    let dead = dead_node().await;
    let c = Client::builder()
        .coordinators([&a, &dead])
        .retry_budget(Duration::from_millis(400))
        .backoff(Duration::from_millis(20), Duration::from_millis(100))
        .build()
        .unwrap();
    let started = Instant::now();
    let err = c.cluster().await.unwrap_err();
    let elapsed = started.elapsed();
    match err {
        ClientError::Unavailable { attempts, .. } => assert!(attempts >= 4, "{attempts}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}

#[tokio::test]
async fn follows_the_leader_hint() {
    // Steps: nodes [A, C, B]; A answers no_leader naming B; the retry skips C.
    let (b, node_b) = stub(vec![Reply::Json(200, cluster_view())]).await;
    let hint = b.trim_start_matches("http://").to_owned();
    let (a, node_a) = stub(vec![no_leader(Some(&hint))]).await;
    let (c_url, node_c) = stub(vec![Reply::Json(200, cluster_view())]).await;
    client(&[&a, &c_url, &b]).cluster().await.unwrap();
    assert_eq!((node_a.hits(), node_c.hits(), node_b.hits()), (1, 0, 1));
}

#[tokio::test]
async fn decodes_paths_and_queries() {
    // Steps: list with every filter and check the query string; a 2xx with
    // an unexpected body is a Decode error.
    let (a, node) = stub(vec![Reply::Json(200, json!({"jobs": [], "nextCursor": null}))]).await;
    let c = client(&[&a]);
    let list = c
        .list_jobs(&jobsched_client::ListJobs {
            status: Some("Pending".into()),
            limit: Some(5),
            cursor: Some("a b".into()),
            stale: true,
        })
        .await
        .unwrap();
    assert!(list.jobs.is_empty());
    let (method, uri, _) = node.seen.lock().unwrap()[0].clone();
    assert_eq!(method, Method::GET);
    assert_eq!(uri, "/api/jobs?status=Pending&limit=5&cursor=a+b&stale=true");

    // A 2xx with a body of the wrong shape is a decode error.
    let err = c.get_job(Uuid::new_v4()).await.unwrap_err();
    assert!(matches!(err, ClientError::Decode { .. }), "{err:?}");
}
