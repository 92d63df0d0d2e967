//! Node-to-node Raft RPCs: openraft's `RaftNetwork`, with bincode bodies.
//!
//! Transport: every RPC goes over a persistent peer stream
//! ([`crate::peer_stream`]: length-prefixed frames on an upgraded connection
//! of the peer's HTTP port) carrying the same bodies as the HTTP endpoints
//! below. The HTTP endpoints stay as the fallback for a peer that refuses the
//! upgrade (a build without streams, during a rolling upgrade).
//!
//! Wire format: every body (request and response) is one format-version byte
//! ([`WIRE_VERSION`]) followed by bincode. Requests are openraft's request
//! types; a response is bincode of `Result<Response, RaftError<..>>`, i.e.
//! exactly what the receiving `Raft` returned. A peer speaking another version
//! is rejected (HTTP 400 from the server, `NetworkError` on the client).
//!
//! | RPC            | path                  | request                 | response |
//! |----------------|-----------------------|-------------------------|----------|
//! | append entries | `POST /raft/append`   | `AppendEntriesRequest`  | `Result<AppendEntriesResponse, RaftError>` |
//! | vote           | `POST /raft/vote`     | `VoteRequest`           | `Result<VoteResponse, RaftError>` |
//! | snapshot chunk | `POST /raft/snapshot` | `InstallSnapshotRequest`| `Result<InstallSnapshotResponse, RaftError<InstallSnapshotError>>` |
//! | pre-vote       | `POST /raft/prevote`  | `PreVoteRequest`        | `PreVoteResponse` (see [`crate::election`]) |
//!
//! Client side ([`Network`], [`NetworkConnection`]): one peer-stream pool and
//! one shared `reqwest::Client` per process; each call is bounded by
//! openraft's `RPCOption::hard_ttl()`. Error mapping, which decides
//! openraft's retry behaviour:
//! - cannot connect, or no answer before the timeout -> `Unreachable` (openraft
//!   backs off before retrying that peer). For a slow but alive peer,
//!   openraft's own timer (same ttl) usually fires first and reports
//!   `Timeout`, which is retried without backoff;
//! - HTTP 413, or a frame over the peer-stream limit, on an append with several
//!   entries -> `PayloadTooLarge` (openraft retries with fewer entries);
//! - any other non-2xx, a broken stream, or a body that does not decode ->
//!   `NetworkError`;
//! - the remote `Raft` returned an error -> `RemoteError`.
//!
//! Server side: the coordinator's HTTP routes pass the raw body to
//! [`handle_append`], [`handle_vote`], [`handle_snapshot`] or
//! [`crate::election::Elector::handle_prevote`] and send back the
//! returned bytes with status 200; a [`WireError`] should become a 400. Note
//! that an append body can be large (up to `max_payload_entries` batches), and
//! snapshot chunks are up to `snapshot_max_chunk_size` (see
//! [`crate::raft_config`]): give these routes a body limit well above axum's
//! 2 MB default (peers are trusted).

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::peer_stream::{request_frame, ExchangeError, Retry, RpcKind, StreamPool};
use crate::types::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, Node, NodeId, Raft,
    TypeConfig, VoteRequest, VoteResponse,
};

/// Version byte in front of every RPC body.
pub const WIRE_VERSION: u8 = 1;

pub const PATH_APPEND: &str = "/raft/append";
pub const PATH_VOTE: &str = "/raft/vote";
pub const PATH_SNAPSHOT: &str = "/raft/snapshot";

/// A body that cannot be decoded or encoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("empty RPC body")]
    Empty,
    #[error("RPC wire format version {got} is not supported (this node speaks {WIRE_VERSION})")]
    Version { got: u8 },
    #[error("malformed RPC body: {0}")]
    Decode(#[source] bincode::Error),
    #[error("cannot encode RPC body: {0}")]
    Encode(#[source] bincode::Error),
    #[error("frame of {0} bytes is over the {max} byte limit", max = crate::peer_stream::MAX_FRAME)]
    FrameTooLarge(usize),
    #[error("unknown RPC kind {0} on a peer stream")]
    UnknownKind(u8),
    #[error("{0}")]
    App(String),
}

/// Version byte + bincode.
pub fn encode_message<T: Serialize>(value: &T) -> Result<Vec<u8>, WireError> {
    let mut out = vec![WIRE_VERSION];
    bincode::serialize_into(&mut out, value).map_err(WireError::Encode)?;
    Ok(out)
}

/// Check the version byte and decode the rest.
pub fn decode_message<T: DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    match body.split_first() {
        None => Err(WireError::Empty),
        Some((&WIRE_VERSION, rest)) => bincode::deserialize(rest).map_err(WireError::Decode),
        Some((&got, _)) => Err(WireError::Version { got }),
    }
}

