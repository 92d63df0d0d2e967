//! An in-process 3-node cluster over real sockets (axum on port 0) and real
//! RocksDB, using only this crate's public API, as the coordinator would.
//!
//! Steps:
//! 1. Reserve three ports; start nodes 1 and 2 (node 3 stays down).
//! 2. Initialize the cluster with all three members on node 1; wait for a
//!    leader (1 and 2 form a quorum).
//! 3. Write 60 batches through the leader's `client_write`; check outcomes,
//!    including an idempotent retry by request id.
//! 4. Wait until the leader has built a snapshot and purged its log, so a new
//!    member can only catch up from a snapshot.
//! 5. Start node 3; wait until it has applied everything (it must receive the
//!    snapshot over `/raft/snapshot`), then check that all three nodes report
//!    the same (applied index, digest, key count).
//! 6. Transport: nodes 1 and 2 serve peer streams and must have used only
//!    them between each other; node 3 plays a build without peer streams and
//!    must have been reached over the per-RPC POST endpoints.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use jobsched_core::{Batch, Command, JobSpec, Outcome};
use jobsched_raft::peer_stream::StreamPool;
use jobsched_raft::{
    handle_append, handle_snapshot, handle_vote, initialize_cluster, open_stores, peer_stream, raft_config, BasicNode,
    ElectionTiming, Elector, Network, Raft, SmKv, WireError, PATH_PREVOTE,
};
use tempfile::TempDir;
use tokio::sync::watch;
use uuid::Uuid;

struct TestNode {
    raft: Raft,
    kv: SmKv,
    server: tokio::task::JoinHandle<()>,
    peer: Arc<Peer>,
    stop: watch::Sender<bool>,
    dir: TempDir,
}

