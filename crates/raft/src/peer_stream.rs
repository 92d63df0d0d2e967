//! Raft RPCs over persistent, framed TCP connections ("peer streams").
//!
//! Why not one HTTP request per RPC: an empty append (the leader's commit
//! index, sent after every commit) took 165-205 us round trip on a 2-core box
//! of which the follower's Raft work was 32 us; the rest was HTTP/1.1 framing,
//! hyper's and reqwest's connection tasks and the thread wake-ups between
//! them, on both sides and in series with every write's latency. A peer
//! stream is a plain TCP connection on which one side writes a length-prefixed
//! request and reads a length-prefixed answer, in the calling task.
//!
//! ## Handshake (same port as the HTTP API)
//! The client connects to the peer's advertised `host:port` and sends
//! `GET /raft/stream` with `Connection: Upgrade` and `Upgrade:
//! jobsched-raft/1`; the server answers `101 Switching Protocols` and from
//! then on both sides speak frames. No extra port to configure or open. A
//! peer that answers anything but 101 (a build without streams) is reached
//! through the per-RPC HTTP endpoints of [`crate::network`] for the next
//! [`HTTP_ONLY_FOR`].
//!
//! ## Frames
//! Every frame is a `u32` little-endian length followed by that many bytes
//! (at most [`MAX_FRAME`]).
//! - request: one kind byte ([`RpcKind`]), then the same body as the HTTP
//!   endpoint takes (wire version byte + bincode of openraft's request), or,
//!   for [`RpcKind::App`], a body the embedding application defines and
//!   serves ([`AppRpc`]: the coordinator's relay batches);
//! - answer: one status byte; `0` = the same body the HTTP endpoint returns
//!   (version byte + bincode of `Result<Response, RaftError>`), `1` = UTF-8
//!   text of why the server could not decode the request, after which it
//!   closes the connection.
//!
//! One request at a time per connection: the client writes a request and reads
//! its answer before it writes the next one. No request ids are needed, and a
//! call that is abandoned half-way (openraft's timeout drops its future) drops
//! the connection with it, so a late answer can never be read as the answer to
//! another request.
//!
//! ## Client side: [`StreamPool`]
//! One pool per process, keyed by peer address. A call takes an idle
//! connection (or opens one), and puts it back only after a complete
//! exchange. openraft keeps one replication connection per follower busy, but
//! linearizable reads send their own heartbeat round through a fresh
//! `RaftNetwork` each, votes do the same, and relays keep several batches in
//! flight: pooling lets those reuse connections instead of opening one per
//! call. At most [`MAX_IDLE_PER_PEER`] idle connections are kept per peer,
//! none older than [`IDLE_MAX`], and one found closed by the peer (it
//! restarted or stopped) is dropped when taken. A pooled connection can still
//! die between that check and the exchange; callers whose requests are
//! idempotent (appends, votes; openraft resends snapshot chunks on any error
//! anyway) ask for one retry on a fresh connection ([`Retry::OnFresh`]),
//! relays do not (a batch of writes may have been applied).
//!
//! ## Server side: [`accept_upgrade`] and [`serve`]
//! Each accepted stream is served by its own task until the client closes it,
//! it stays idle for [`SERVER_IDLE`], a frame is malformed, or the node stops
//! (then the task closes the connection so that the leader reconnects to
//! whatever serves the address next, instead of talking to a stopped `Raft`).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use serde::Serialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

use crate::network::{handle_append, handle_snapshot, handle_vote, WireError, WIRE_VERSION};
use crate::types::Raft;

/// Path of the upgrade request.
pub const PATH_STREAM: &str = "/raft/stream";
/// Value of the `Upgrade` header; the number is the frame format's version.
pub const PROTOCOL: &str = "jobsched-raft/1";
/// Largest frame either side accepts (an append of many large batches stays
/// far below; a bigger request is split by openraft on `PayloadTooLarge`).
pub const MAX_FRAME: usize = 1 << 30;
/// Idle connections kept per peer (Raft RPCs and relay batches share them).
pub const MAX_IDLE_PER_PEER: usize = 8;
/// An idle connection older than this is closed rather than reused.
pub const IDLE_MAX: Duration = Duration::from_secs(30);
/// How long a peer that refused the upgrade is reached over plain HTTP.
pub const HTTP_ONLY_FOR: Duration = Duration::from_secs(60);
/// The server closes a connection that sends nothing for this long (the
/// client side never keeps one idle longer than [`IDLE_MAX`]).
pub const SERVER_IDLE: Duration = Duration::from_secs(120);
/// Upper bound on the size of the handshake answer's head.
const MAX_HANDSHAKE: usize = 16 * 1024;

