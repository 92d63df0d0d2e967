//! One coordinator node: opens storage, starts Raft, the HTTP server and the
//! leader monitors, and shuts them down in order.
//!
//! [`Node`] is the shared application state handed to every HTTP handler.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use jobsched_core::{Batch, Command, Outcome};
use jobsched_core::{KvError, KvRead, Reader};
use jobsched_raft::{Raft, SmKv, TypeConfig};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::http::error::ApiError;
use crate::proposer::{Clock, ProposeError, Proposer};

/// What the HTTP layer and the monitors share.
pub struct Node {
    pub id: u64,
    pub addr: String,
    pub config: Config,
    pub raft: Raft,
    /// Read access to the local state machine (consistent snapshots).
    pub sm: SmKv,
    /// Last applied log index; bumped after every apply (wakes long polls).
    pub applied: watch::Receiver<u64>,
    pub proposer: Proposer,
    /// One HTTP client per process: Raft RPCs and forwarding share its pool.
    pub http: reqwest::Client,
    /// Decides when this node campaigns and answers pre-votes (see
    /// `jobsched_raft::election`).
    pub elector: Arc<jobsched_raft::Elector>,
    /// Queues this node's relays to the leader into batches.
    pub relays: crate::http::relay_batch::RelayBatcher,
    pub clock: Clock,
    /// Flips to true when the node starts shutting down (ends long polls).
    pub stopping: watch::Receiver<bool>,
    /// Leadership as this node sees it; changes only when it changes.
    leader: watch::Receiver<Leadership>,
    /// True while this node is a leader out of touch with its quorum.
    out_of_touch: watch::Receiver<bool>,
}

pub type SharedNode = Arc<Node>;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("forward to leader {leader_addr:?}")]
    ForwardToLeader { leader_addr: Option<String> },
    #[error("{0}")]
    Other(String),
}

/// Propose a batch and return one outcome per command.
pub async fn client_write(raft: &Raft, batch: Batch) -> Result<Vec<Outcome>, WriteError> {
    match raft.client_write(batch).await {
        Ok(resp) => Ok(resp.data),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Err(WriteError::ForwardToLeader { leader_addr: f.leader_node.map(|n| n.addr) })
        }
        Err(e) => Err(WriteError::Other(e.to_string())),
    }
}

/// Who leads, as far as this node knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leadership {
    Me,
    Other { id: u64, addr: String },
    Unknown,
}

impl Node {
    /// Run queries against one consistent point-in-time view of the local
    /// state machine (no apply can interleave between its reads).
    pub fn read<R>(
        &self,
        f: impl for<'a> FnOnce(Reader<'a, dyn KvRead + 'a>) -> Result<R, KvError>,
    ) -> Result<R, ApiError> {
        match self.sm.read_consistent(|kv| f(Reader::new(kv))) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) | Err(e) => Err(ApiError::Internal(e.to_string())),
        }
    }

    /// Run queries against the live local state machine, without taking a
    /// RocksDB snapshot: each read sees whole apply steps, but two reads may
    /// straddle one (and during a snapshot install they may see part of it).
    /// Only for checks whose answer is only a hint that `apply` re-checks,
    /// such as "might a job be ready?" before proposing an acquire: those run
    /// on every acquire call and every wake-up of a long poll, and the
    /// snapshot and its two metadata reads cost as much as the check itself.
    pub fn peek<R>(&self, f: impl FnOnce(Reader<'_, SmKv>) -> Result<R, KvError>) -> Result<R, ApiError> {
        f(Reader::new(&self.sm)).map_err(|e| ApiError::Internal(e.to_string()))
    }

    pub fn now(&self) -> i64 {
        (self.clock)()
    }

    /// Who leads, as far as this node knows (see [`track_leadership`]).
    ///
    /// Read from Raft's metrics at the call, not from the watch: the watch
    /// task may not have run yet after a change (e.g. just after this node
    /// resumed from a pause), and a stale "me" would send a request down the
    /// leader path of a node that is no longer leader.
    pub fn leadership(&self) -> Leadership {
        leadership_in(self.id, &self.raft.metrics().borrow())
    }

    /// A receiver that wakes only when [`Node::leadership`] changes.
    pub fn leadership_changes(&self) -> watch::Receiver<Leadership> {
        self.leader.clone()
    }

    /// Wait up to `max` for some leader to be known (elections take a moment;
    /// waiting here turns a failover into latency instead of an error).
    pub async fn wait_for_leader(&self, max: Duration) -> Leadership {
        let mut rx = self.leader.clone();
        let found = tokio::time::timeout(max, async {
            loop {
                let l = self.leadership();
                if l != Leadership::Unknown {
                    return l;
                }
                if rx.changed().await.is_err() {
                    return Leadership::Unknown;
                }
            }
        })
        .await;
        found.unwrap_or(Leadership::Unknown)
    }

    pub fn members(&self) -> BTreeMap<u64, String> {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.membership_config.membership().nodes().map(|(id, n)| (*id, n.addr.clone())).collect()
    }

    /// Is this node a leader that has heard from no quorum for more than
    /// twice the election timeout? (See [`track_leadership`] for the rule.)
    pub fn leader_out_of_touch(&self) -> bool {
        out_of_touch_in(self.config.election_max_ms, &self.raft.metrics().borrow())
    }

    /// Resolves once [`Node::leader_out_of_touch`] holds (never, if it never
    /// does).
    async fn out_of_touch(&self) {
        let mut rx = self.out_of_touch.clone();
        if rx.wait_for(|o| *o).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Propose a command; business rejections become API errors.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, ApiError> {
        let mut outcomes = self.propose_all(vec![cmd]).await?;
        match outcomes.pop() {
            Some(Outcome::Rejected(r)) => Err(r.into()),
            Some(o) => Ok(o),
            None => Err(ApiError::Internal("no outcome".into())),
        }
    }

    /// Propose several commands in one Raft entry. Each command's business
    /// rejection stays in its slot (`Outcome::Rejected`) for the caller to
    /// report per item; only failures of the whole entry are errors.
    ///
    /// A leader that loses touch with its quorum while the entry is pending
    /// answers `Timeout` at once (outcome unknown: the entry may still commit
    /// if the partition heals first), so clients can retry elsewhere.
    pub async fn propose_all(&self, cmds: Vec<Command>) -> Result<Vec<Outcome>, ApiError> {
        let result = tokio::select! {
            r = self.proposer.propose_all(cmds) => r,
            _ = self.out_of_touch() => return Err(ApiError::Timeout),
        };
        match result {
            Ok(o) => Ok(o),
            Err(ProposeError::NotLeader { leader }) => Err(ApiError::NotLeader { leader }),
            Err(ProposeError::Timeout) => Err(ApiError::Timeout),
            Err(ProposeError::Fatal(m)) => Err(ApiError::Internal(m)),
        }
    }

    /// Make the next local read linearizable: confirms leadership with a
    /// quorum and waits until the state machine has applied up to the commit
    /// index seen at that moment.
    pub async fn linearizable_barrier(&self) -> Result<(), ApiError> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(ApiError::NotLeader { leader: f.leader_node.map(|n| n.addr) })
            }
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::QuorumNotEnough(_))) => {
                Err(ApiError::NoLeader { leader: None })
            }
            Err(e) => Err(ApiError::Internal(e.to_string())),
        }
    }
}