fn wire(res: Result<Vec<u8>, WireError>) -> Response {
    match res {
        Ok(body) => (StatusCode::OK, body).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

/// What a test node's HTTP handlers share, with counters of what was used.
struct Peer {
    raft: Raft,
    elector: Arc<Elector>,
    stopping: watch::Receiver<bool>,
    http_appends: AtomicUsize,
    http_snapshots: AtomicUsize,
    streams_accepted: AtomicUsize,
}

type Shared = State<Arc<Peer>>;

async fn append(State(p): Shared, body: Bytes) -> Response {
    p.http_appends.fetch_add(1, Ordering::Relaxed);
    wire(handle_append(&p.raft, &body).await)
}

async fn vote(State(p): Shared, body: Bytes) -> Response {
    wire(handle_vote(&p.raft, &body).await)
}

async fn snapshot(State(p): Shared, body: Bytes) -> Response {
    p.http_snapshots.fetch_add(1, Ordering::Relaxed);
    wire(handle_snapshot(&p.raft, &body).await)
}

async fn prevote(State(p): Shared, body: Bytes) -> Response {
    wire(p.elector.handle_prevote(&body).await)
}

async fn stream(State(p): Shared, mut req: axum::extract::Request) -> Response {
    p.streams_accepted.fetch_add(1, Ordering::Relaxed);
    peer_stream::accept_upgrade(&p.raft, &p.stopping, None, &mut req)
        .map(|()| axum::body::Body::empty())
        .into_response()
}

/// Start a node. `streams`: serve `GET /raft/stream` (false plays a build
/// that predates peer streams: peers must fall back to the POST endpoints).
async fn start_node(id: u64, addr: SocketAddr, client: reqwest::Client, streams: bool) -> TestNode {
    let dir = TempDir::new().unwrap();
    let (log, sm) = open_stores(dir.path()).unwrap();
    let kv = sm.kv();
    // Keep no log behind a snapshot, so node 3 needs the snapshot.
    let mut config = raft_config(50, 300, 600, 20, 0).unwrap();
    config.purge_batch_size = 1;
    let raft =
        Raft::new(id, Arc::new(config), Network::new(client.clone(), Arc::new(StreamPool::new(None))), log.clone(), sm)
            .await
            .unwrap();
    let timing = ElectionTiming::new(Duration::from_millis(300), Duration::from_millis(600));
    let elector = Elector::new(id, raft.clone(), log, client, timing, true);
    tokio::spawn(elector.clone().run());
    let (stop, stopping) = watch::channel(false);
    let peer = Arc::new(Peer {
        raft: raft.clone(),
        elector,
        stopping,
        http_appends: AtomicUsize::new(0),
        http_snapshots: AtomicUsize::new(0),
        streams_accepted: AtomicUsize::new(0),
    });
    let mut app = Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .route(PATH_PREVOTE, post(prevote));
    if streams {
        app = app.route(peer_stream::PATH_STREAM, get(stream));
    }
    let app = app.layer(DefaultBodyLimit::disable()).with_state(peer.clone());
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    TestNode { raft, kv, server, peer, stop, dir }
}

fn spec(i: u64) -> JobSpec {
    JobSpec {
        name: format!("job-{i}"),
        job_type: "t".into(),
        payload: format!("{{\"i\":{i}}}"),
        priority: (i % 3) as i32,
        max_retries: 1,
        timeout_ms: None,
        run_at: None,
    }
}

fn submit(i: u64, request_id: &str) -> Batch {
    Batch {
        now_ms: 1_700_000_000_000 + i as i64,
        commands: vec![Command::SubmitJob {
            job_id: Uuid::from_u128(u128::from(i)),
            request_id: Some(request_id.into()),
            spec: spec(i),
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_replicate_and_catch_up_by_snapshot() {
    let client = reqwest::Client::new();
    let mut addrs = Vec::new();
    for _ in 0..3 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        addrs.push(l.local_addr().unwrap());
    } // listeners dropped: the ports are free again until the nodes bind them

    let n1 = start_node(1, addrs[0], client.clone(), true).await;
    let n2 = start_node(2, addrs[1], client.clone(), true).await;
    let members: BTreeMap<u64, BasicNode> =
        (1..=3).map(|i| (i, BasicNode::new(addrs[i as usize - 1].to_string()))).collect();
    initialize_cluster(&n1.raft, members.clone()).await.unwrap();
    // Idempotent on restart / on another member.
    initialize_cluster(&n1.raft, members.clone()).await.unwrap();

    let m = n1
        .raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.current_leader.is_some(), "leader elected")
        .await
        .unwrap();
    let leader = match m.current_leader {
        Some(1) => &n1,
        Some(2) => &n2,
        other => panic!("unexpected leader {other:?}"),
    };

    for i in 1..=60u64 {
        let resp = leader.raft.client_write(submit(i, &format!("r{i}"))).await.unwrap();
        match &resp.data[..] {
            [Outcome::Submitted { job, created: true }] => assert_eq!(job.spec.name, format!("job-{i}")),
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    // A retry with the same request id returns the first job, creates nothing.
    let resp = leader.raft.client_write(submit(61, "r5")).await.unwrap();
    match &resp.data[..] {
        [Outcome::Submitted { job, created: false }] => assert_eq!(job.id, Uuid::from_u128(5)),
        other => panic!("unexpected outcome {other:?}"),
    }

    let last = resp.log_id.index;
    leader
        .raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= 40) && m.purged.is_some_and(|p| p.index >= 40),
            "leader snapshotted and purged",
        )
        .await
        .unwrap();

    let n3 = start_node(3, addrs[2], client.clone(), false).await;
    n3.raft.wait(Some(Duration::from_secs(20))).applied_index_at_least(Some(last), "node 3 caught up").await.unwrap();
    let m3 = n3.raft.metrics().borrow().clone();
    assert!(m3.snapshot.is_some(), "node 3 caught up from a snapshot: {m3:?}");
    let files: Vec<String> = std::fs::read_dir(n3.dir.path().join("snapshots"))
        .unwrap()
        .map(|d| d.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(files.len() == 1 && files[0].ends_with(".snap"), "one installed snapshot, no leftovers: {files:?}");

    for n in [&n1, &n2] {
        n.raft.wait(Some(Duration::from_secs(10))).applied_index_at_least(Some(last), "applied").await.unwrap();
    }
    let digests: Vec<_> = [&n1, &n2, &n3].iter().map(|n| n.kv.digest().unwrap()).collect();
    assert_eq!(digests[0], digests[1]);
    assert_eq!(digests[0], digests[2]);
    assert!(digests[0].0 >= Some(last));

    // Transport: nodes 1 and 2 talk over peer streams only; node 3 (no
    // stream endpoint) was reached over the POST endpoints, snapshot included.
    let follower = if std::ptr::eq(leader, &n1) { &n2 } else { &n1 };
    let count = |n: &TestNode, c: fn(&Peer) -> &AtomicUsize| c(&n.peer).load(Ordering::Relaxed);
    assert!(count(follower, |p| &p.streams_accepted) >= 1, "the follower accepted a peer stream");
    assert_eq!(count(follower, |p| &p.http_appends), 0, "no HTTP appends between stream-speaking nodes");
    assert!(count(&n3, |p| &p.http_appends) >= 1, "node 3 got appends over HTTP");
    assert!(count(&n3, |p| &p.http_snapshots) >= 1, "node 3 got the snapshot over HTTP");

    for n in [n1, n2, n3] {
        n.raft.shutdown().await.unwrap();
        let _ = n.stop.send(true);
        n.server.abort();
    }
}