/// What a request frame asks for (its first byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RpcKind {
    Append = 1,
    Vote = 2,
    Snapshot = 3,
    /// Served by the application's [`AppRpc`] handler.
    App = 4,
}

/// The application's handler for [`RpcKind::App`] frames: takes the request
/// body, returns the answer body, or why the body could not be decoded (the
/// stream then answers status 1 and closes).
pub type AppRpc = Arc<dyn Fn(Bytes) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send>> + Send + Sync>;

/// Should a failed exchange on a pooled connection be tried again on a fresh
/// one? Only for idempotent requests (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    OnFresh,
    Never,
}

const STATUS_OK: u8 = 0;
const STATUS_ERROR: u8 = 1;

/// A request frame: length, kind byte, wire version byte, bincode.
pub fn request_frame<T: Serialize>(kind: RpcKind, req: &T) -> Result<Vec<u8>, WireError> {
    let mut frame = Vec::with_capacity(128);
    frame.extend_from_slice(&[0; 4]);
    frame.push(kind as u8);
    frame.push(WIRE_VERSION);
    bincode::serialize_into(&mut frame, req).map_err(WireError::Encode)?;
    seal(frame)
}

/// A request frame around an already encoded body.
pub fn raw_frame(kind: RpcKind, body: &[u8]) -> Result<Vec<u8>, WireError> {
    tagged_frame(kind as u8, body)
}

/// An answer frame: length, status byte, `body`.
fn answer_frame(status: u8, body: &[u8]) -> Result<Vec<u8>, WireError> {
    tagged_frame(status, body)
}

/// Length, one tag byte (a request's kind or an answer's status), `body`.
fn tagged_frame(tag: u8, body: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.extend_from_slice(&[0; 4]);
    frame.push(tag);
    frame.extend_from_slice(body);
    seal(frame)
}

/// Fill in the length prefix of a frame built behind 4 placeholder bytes.
fn seal(mut frame: Vec<u8>) -> Result<Vec<u8>, WireError> {
    let len = frame.len() - 4;
    if len > MAX_FRAME {
        return Err(WireError::FrameTooLarge(len));
    }
    frame[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(frame)
}

/// Read one frame's body. `Ok(None)`: the peer closed the connection between
/// frames.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("frame of {len} bytes is over the limit")));
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).await?;
    Ok(Some(body))
}

// ----- server side -------------------------------------------------------------

/// Answer an upgrade request for `GET /raft/stream`: on a matching `Upgrade`
/// header, spawn the task that serves the connection once the HTTP server has
/// handed it over, and return the `101` answer for the server to send.
/// Anything else gets `426 Upgrade Required`. `stopping` turns true when the
/// node shuts down; `app` serves [`RpcKind::App`] frames (none: refused).
pub fn accept_upgrade<B>(
    raft: &Raft,
    stopping: &watch::Receiver<bool>,
    app: Option<AppRpc>,
    req: &mut http::Request<B>,
) -> http::Response<()> {
    let wanted = req.headers().get(http::header::UPGRADE).and_then(|v| v.to_str().ok());
    let status = if wanted == Some(PROTOCOL) {
        let on_upgrade = hyper::upgrade::on(req);
        let (raft, stopping) = (raft.clone(), stopping.clone());
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => serve(&raft, hyper_util::rt::TokioIo::new(upgraded), stopping, app).await,
                Err(e) => tracing::debug!("peer stream upgrade failed: {e}"),
            }
        });
        http::StatusCode::SWITCHING_PROTOCOLS
    } else {
        http::StatusCode::UPGRADE_REQUIRED
    };
    let mut resp = http::Response::new(());
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(http::header::CONNECTION, http::HeaderValue::from_static("upgrade"));
    headers.insert(http::header::UPGRADE, http::HeaderValue::from_static(PROTOCOL));
    resp
}