// ----- server side -------------------------------------------------------------

/// Serve `POST /raft/append`: decode, hand to the local Raft, encode its result.
pub async fn handle_append(raft: &Raft, body: &[u8]) -> Result<Vec<u8>, WireError> {
    let req: AppendEntriesRequest = decode_message(body)?;
    let res: Result<AppendEntriesResponse, RaftError<NodeId>> = raft.append_entries(req).await;
    encode_message(&res)
}

/// Serve `POST /raft/vote`.
pub async fn handle_vote(raft: &Raft, body: &[u8]) -> Result<Vec<u8>, WireError> {
    let req: VoteRequest = decode_message(body)?;
    let res: Result<VoteResponse, RaftError<NodeId>> = raft.vote(req).await;
    encode_message(&res)
}

/// Serve `POST /raft/snapshot` (one chunk; the last one installs).
pub async fn handle_snapshot(raft: &Raft, body: &[u8]) -> Result<Vec<u8>, WireError> {
    let req: InstallSnapshotRequest = decode_message(body)?;
    let res: Result<InstallSnapshotResponse, RaftError<NodeId, InstallSnapshotError>> =
        raft.install_snapshot(req).await;
    encode_message(&res)
}

// ----- client side -------------------------------------------------------------

/// openraft's network factory: hands out one [`NetworkConnection`] per peer,
/// all sharing the process's peer-stream pool and `reqwest::Client`.
#[derive(Clone)]
pub struct Network {
    client: reqwest::Client,
    streams: Arc<StreamPool>,
}

impl Network {
    /// `client` carries the HTTP fallback; `streams` is the process's
    /// peer-stream pool (shared with the coordinator's relays).
    pub fn new(client: reqwest::Client, streams: Arc<StreamPool>) -> Self {
        Network { client, streams }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = NetworkConnection;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> NetworkConnection {
        NetworkConnection { client: self.client.clone(), streams: self.streams.clone(), target, node: node.clone() }
    }
}

/// RPCs to one peer. Holds no connection itself: the pools do.
pub struct NetworkConnection {
    client: reqwest::Client,
    streams: Arc<StreamPool>,
    target: NodeId,
    node: Node,
}

type RpcResult<T, E = openraft::error::Infallible> = Result<T, RPCError<NodeId, Node, RaftError<NodeId, E>>>;

fn network_error(msg: String) -> NetworkError {
    NetworkError::new(&openraft::AnyError::error(msg))
}

impl NetworkConnection {
    /// One RPC: over a peer stream, or over HTTP while the peer refuses
    /// streams (see [`crate::peer_stream`]). Error mapping as in the module
    /// docs; a peer-stream exchange that does not finish within `timeout`
    /// counts as unreachable, like an HTTP request that times out.
    async fn rpc<Req, Resp, E>(
        &self,
        (kind, path): (RpcKind, &str),
        req: &Req,
        timeout: Duration,
        entries: usize,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        if self.streams.http_only(&self.node.addr) {
            return self.call(path, req, timeout, entries).await;
        }
        let frame = match request_frame(kind, req) {
            Ok(frame) => frame,
            Err(WireError::FrameTooLarge(_)) if entries > 1 => {
                let hint = (entries / 2).max(1) as u64;
                return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(hint)));
            }
            Err(e) => return Err(RPCError::Network(NetworkError::new(&e))),
        };
        let addr = &self.node.addr;
        let exchange = self.streams.call(addr, &frame, Retry::OnFresh);
        let answer = match tokio::time::timeout(timeout, exchange).await {
            Err(_) => {
                let msg = format!("{addr}: no answer within {timeout:?}");
                return Err(RPCError::Unreachable(Unreachable::new(&openraft::AnyError::error(msg))));
            }
            Ok(Err(ExchangeError::NotSupported(_))) => return self.call(path, req, timeout, entries).await,
            Ok(Err(e @ ExchangeError::Connect(_))) => return Err(RPCError::Unreachable(Unreachable::new(&e))),
            Ok(Err(e)) => return Err(RPCError::Network(network_error(format!("{addr}: {e}")))),
            Ok(Ok(answer)) => answer,
        };
        self.decode_answer(&answer)
    }

    /// An answer body (either transport): the remote `Raft`'s result.
    fn decode_answer<Resp, E>(&self, body: &[u8]) -> RpcResult<Resp, E>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let addr = &self.node.addr;
        let res: Result<Resp, RaftError<NodeId, E>> =
            decode_message(body).map_err(|e| RPCError::Network(network_error(format!("{addr}: {e}"))))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new_with_node(self.target, self.node.clone(), e)))
    }

    /// One RPC as an HTTP request to `path`.
    async fn call<Req, Resp, E>(&self, path: &str, req: &Req, timeout: Duration, entries: usize) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let url = format!("http://{}{}", self.node.addr, path);
        let body = encode_message(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let resp = self
            .client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .timeout(timeout)
            .body(body)
            .send()
            .await
            .map_err(|e| transport_error(&e))?;
        let status = resp.status();
        if status == reqwest::StatusCode::PAYLOAD_TOO_LARGE && entries > 1 {
            let hint = (entries / 2).max(1) as u64;
            return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(hint)));
        }
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let text: String = text.chars().take(512).collect();
            return Err(RPCError::Network(network_error(format!("{url}: HTTP {status}: {text}"))));
        }
        let bytes = resp.bytes().await.map_err(|e| transport_error(&e))?;
        self.decode_answer(&bytes)
    }
}

