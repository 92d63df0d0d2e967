//! Elections: our own election timer with a pre-vote round, in front of
//! openraft 0.9 (whose own timer is switched off with `enable_elect(false)`).
//!
//! Why not openraft's timer (0.9.25), all three seen in the chaos runs:
//! - **Fixed timeouts.** openraft draws a node's random election timeout
//!   once, at start, and checks it on a 1.5 x heartbeat tick. Two followers
//!   whose draws are close campaign together after every leader failure,
//!   split the vote, and retry together again: a third of the leader-pause
//!   failovers took 1.6-3.2 s instead of under 1.
//! - **Stale penalty.** A candidate refused for a shorter log adds
//!   2 x `election_timeout_max` to its next timeout, and the flag survives
//!   into the next failover (1.6-2.1 s failovers).
//! - **No pre-vote.** A follower cut off from the others raises its term on
//!   every timeout; when the partition heals, its higher term deposes a
//!   healthy leader (the write gap on heal reached 1.5 s).
//!
//! What [`Elector`] does instead (Raft thesis §9.6, pre-vote; etcd and
//! TiKV do the same):
//! - a follower that has had no append from a leader for its *lease*
//!   (`election_timeout_max`, the span during which openraft's voters refuse
//!   any candidate) plus a random `0..(max - min)` ms, **drawn afresh each
//!   round**, asks every voter `POST /raft/prevote`: "would you vote for me
//!   now?" A voter says yes only if it is not the leader, has itself had no
//!   leader contact for its lease, and the candidate's last log id is at
//!   least its own. Nothing changes state on either side.
//! - with a majority of yeses (its own included) it campaigns for real
//!   (`trigger().elect()`, a new term); otherwise it tries again after a
//!   fresh random pause. A node that cannot win (cut off, or a shorter log)
//!   therefore never raises its term and never disrupts a leader.
//! - a voter that refuses a pre-vote *because its own log is longer*, while
//!   its own lease is over, campaigns at once: the node Raft wants to win
//!   runs the election right away instead of after its timer.
//!
//! Safety does not depend on any of this: openraft's vote handling (terms,
//! log comparison, one vote per term, durable votes) decides who leads. The
//! elector only decides *when* to ask, so a bug here costs availability,
//! never data. A peer without `/raft/prevote` (HTTP 404, an older build
//! during a rolling upgrade) counts as a yes and its real vote decides.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::network::{decode_message, encode_message, WireError};
use crate::store::LogStore;
use crate::types::{LogId, NodeId, Raft};

pub const PATH_PREVOTE: &str = "/raft/prevote";