/// Serve one peer stream: answer request frames in order until the client
/// closes it, it idles for [`SERVER_IDLE`], it sends a frame we cannot decode
/// (answered with status 1, then closed), or `stopping` turns true.
pub async fn serve<IO: AsyncRead + AsyncWrite + Unpin>(
    raft: &Raft,
    io: IO,
    mut stopping: watch::Receiver<bool>,
    app: Option<AppRpc>,
) {
    let mut io = BufReader::new(io);
    loop {
        // Why select on `stopping`: the stream outlives the HTTP server's
        // graceful shutdown (upgraded connections are not tracked by it). A
        // stopped node must drop its peers' connections, or a leader would
        // keep talking to the stopped `Raft` instead of reconnecting.
        let read = tokio::select! {
            r = tokio::time::timeout(SERVER_IDLE, read_frame(&mut io)) => r,
            _ = stopping.wait_for(|s| *s) => return,
        };
        let frame = match read {
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!("peer stream closed: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!("peer stream idle for {SERVER_IDLE:?}: closing it");
                return;
            }
        };
        // Why watch the connection while the request runs: a relayed long
        // poll can wait 30 s, and if the follower gives up on it (its client
        // went away) it closes the connection; the request must be dropped
        // here too, or it could still lease jobs to nobody, which hyper
        // does not let an HTTP request do either. The client sends nothing
        // else until it has our answer, so anything readable now is the
        // close (or a broken peer); if bytes do arrive, stop watching and
        // leave them for the next frame.
        let served = tokio::select! {
            served = dispatch(raft, app.as_ref(), frame) => served,
            () = peer_gone(&mut io) => {
                tracing::debug!("peer closed the stream while its request was served");
                return;
            }
        };
        let (answer, keep_open) = match served.and_then(|body| answer_frame(STATUS_OK, &body)) {
            Ok(answer) => (answer, true),
            Err(e) => {
                tracing::warn!("bad peer stream request: {e}");
                let text = e.to_string();
                (answer_frame(STATUS_ERROR, text.as_bytes()).unwrap_or_default(), false)
            }
        };
        if let Err(e) = io.get_mut().write_all(&answer).await {
            tracing::debug!("peer stream write failed: {e}");
            return;
        }
        if !keep_open {
            return;
        }
    }
}