/// Publishes who leads and whether this leader is out of touch, from Raft's
/// metrics, into two watches that change only when the answer changes.
///
/// Why a task of its own: openraft republishes its metrics on every turn of
/// its loop (every append, commit and heartbeat: thousands of times a second
/// under load). Requests waiting on a leader change (relays, proposals
/// guarding against a partitioned leader) used to watch the metrics directly
/// and were all woken, to find nothing changed, on every one of those turns:
/// ~5% of a busy leader's CPU at 64 connections. Now one task takes those
/// wake-ups and the waiters only wake for a real change.
///
/// Out of touch: a leader that has heard from no quorum for more than twice
/// the election timeout. Followers that stopped hearing from it start an
/// election after at most election_max_ms plus a random election timeout, so
/// by then it has almost surely been replaced (a partitioned old leader).
/// openraft 0.9 has no check-quorum step-down: without this, its requests
/// would wait out `propose_timeout_ms`. Twice the timeout keeps a slow but
/// healthy leader (heartbeat replies late under load) from refusing work. A
/// single-voter cluster is its own quorum and never out of touch. Metrics
/// are refreshed on every turn of openraft's loop, which its heartbeat timer
/// drives, so the flag flips within a tick.
async fn track_leadership(
    id: u64,
    raft: Raft,
    election_max_ms: u64,
    leader: watch::Sender<Leadership>,
    out_of_touch: watch::Sender<bool>,
) {
    let mut rx = raft.metrics();
    loop {
        let (l, oot) = {
            let m = rx.borrow_and_update();
            (leadership_in(id, &m), out_of_touch_in(election_max_ms, &m))
        };
        leader.send_if_modified(|cur| {
            let changed = *cur != l;
            if changed {
                *cur = l;
            }
            changed
        });
        out_of_touch.send_if_modified(|cur| std::mem::replace(cur, oot) != oot);
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Who leads according to `m`, as seen by node `id`.
fn leadership_in(id: u64, m: &openraft::RaftMetrics<u64, BasicNode>) -> Leadership {
    match m.current_leader {
        Some(lid) if lid == id && m.state == ServerState::Leader => Leadership::Me,
        Some(lid) if lid != id => match m.membership_config.membership().get_node(&lid) {
            Some(n) => Leadership::Other { id: lid, addr: n.addr.clone() },
            None => Leadership::Unknown,
        },
        _ => Leadership::Unknown,
    }
}

/// The out-of-touch rule (see [`track_leadership`]) applied to `m`.
fn out_of_touch_in(election_max_ms: u64, m: &openraft::RaftMetrics<u64, BasicNode>) -> bool {
    m.state == ServerState::Leader
        && m.membership_config.membership().voter_ids().count() > 1
        && m.millis_since_quorum_ack.is_some_and(|ms| ms > 2 * election_max_ms)
}

/// Start a node and run it until `shutdown` resolves.
pub async fn run(
    config: Config,
    clock: Clock,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen).await?;
    run_with_listener(config, clock, listener, shutdown).await
}

/// Like [`run`] with an already bound listener (tests bind port 0 first).
pub async fn run_with_listener(
    config: Config,
    clock: Clock,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let data_dir = config.data_dir();
    std::fs::create_dir_all(&data_dir)?;
    let (log_store, sm) = jobsched_raft::open_stores(&data_dir)?;
    let applied = sm.subscribe_applied();
    let sm_kv = sm.kv();

    let http = reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .local_address(config.outbound_bind)
        .build()?;
    let raft_cfg = Arc::new(jobsched_raft::raft_config(
        config.heartbeat_ms,
        config.election_min_ms,
        config.election_max_ms,
        config.snapshot_logs,
        config.snapshot_catchup_logs,
    )?);
    // One pool of peer streams per process: Raft RPCs and relay batches.
    let streams = Arc::new(jobsched_raft::peer_stream::StreamPool::new(config.outbound_bind));
    let network = jobsched_raft::Network::new(http.clone(), streams.clone());
    let raft = openraft::Raft::<TypeConfig>::new(config.node_id, raft_cfg, network, log_store.clone(), sm).await?;
    let elector = jobsched_raft::Elector::new(
        config.node_id,
        raft.clone(),
        log_store,
        http.clone(),
        jobsched_raft::ElectionTiming::new(
            Duration::from_millis(config.election_min_ms),
            Duration::from_millis(config.election_max_ms),
        ),
        config.pre_vote,
    );
    tokio::spawn(elector.clone().run());

    // Every node initialises with the same membership; a node that already
    // has state reports "not allowed" which we treat as success.
    let members: BTreeMap<u64, BasicNode> =
        config.members().into_iter().map(|p| (p.id, BasicNode { addr: p.addr })).collect();
    if raft.is_initialized().await? {
        tracing::info!(node_id = config.node_id, "restarting with existing state");
    } else if let Err(e) = raft.initialize(members).await {
        // Another node's initialisation may have reached us first.
        tracing::info!("initialize skipped: {e}");
    }

    let proposer = Proposer::start(
        raft.clone(),
        clock.clone(),
        config.max_batch,
        Duration::from_millis(config.propose_timeout_ms),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let (leader_tx, leader_rx) = watch::channel(Leadership::Unknown);
    let (oot_tx, oot_rx) = watch::channel(false);
    tokio::spawn(track_leadership(config.node_id, raft.clone(), config.election_max_ms, leader_tx, oot_tx));
    let node = Arc::new(Node {
        id: config.node_id,
        addr: config.advertise_addr(),
        config: config.clone(),
        raft: raft.clone(),
        sm: sm_kv.clone(),
        applied,
        proposer,
        relays: crate::http::relay_batch::RelayBatcher::start(http.clone(), streams),
        elector,
        http,
        clock,
        stopping: stop_rx.clone(),
        leader: leader_rx,
        out_of_touch: oot_rx,
    });

    let monitors = tokio::spawn(crate::leader::run_monitors(node.clone(), stop_rx.clone()));
    let app = crate::http::router(node.clone());
    tracing::info!(node_id = node.id, addr = %node.addr, "coordinator listening");
    let mut server_stop = stop_rx.clone();
    // TCP_NODELAY on every accepted connection (axum 0.8's `serve` leaves
    // Nagle's algorithm on). Why: an answer written while the previous one
    // on the same keep-alive connection is not yet acknowledged would wait
    // for that ACK, and the peers' delayed ACKs hold it for milliseconds. Every
    // Raft RPC, relay batch and API answer is a small request/response.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY on an accepted connection: {e}");
        }
    });
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = server_stop.wait_for(|s| *s).await;
    });
    let server = tokio::spawn(async move { server.await });

    shutdown.await;
    tracing::info!(node_id = node.id, "shutting down");
    let _ = stop_tx.send(true);
    // Long polls end with the server; give in-flight requests a moment.
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    let _ = monitors.await;
    if let Err(e) = raft.shutdown().await {
        tracing::warn!("raft shutdown: {e}");
    }
    // Apply steps skip the WAL: flush them so the next start has nothing to
    // re-apply (a crash instead re-applies them from the Raft log).
    match tokio::task::spawn_blocking(move || sm_kv.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("flushing the state machine at shutdown: {e}"),
        Err(e) => tracing::warn!("flushing the state machine at shutdown: {e}"),
    }
    Ok(())
}