/// "Would you vote for me if I campaigned now?"
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVoteRequest {
    pub candidate: NodeId,
    pub last_log_id: Option<LogId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVoteResponse {
    pub granted: bool,
    /// The voter's own last log id (for the candidate's log).
    pub last_log_id: Option<LogId>,
}

/// Election timing, from the node's `election_min_ms` / `election_max_ms`.
#[derive(Debug, Clone, Copy)]
pub struct ElectionTiming {
    /// openraft's leader lease (`election_timeout_max`): a voter that heard
    /// from a leader this recently refuses every candidate.
    pub lease: Duration,
    /// Width of the random part of each wait (`max - min`).
    pub spread: Duration,
}

impl ElectionTiming {
    pub fn new(election_min: Duration, election_max: Duration) -> ElectionTiming {
        ElectionTiming { lease: election_max, spread: election_max.saturating_sub(election_min) }
    }

    /// Silence after which a follower asks for votes: the lease, a small
    /// margin (the voters' leases started a little later than ours: the
    /// same heartbeat reached them a moment later), and a fresh random share
    /// of the spread.
    fn campaign_after(&self, random: u64) -> Duration {
        self.lease + LEASE_MARGIN + jitter(self.spread, random)
    }

    /// Pause after a pre-vote round or a campaign that did not produce a
    /// leader, before the next try.
    fn retry_after(&self, random: u64) -> Duration {
        RETRY_BASE + jitter(self.spread, random)
    }
}

/// See [`ElectionTiming::campaign_after`].
const LEASE_MARGIN: Duration = Duration::from_millis(10);
/// Minimum pause between two tries: a vote round on a loaded 2-core box
/// (each voter fsyncs its vote) takes a few to a few tens of ms.
const RETRY_BASE: Duration = Duration::from_millis(50);

fn jitter(spread: Duration, random: u64) -> Duration {
    let ms = spread.as_millis() as u64;
    Duration::from_millis(if ms == 0 { 0 } else { random % (ms + 1) })
}

/// A random u64: the standard library seeds each `RandomState` afresh
/// (random per-thread keys, advanced on every call); the clock is mixed in
/// for good measure.
fn random() -> u64 {
    let mut h = RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    h.finish()
}

/// How a voter answers a pre-vote, and whether it should campaign itself.
#[derive(Debug, PartialEq, Eq)]
struct Verdict {
    granted: bool,
    campaign_now: bool,
}

/// The pre-vote rule. `leading`: this node is the leader; `lease_over`: it
/// has had no leader contact for its lease.
fn prevote_verdict(leading: bool, lease_over: bool, candidate_log: Option<LogId>, mine: Option<LogId>) -> Verdict {
    let leader_gone = !leading && lease_over;
    let log_ok = candidate_log >= mine;
    Verdict { granted: leader_gone && log_ok, campaign_now: leader_gone && !log_ok }
}

/// What the elector reads from openraft's own state (one consistent read).
#[derive(Debug, Clone, Copy)]
struct Seen {
    leader: bool,
    voter: bool,
    /// The node's vote is committed: it follows (or is) an elected leader.
    committed: bool,
    /// Since openraft last updated or renewed the vote (every accepted
    /// append renews it). None: not since this process started.
    silent: Option<Duration>,
}

impl Seen {
    /// Exactly openraft's own rule for refusing candidates
    /// (`Engine::handle_vote_req`): a committed vote renewed within the
    /// lease means a live leader.
    fn lease_over(&self, lease: Duration) -> bool {
        !self.committed || self.silent.is_none_or(|s| s > lease)
    }
}

/// One node's election driver. [`Elector::run`] campaigns when the leader
/// has gone quiet; [`Elector::handle_prevote`] answers other candidates.
///
/// Leader contact is not tracked here but read from openraft (the time its
/// vote was last renewed), so that "my lease is over" in a pre-vote answer
/// means exactly what openraft's real vote handler will decide a moment
/// later.
pub struct Elector {
    id: NodeId,
    raft: Raft,
    logs: LogStore,
    http: reqwest::Client,
    timing: ElectionTiming,
    /// Off: openraft's own election timer runs (no pre-vote from this node;
    /// it still answers pre-votes of others).
    enabled: bool,
    /// A pre-vote was refused here for a shorter log: campaign now.
    urgent: AtomicBool,
    wake: Notify,
}

impl Elector {
    pub fn new(
        id: NodeId,
        raft: Raft,
        logs: LogStore,
        http: reqwest::Client,
        timing: ElectionTiming,
        enabled: bool,
    ) -> Arc<Elector> {
        Arc::new(Elector { id, raft, logs, http, timing, enabled, urgent: AtomicBool::new(false), wake: Notify::new() })
    }

    async fn seen(&self) -> Option<Seen> {
        let id = self.id;
        self.raft
            .with_raft_state(move |st| Seen {
                leader: st.server_state == ServerState::Leader,
                voter: st.membership_state.effective().membership().voter_ids().any(|v| v == id),
                committed: st.vote_ref().is_committed(),
                silent: st.vote_last_modified().map(|t| t.elapsed()),
            })
            .await
            .ok()
    }

    fn last_log_id(&self) -> Option<Option<LogId>> {
        match self.logs.last_log_id() {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::warn!("pre-vote: cannot read the last log id: {e}");
                None
            }
        }
    }

    /// Serve `POST /raft/prevote`.
    pub async fn handle_prevote(&self, body: &[u8]) -> Result<Vec<u8>, WireError> {
        let req: PreVoteRequest = decode_message(body)?;
        let refuse = PreVoteResponse { granted: false, last_log_id: None };
        let (Some(seen), Some(mine)) = (self.seen().await, self.last_log_id()) else {
            return encode_message(&refuse);
        };
        let verdict = prevote_verdict(seen.leader, seen.lease_over(self.timing.lease), req.last_log_id, mine);
        if verdict.campaign_now && self.enabled && seen.voter {
            tracing::info!(candidate = req.candidate, candidate_log = ?req.last_log_id, my_log = ?mine,
                "pre-vote refused: my log is longer and no leader is alive; campaigning now");
            self.urgent.store(true, Ordering::Relaxed);
            self.wake.notify_one();
        }
        encode_message(&PreVoteResponse { granted: verdict.granted, last_log_id: mine })
    }

    /// The election loop; returns when Raft has shut down. With the elector
    /// disabled it returns at once and openraft's own timer stays on.
    pub async fn run(self: Arc<Self>) {
        if !self.enabled {
            return;
        }
        self.raft.runtime_config().elect(false);
        let started = Instant::now();
        let mut not_before = started;
        let mut jitter = random();
        let mut last_silent = Duration::ZERO;
        loop {
            let Some(seen) = self.seen().await else { return };
            // Silence as openraft sees it; a node that has not heard from a
            // leader since it started gives the leader one full wait to find
            // it (a restarted node usually hears within 100 ms).
            let silent = seen.silent.unwrap_or_else(|| started.elapsed());
            if silent < last_silent {
                jitter = random(); // new contact: a fresh draw for the next wait
            }
            last_silent = silent;
            // A committed vote: follow the leader's lease; otherwise an
            // election is under way (ours or one we voted in): retry soon.
            let due_after =
                if seen.committed { self.timing.campaign_after(jitter) } else { self.timing.retry_after(jitter) };
            // Urgent (a voter with a longer log, see `handle_prevote`) holds
            // until this node campaigns or a leader shows up.
            if seen.leader || !seen.lease_over(self.timing.lease) {
                self.urgent.store(false, Ordering::Relaxed);
            }
            let urgent = self.urgent.load(Ordering::Relaxed);
            let now = Instant::now();
            let wait = if seen.leader || !seen.voter {
                self.timing.lease
            } else if urgent {
                not_before.saturating_duration_since(now)
            } else {
                due_after.saturating_sub(silent).max(not_before.saturating_duration_since(now))
            };
            if seen.leader || !seen.voter || !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.wake.notified() => {}
                }
                continue;
            }
            self.urgent.store(false, Ordering::Relaxed);
            self.campaign(silent).await;
            jitter = random();
            not_before = Instant::now() + self.timing.retry_after(jitter);
        }
    }

    /// One pre-vote round and, if a majority says yes, a real election.
    async fn campaign(&self, silent: Duration) {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let peers: Vec<(NodeId, String)> = voters
            .iter()
            .filter(|&&v| v != self.id)
            .filter_map(|v| membership.get_node(v).map(|n| (*v, n.addr.clone())))
            .collect();
        let quorum = voters.len() / 2 + 1;
        let Some(mine) = self.last_log_id() else { return };
        if self.prevote_round(&peers, mine, quorum).await {
            tracing::info!(
                term = metrics.current_term + 1,
                silent_ms = silent.as_millis() as u64,
                "pre-vote granted by a majority: campaigning"
            );
            if let Err(e) = self.raft.trigger().elect().await {
                tracing::warn!("cannot start an election: {e}");
            }
        } else {
            tracing::debug!("pre-vote not granted by a majority");
        }
    }

    /// Ask every peer at once; true as soon as `quorum` (counting this node)
    /// said yes, false when too many said no or did not answer in time.
    async fn prevote_round(&self, peers: &[(NodeId, String)], mine: Option<LogId>, quorum: usize) -> bool {
        let mut yes = 1;
        if yes >= quorum {
            return true;
        }
        let body = match encode_message(&PreVoteRequest { candidate: self.id, last_log_id: mine }) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("pre-vote: {e}");
                return false;
            }
        };
        let mut asks = tokio::task::JoinSet::new();
        for (peer, addr) in peers {
            let (http, body, peer) = (self.http.clone(), body.clone(), *peer);
            let url = format!("http://{addr}{PATH_PREVOTE}");
            asks.spawn(async move { (peer, ask(&http, &url, body).await) });
        }
        while let Some(answer) = asks.join_next().await {
            let Ok((peer, granted)) = answer else { continue };
            tracing::debug!(peer, granted, "pre-vote answer");
            if granted {
                yes += 1;
                if yes >= quorum {
                    return true;
                }
            }
        }
        false
    }
}

