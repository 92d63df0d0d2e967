//! Election nudge: lets the follower with the longer log campaign as soon as
//! it learns that a leader is needed, instead of after a stale penalty.
//!
//! The problem (openraft 0.9.25): a candidate whose vote is refused because a
//! voter has a longer log sets a "seen a greater log" flag that adds
//! `2 x election_timeout_max` to its next election timeout, so that the node
//! with the longer log wins the next round. The flag is cleared only when
//! that node next campaigns, so it survives the election it was meant for;
//! at the next leader failure a node carrying it waits lease + timeout +
//! 800 ms (about 1.6 s with our defaults) while the other follower, often
//! the one with the shorter log (it is the slower one under load), campaigns
//! first, is refused, and the cluster sits leaderless until then. The chaos
//! runs showed this as failovers of 1.6-2.1 s, about half of them.
//!
//! The nudge: a node that refuses a vote *because its own log is longer*,
//! while its leader lease has run out (no append from a leader for longer
//! than `election_timeout_max`, so there is no live leader to disrupt),
//! campaigns at once. That is the election Raft wants (the longer log wins)
//! held right away rather than after a timer. Safety does not depend on
//! timing in Raft: an extra election can cost availability, never data, and
//! the lease check plus a rate limit keep it from competing with a live
//! leader or from repeating. If that campaign is refused because it ran in
//! the candidate's own term, a second one runs a term higher (see
//! `vote_answered`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use openraft::ServerState;

use crate::types::{AppendEntriesResponse, Raft, VoteRequest, VoteResponse};

/// How long the first nudged campaign gets before a second one (a vote round
/// between live peers on loopback takes a few ms).
const SECOND_ROUND_AFTER: Duration = Duration::from_millis(50);

/// Per-node state of the nudge; the RPC handlers feed it.
#[derive(Debug)]
pub struct ElectionNudge {
    /// openraft's leader lease: `election_timeout_max`.
    lease: Duration,
    /// Off: never campaigns (plain openraft behaviour).
    enabled: bool,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Last append (heartbeats included) a leader got accepted here.
    last_append: Option<Instant>,
    /// Last time this node nudged itself into an election.
    last_nudge: Option<Instant>,
}

impl ElectionNudge {
    pub fn new(election_timeout_max: Duration, enabled: bool) -> ElectionNudge {
        ElectionNudge { lease: election_timeout_max, enabled, inner: Mutex::new(Inner::default()) }
    }

    /// An append-entries call finished here with `resp`.
    pub fn append_answered(&self, resp: &AppendEntriesResponse) {
        if !matches!(resp, AppendEntriesResponse::HigherVote(_)) {
            self.inner.lock().expect("nudge lock").last_append = Some(Instant::now());
        }
    }

    /// Should a node that answered `req` with `resp` campaign now?
    fn should_campaign(&self, req: &VoteRequest, resp: &VoteResponse, now: Instant) -> bool {
        if !self.enabled || resp.vote_granted || resp.last_log_id <= req.last_log_id {
            return false;
        }
        let mut inner = self.inner.lock().expect("nudge lock");
        let lease_over = inner.last_append.is_none_or(|t| now.duration_since(t) > self.lease);
        // One nudge per lease: if it did not produce a leader, the regular
        // timers take over.
        let rested = inner.last_nudge.is_none_or(|t| now.duration_since(t) > self.lease);
        if lease_over && rested {
            inner.last_nudge = Some(now);
            true
        } else {
            false
        }
    }

    /// Called after this node answered a vote request.
    pub async fn vote_answered(&self, raft: &Raft, req: &VoteRequest, resp: &VoteResponse) {
        // A leader hears no appends, so its "lease" always looks over; it has
        // nothing to campaign for (openraft steps it down by itself if the
        // candidate's term wins).
        let leading = raft.metrics().borrow().state == ServerState::Leader;
        if !leading && self.should_campaign(req, resp, Instant::now()) {
            tracing::info!(
                candidate = %req.vote,
                candidate_log = ?req.last_log_id,
                my_log = ?resp.last_log_id,
                "refused a candidate with a shorter log and no leader is alive: campaigning now"
            );
            if let Err(e) = raft.trigger().elect().await {
                tracing::warn!("election nudge: {e}");
                return;
            }
            // Why a second round: our term is still the old leader's (a
            // refusal by log does not adopt the candidate's term), so the
            // campaign just started has the candidate's term, and the
            // candidate, having voted for itself in that term, refuses it
            // whenever its node id is the higher one (openraft orders votes of
            // one term by node id). That refusal makes us adopt its vote, so
            // a second campaign runs one term above it and is granted.
            let raft = raft.clone();
            tokio::spawn(async move {
                tokio::time::sleep(SECOND_ROUND_AFTER).await;
                let still_campaigning = raft.metrics().borrow().state == ServerState::Candidate;
                if still_campaigning {
                    tracing::info!("election nudge: first campaign not granted, campaigning one term higher");
                    if let Err(e) = raft.trigger().elect().await {
                        tracing::warn!("election nudge: {e}");
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, LogId, Vote};

    use super::*;

    fn req(last: u64) -> VoteRequest {
        VoteRequest::new(Vote::new(5, 1), Some(LogId::new(CommittedLeaderId::new(4, 2), last)))
    }
    fn resp(granted: bool, last: u64) -> VoteResponse {
        VoteResponse::new(Vote::new(4, 2), Some(LogId::new(CommittedLeaderId::new(4, 2), last)), granted)
    }

    #[test]
    fn campaigns_only_with_a_longer_log_an_expired_lease_and_once_per_lease() {
        let lease = Duration::from_millis(400);
        let n = ElectionNudge::new(lease, true);
        let t0 = Instant::now();
        n.inner.lock().unwrap().last_append = Some(t0);
        // Lease still running: a live leader may exist.
        assert!(!n.should_campaign(&req(10), &resp(false, 12), t0 + Duration::from_millis(100)));
        let later = t0 + Duration::from_millis(500);
        // Granted, or refused for another reason than a shorter log.
        assert!(!n.should_campaign(&req(10), &resp(true, 12), later));
        assert!(!n.should_campaign(&req(12), &resp(false, 12), later));
        assert!(!n.should_campaign(&req(13), &resp(false, 12), later));
        // Longer log here, lease over: campaign, but only once per lease.
        assert!(n.should_campaign(&req(10), &resp(false, 12), later));
        assert!(!n.should_campaign(&req(10), &resp(false, 12), later + Duration::from_millis(100)));
        assert!(n.should_campaign(&req(10), &resp(false, 12), later + Duration::from_millis(500)));
        let off = ElectionNudge::new(lease, false);
        assert!(!off.should_campaign(&req(10), &resp(false, 12), later));
    }
}