/// Connection failures and timeouts: the peer is down or stuck; back off.
fn transport_error<E: std::error::Error>(e: &reqwest::Error) -> RPCError<NodeId, Node, E> {
    if e.is_connect() || e.is_timeout() {
        RPCError::Unreachable(Unreachable::new(e))
    } else {
        RPCError::Network(NetworkError::new(e))
    }
}

impl RaftNetwork<TypeConfig> for NetworkConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse> {
        let n = rpc.entries.len();
        self.rpc((RpcKind::Append, PATH_APPEND), &rpc, option.hard_ttl(), n).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse, InstallSnapshotError> {
        // hard_ttl here is the config's install_snapshot_timeout, which also
        // has to cover installing the snapshot after the last chunk.
        self.rpc((RpcKind::Snapshot, PATH_SNAPSHOT), &rpc, option.hard_ttl(), 0).await
    }

    async fn vote(&mut self, rpc: VoteRequest, option: RPCOption) -> RpcResult<VoteResponse> {
        self.rpc((RpcKind::Vote, PATH_VOTE), &rpc, option.hard_ttl(), 0).await
    }

    /// How long the leader waits before trying an unreachable peer again.
    /// openraft's default is a constant 500 ms. Why shorter: a follower that
    /// restarts (kill -9, then start) campaigns after one election timeout
    /// (250-400 ms by default) unless it hears from the leader first; with a
    /// 500 ms backoff it often does not, and its election deposes a healthy
    /// leader (openraft 0.9 has no pre-vote). Retrying every
    /// [`UNREACHABLE_RETRY`] reaches it well within that window; a refused
    /// connection costs next to nothing.
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(UNREACHABLE_RETRY))
    }
}