/// Bound of one pre-vote RPC. Why: a live voter answers in about a ms; one
/// that is down or cut off must not hold the round much past the moment a
/// retry would be due anyway.
const PREVOTE_TIMEOUT: Duration = Duration::from_millis(150);

/// One pre-vote RPC: yes, no, or no answer (counts as no).
async fn ask(http: &reqwest::Client, url: &str, body: Vec<u8>) -> bool {
    let resp = http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .timeout(PREVOTE_TIMEOUT)
        .body(body)
        .send()
        .await;
    let Ok(resp) = resp else { return false };
    match resp.status() {
        reqwest::StatusCode::NOT_FOUND => true,
        s if s.is_success() => match resp.bytes().await {
            Ok(bytes) => decode_message::<PreVoteResponse>(&bytes).is_ok_and(|r| r.granted),
            Err(_) => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;

    fn log(term: u64, index: u64) -> Option<LogId> {
        Some(LogId::new(CommittedLeaderId::new(term, 1), index))
    }

    #[test]
    fn prevote_needs_a_silent_leader_and_a_log_as_long() {
        let yes = Verdict { granted: true, campaign_now: false };
        let no = Verdict { granted: false, campaign_now: false };
        // A live leader (here, or heard from within the lease) refuses.
        assert_eq!(prevote_verdict(true, true, log(3, 10), log(3, 10)), no);
        assert_eq!(prevote_verdict(false, false, log(3, 10), log(3, 10)), no);
        assert_eq!(prevote_verdict(false, false, log(3, 5), log(3, 10)), no);
        // Leader silent: a log at least as long (by term, then index) wins.
        assert_eq!(prevote_verdict(false, true, log(3, 10), log(3, 10)), yes);
        assert_eq!(prevote_verdict(false, true, log(4, 2), log(3, 10)), yes);
        assert_eq!(prevote_verdict(false, true, log(3, 11), log(3, 10)), yes);
        assert_eq!(prevote_verdict(false, true, log(3, 1), None), yes);
        // A shorter log is refused, and the voter campaigns itself.
        let mine_wins = Verdict { granted: false, campaign_now: true };
        assert_eq!(prevote_verdict(false, true, log(3, 9), log(3, 10)), mine_wins);
        assert_eq!(prevote_verdict(false, true, log(2, 50), log(3, 10)), mine_wins);
        assert_eq!(prevote_verdict(false, true, None, log(1, 1)), mine_wins);
    }

    #[test]
    fn waits_cover_the_lease_and_vary() {
        let t = ElectionTiming::new(Duration::from_millis(250), Duration::from_millis(400));
        let waits: Vec<Duration> = (0..200).map(|_| t.campaign_after(random())).collect();
        assert!(waits.iter().all(|w| *w > t.lease && *w <= t.lease + LEASE_MARGIN + t.spread));
        let distinct: std::collections::BTreeSet<_> = waits.iter().collect();
        assert!(distinct.len() > 50, "waits are not random: {distinct:?}");
        let retries: Vec<Duration> = (0..200).map(|_| t.retry_after(random())).collect();
        assert!(retries.iter().all(|r| *r >= RETRY_BASE && *r <= RETRY_BASE + t.spread));
    }
}