/// Resolves when the peer closes the connection or it fails; never, if the
/// peer sends data instead (that stays buffered for the next read).
async fn peer_gone<R: AsyncBufRead + Unpin>(io: &mut R) {
    match io.fill_buf().await {
        Ok([]) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Hand a request frame's body to the local `Raft` (or the application);
/// the answer body.
async fn dispatch(raft: &Raft, app: Option<&AppRpc>, frame: Vec<u8>) -> Result<Vec<u8>, WireError> {
    match frame.split_first() {
        None => Err(WireError::Empty),
        Some((&kind, body)) if kind == RpcKind::Append as u8 => handle_append(raft, body).await,
        Some((&kind, body)) if kind == RpcKind::Vote as u8 => handle_vote(raft, body).await,
        Some((&kind, body)) if kind == RpcKind::Snapshot as u8 => handle_snapshot(raft, body).await,
        Some((&kind, _)) if kind == RpcKind::App as u8 && app.is_some() => {
            let app = app.expect("checked");
            app(Bytes::from(frame).slice(1..)).await.map_err(WireError::App)
        }
        Some((&kind, _)) => Err(WireError::UnknownKind(kind)),
    }
}

// ----- client side -------------------------------------------------------------

/// Why an exchange over a peer stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// Could not open a connection: the peer is down or unreachable.
    #[error("cannot connect: {0}")]
    Connect(#[source] io::Error),
    /// The peer answered the upgrade with this HTTP status (it does not speak
    /// peer streams); use HTTP.
    #[error("peer refused the stream upgrade (HTTP status {0:?})")]
    NotSupported(Option<u16>),
    /// The connection failed mid-exchange.
    #[error("peer stream: {0}")]
    Io(#[source] io::Error),
    /// The peer could not decode our request.
    #[error("peer rejected the request: {0}")]
    Rejected(String),
}

/// One open connection to a peer, past the handshake.
struct PeerStream {
    io: BufReader<TcpStream>,
    idle_since: Instant,
}

impl PeerStream {
    /// Has the peer closed this idle connection (or, against the protocol,
    /// sent something unasked)? A peer that stops or restarts closes its end;
    /// seeing that here costs one non-blocking read and saves an exchange
    /// that would fail.
    fn closed_by_peer(&self) -> bool {
        if !self.io.buffer().is_empty() {
            return true;
        }
        let mut probe = [0u8; 1];
        !matches!(self.io.get_ref().try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    async fn connect(addr: &str, bind: Option<IpAddr>) -> Result<PeerStream, ExchangeError> {
        let target = tokio::net::lookup_host(addr)
            .await
            .map_err(ExchangeError::Connect)?
            .next()
            .ok_or_else(|| ExchangeError::Connect(io::Error::new(io::ErrorKind::NotFound, "no address")))?;
        let socket =
            if target.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(ExchangeError::Connect)?;
        // Chaos tests give each node its own loopback address and cut links
        // with iptables by source address: connect from ours.
        if let Some(ip) = bind {
            socket.bind(SocketAddr::new(ip, 0)).map_err(ExchangeError::Connect)?;
        }
        let tcp = socket.connect(target).await.map_err(ExchangeError::Connect)?;
        // Small request/answer exchanges: never wait for Nagle.
        tcp.set_nodelay(true).map_err(ExchangeError::Connect)?;
        let mut io = BufReader::new(tcp);
        let hello =
            format!("GET {PATH_STREAM} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: {PROTOCOL}\r\n\r\n");
        io.get_mut().write_all(hello.as_bytes()).await.map_err(ExchangeError::Io)?;
        let status = read_response_head(&mut io).await.map_err(ExchangeError::Io)?;
        if status != Some(101) {
            return Err(ExchangeError::NotSupported(status));
        }
        Ok(PeerStream { io, idle_since: Instant::now() })
    }

    /// Write one request frame and read its answer's body (after the status
    /// byte, which is checked; no copy).
    async fn exchange(&mut self, frame: &[u8]) -> Result<Bytes, ExchangeError> {
        self.io.get_mut().write_all(frame).await.map_err(ExchangeError::Io)?;
        let answer = read_frame(&mut self.io)
            .await
            .map_err(ExchangeError::Io)?
            .ok_or_else(|| ExchangeError::Io(io::ErrorKind::UnexpectedEof.into()))?;
        match answer.first() {
            Some(&STATUS_OK) => Ok(Bytes::from(answer).slice(1..)),
            Some(&STATUS_ERROR) => Err(ExchangeError::Rejected(String::from_utf8_lossy(&answer[1..]).into_owned())),
            _ => Err(ExchangeError::Io(io::Error::new(io::ErrorKind::InvalidData, "malformed answer frame"))),
        }
    }
}

/// Read an HTTP response head up to its blank line; the status code, if the
/// status line parses.
async fn read_response_head(io: &mut BufReader<TcpStream>) -> io::Result<Option<u16>> {
    let mut line = Vec::new();
    let mut status = None;
    let mut total = 0;
    let mut first = true;
    loop {
        line.clear();
        let n = io.read_until(b'\n', &mut line).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        total += n;
        if total > MAX_HANDSHAKE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "handshake answer too long"));
        }
        if first {
            first = false;
            // "HTTP/1.1 101 Switching Protocols"
            status = std::str::from_utf8(&line).ok().and_then(|l| l.split_whitespace().nth(1)?.parse().ok());
        } else if line == b"\r\n" || line == b"\n" {
            return Ok(status);
        }
    }
}

#[derive(Default)]
struct PeerConnections {
    idle: Vec<PeerStream>,
    http_only_until: Option<Instant>,
}

/// The process's peer connections (see the module docs), by peer address
/// (`host:port`).
pub struct StreamPool {
    bind: Option<IpAddr>,
    peers: Mutex<HashMap<String, PeerConnections>>,
}

impl StreamPool {
    /// `bind`: local address outbound connections start from (`None`: any).
    pub fn new(bind: Option<IpAddr>) -> Self {
        StreamPool { bind, peers: Mutex::new(HashMap::new()) }
    }

    /// Is `addr` to be reached over plain HTTP for now (it refused the
    /// upgrade recently)?
    pub fn http_only(&self, addr: &str) -> bool {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.get(addr).and_then(|p| p.http_only_until).is_some_and(|until| Instant::now() < until)
    }

    fn mark_http_only(&self, addr: &str) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let peer = peers.entry(addr.to_owned()).or_default();
        peer.http_only_until = Some(Instant::now() + HTTP_ONLY_FOR);
        peer.idle.clear();
    }

    fn take_idle(&self, addr: &str) -> Option<PeerStream> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let idle = &mut peers.get_mut(addr)?.idle;
        // Newest last: reuse it; drop the ones that idled too long or that
        // the peer has closed.
        while let Some(stream) = idle.pop() {
            if stream.idle_since.elapsed() < IDLE_MAX && !stream.closed_by_peer() {
                return Some(stream);
            }
        }
        None
    }

    fn put_back(&self, addr: &str, mut stream: PeerStream) {
        stream.idle_since = Instant::now();
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let idle = match peers.get_mut(addr) {
            Some(peer) => &mut peer.idle,
            None => &mut peers.entry(addr.to_owned()).or_default().idle,
        };
        if idle.len() < MAX_IDLE_PER_PEER {
            idle.push(stream);
        }
    }

    /// Send one request frame to the peer at `addr` and return the answer's
    /// body. Cancel-safe: a dropped call drops the connection it was using.
    /// An error other than [`ExchangeError::Connect`] or
    /// [`ExchangeError::NotSupported`] means the request may have been
    /// served.
    pub async fn call(&self, addr: &str, frame: &[u8], retry: Retry) -> Result<Bytes, ExchangeError> {
        if let Some(mut stream) = self.take_idle(addr) {
            match stream.exchange(frame).await {
                Ok(answer) => {
                    self.put_back(addr, stream);
                    return Ok(answer);
                }
                Err(ExchangeError::Io(e)) if retry == Retry::OnFresh => {
                    tracing::debug!(addr, "pooled peer stream failed ({e}); reconnecting")
                }
                Err(e) => return Err(e),
            }
        }
        let mut stream = match PeerStream::connect(addr, self.bind).await {
            Ok(stream) => stream,
            Err(e @ ExchangeError::NotSupported(_)) => {
                tracing::info!(addr, "{e}: using HTTP for this peer for {HTTP_ONLY_FOR:?}");
                self.mark_http_only(addr);
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let answer = stream.exchange(frame).await?;
        self.put_back(addr, stream);
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::decode_message;
    use crate::types::VoteRequest;

    #[test]
    fn request_frame_layout() {
        let req = VoteRequest::new(openraft::Vote::new(5, 2), None);
        let frame = request_frame(RpcKind::Vote, &req).unwrap();
        let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 4);
        assert_eq!(frame[4], RpcKind::Vote as u8);
        assert_eq!(frame[5], WIRE_VERSION);
        let back: VoteRequest = decode_message(&frame[5..]).unwrap();
        assert_eq!(back, req);
    }

    #[tokio::test]
    async fn read_frame_splits_frames_and_sees_clean_close() {
        let mut bytes = answer_frame(STATUS_OK, b"abc").unwrap();
        bytes.extend(answer_frame(STATUS_ERROR, b"").unwrap());
        let mut r = &bytes[..];
        assert_eq!(read_frame(&mut r).await.unwrap(), Some(vec![STATUS_OK, b'a', b'b', b'c']));
        assert_eq!(read_frame(&mut r).await.unwrap(), Some(vec![STATUS_ERROR]));
        assert_eq!(read_frame(&mut r).await.unwrap(), None);
    }

    #[tokio::test]
    async fn oversized_or_truncated_frames_are_errors() {
        let too_big = ((MAX_FRAME + 1) as u32).to_le_bytes();
        let mut r = &too_big[..];
        assert_eq!(read_frame(&mut r).await.unwrap_err().kind(), io::ErrorKind::InvalidData);
        let truncated = [5u8, 0, 0, 0, 1, 2];
        let mut r = &truncated[..];
        assert_eq!(read_frame(&mut r).await.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