/// Retry interval for a peer that could not be reached (see `backoff`).
pub const UNREACHABLE_RETRY: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use jobsched_core::{Batch, Command};
    use openraft::error::Fatal;
    use openraft::{CommittedLeaderId, EntryPayload, SnapshotMeta, Vote};

    use super::*;
    use crate::types::{Entry, LogId, Membership};

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    #[test]
    fn append_round_trip() {
        let req = AppendEntriesRequest {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(log_id(2, 9)),
            leader_commit: Some(log_id(2, 8)),
            entries: vec![
                Entry { log_id: log_id(3, 10), payload: EntryPayload::Blank },
                Entry {
                    log_id: log_id(3, 11),
                    payload: EntryPayload::Normal(Batch {
                        now_ms: 42,
                        commands: vec![Command::CancelJob { job_id: uuid::Uuid::from_u128(7) }],
                    }),
                },
                Entry {
                    log_id: log_id(3, 12),
                    payload: EntryPayload::Membership(Membership::new(
                        vec![[1u64, 2, 3].into_iter().collect()],
                        BTreeMap::from([(1, Node::new("a:1")), (2, Node::new("b:2")), (3, Node::new("c:3"))]),
                    )),
                },
            ],
        };
        let bytes = encode_message(&req).unwrap();
        assert_eq!(bytes[0], WIRE_VERSION);
        let back: AppendEntriesRequest = decode_message(&bytes).unwrap();
        assert_eq!(back.vote, req.vote);
        assert_eq!(back.prev_log_id, req.prev_log_id);
        assert_eq!(back.leader_commit, req.leader_commit);
        assert_eq!(back.entries, req.entries);

        let ok: Result<AppendEntriesResponse, RaftError<NodeId>> = Ok(AppendEntriesResponse::Success);
        let back: Result<AppendEntriesResponse, RaftError<NodeId>> =
            decode_message(&encode_message(&ok).unwrap()).unwrap();
        assert_eq!(back, ok);
        let conflict: Result<AppendEntriesResponse, RaftError<NodeId>> =
            Ok(AppendEntriesResponse::HigherVote(Vote::new(9, 2)));
        let back: Result<AppendEntriesResponse, RaftError<NodeId>> =
            decode_message(&encode_message(&conflict).unwrap()).unwrap();
        assert_eq!(back, conflict);
    }

    #[test]
    fn vote_round_trip() {
        let req = VoteRequest::new(Vote::new(5, 2), Some(log_id(4, 100)));
        let back: VoteRequest = decode_message(&encode_message(&req).unwrap()).unwrap();
        assert_eq!(back, req);
        let resp: Result<VoteResponse, RaftError<NodeId>> = Ok(VoteResponse::new(Vote::new(5, 2), None, true));
        let back: Result<VoteResponse, RaftError<NodeId>> = decode_message(&encode_message(&resp).unwrap()).unwrap();
        assert_eq!(back, resp);
        let fatal: Result<VoteResponse, RaftError<NodeId>> = Err(RaftError::Fatal(Fatal::Stopped));
        let back: Result<VoteResponse, RaftError<NodeId>> = decode_message(&encode_message(&fatal).unwrap()).unwrap();
        assert_eq!(back, fatal);
    }

    #[test]
    fn snapshot_round_trip() {
        let req = InstallSnapshotRequest {
            vote: Vote::new_committed(2, 1),
            meta: SnapshotMeta {
                last_log_id: Some(log_id(2, 50)),
                last_membership: Default::default(),
                snapshot_id: "2-50-abc-0".into(),
            },
            offset: 3 << 20,
            data: vec![1, 2, 3, 255],
            done: true,
        };
        let back: InstallSnapshotRequest = decode_message(&encode_message(&req).unwrap()).unwrap();
        assert_eq!(back.vote, req.vote);
        assert_eq!(back.meta, req.meta);
        assert_eq!((back.offset, back.data, back.done), (req.offset, req.data, req.done));

        let resp: Result<InstallSnapshotResponse, RaftError<NodeId, InstallSnapshotError>> =
            Ok(InstallSnapshotResponse { vote: Vote::new(2, 1) });
        let back: Result<InstallSnapshotResponse, RaftError<NodeId, InstallSnapshotError>> =
            decode_message(&encode_message(&resp).unwrap()).unwrap();
        assert_eq!(back, resp);
    }

    #[test]
    fn version_byte_is_checked() {
        let req = VoteRequest::new(Vote::new(5, 2), None);
        let mut bytes = encode_message(&req).unwrap();
        bytes[0] = WIRE_VERSION + 1;
        assert!(
            matches!(decode_message::<VoteRequest>(&bytes), Err(WireError::Version { got }) if got == WIRE_VERSION + 1)
        );
        assert!(matches!(decode_message::<VoteRequest>(&[]), Err(WireError::Empty)));
        assert!(matches!(decode_message::<VoteRequest>(&[WIRE_VERSION, 1]), Err(WireError::Decode(_))));
    }

    /// Golden bytes of a vote request: node-to-node compatibility across
    /// builds depends on them.
    #[test]
    fn golden_vote_request() {
        let req = VoteRequest::new(Vote::new(5, 2), Some(log_id(4, 100)));
        let bytes = encode_message(&req).unwrap();
        let mut want = vec![WIRE_VERSION];
        // vote: leader_id { term: u64, node_id: u64 }, committed: bool
        want.extend_from_slice(&5u64.to_le_bytes());
        want.extend_from_slice(&2u64.to_le_bytes());
        want.push(0);
        // last_log_id: Some(LogId { leader_id: { term, node_id }, index })
        want.push(1);
        want.extend_from_slice(&4u64.to_le_bytes());
        want.extend_from_slice(&1u64.to_le_bytes());
        want.extend_from_slice(&100u64.to_le_bytes());
        assert_eq!(bytes, want);
    }
}
