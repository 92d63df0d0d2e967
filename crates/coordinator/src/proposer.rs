//! The leader's write path: stamps leader time on commands and proposes them
//! to Raft, packing concurrent commands into one entry (group commit).
//!
//! Why batching: each Raft entry costs one fsync on a quorum. Commands that
//! arrive while earlier entries are in flight wait in the queue and leave
//! together as one [`Batch`], so throughput grows with concurrency while a
//! lone client still pays a single round trip. At most `MAX_IN_FLIGHT`
//! entries are outstanding; that bound is what lets a queue form.
//!
//! Time: `now_ms` is read once per batch on the leader. The state machine
//! keeps the largest time it has seen, so a new leader with a slower clock
//! cannot move time backwards.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use jobsched_core::{Batch, Command, Outcome};
use jobsched_raft::Raft;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::node::WriteError;

/// Where the proposer's entries go: Raft's `client_write` in the node; the
/// unit tests use writers that stall to check the slot accounting.
pub trait EntryWriter: Clone + Send + Sync + 'static {
    fn write(&self, batch: Batch) -> impl Future<Output = Result<Vec<Outcome>, WriteError>> + Send;
}

impl EntryWriter for Raft {
    fn write(&self, batch: Batch) -> impl Future<Output = Result<Vec<Outcome>, WriteError>> + Send {
        crate::node::client_write(self, batch)
    }
}

/// Wall-clock source in milliseconds since the epoch; injectable for tests.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| chrono::Utc::now().timestamp_millis())
}

/// Raft entries proposed but not yet committed, at most.
///
/// Why 2 (was 4): every entry has a fixed cost on each node (a log append, a
/// WAL group, an apply step, openraft's hand-offs), so on a busy cluster
/// fewer, larger entries buy throughput; two in flight still let one entry
/// leave while a large one (a batch submit) commits. Release A/B on one
/// machine (`jobsched-bench submit -c 64` and `e2e -c 64 --slots 8`, fresh
/// cluster per run): entries per job roughly halved, cluster CPU per job
/// 5-15 % lower; a lone client is unaffected (it always finds a free slot).
const MAX_IN_FLIGHT: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader")]
    NotLeader { leader: Option<String> },
    #[error("timed out waiting for commit")]
    Timeout,
    #[error("raft failure: {0}")]
    Fatal(String),
}

/// One caller's commands. They always travel in the same Raft entry (so a
/// batch submit is all-or-nothing), possibly together with other callers'.
struct Pending {
    cmds: Vec<Command>,
    reply: oneshot::Sender<Result<Vec<Outcome>, ProposeError>>,
}

#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Pending>,
    timeout: Duration,
}

impl Proposer {
    pub fn start(writer: impl EntryWriter, clock: Clock, max_batch: usize, timeout: Duration) -> Proposer {
        let (tx, rx) = mpsc::channel(max_batch * MAX_IN_FLIGHT * 4);
        tokio::spawn(run(writer, clock, rx, max_batch, timeout));
        Proposer { tx, timeout }
    }

    /// Propose several commands in one Raft entry (committed and applied
    /// together, in this order) and wait for their outcomes.
    pub async fn propose_all(&self, cmds: Vec<Command>) -> Result<Vec<Outcome>, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Pending { cmds, reply }).await.map_err(|_| ProposeError::Fatal("proposer stopped".into()))?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ProposeError::Fatal("proposal dropped".into())),
            Err(_) => Err(ProposeError::Timeout),
        }
    }
}

async fn run<W: EntryWriter>(
    writer: W,
    clock: Clock,
    mut rx: mpsc::Receiver<Pending>,
    max_batch: usize,
    timeout: Duration,
) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        // Wait for a free slot *before* draining the queue: everything that
        // arrives meanwhile joins this batch.
        let Ok(permit) = slots.clone().acquire_owned().await else { break };
        // A caller's group is never split; a group larger than max_batch
        // (a batch submit) simply makes a larger entry on its own.
        let mut size = first.cmds.len();
        let mut batch = vec![first];
        while size < max_batch {
            match rx.try_recv() {
                Ok(p) => {
                    size += p.cmds.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let writer = writer.clone();
        let now_ms = clock();
        tokio::spawn(async move {
            let _permit = permit;
            let mut commands = Vec::with_capacity(size);
            let mut replies = Vec::with_capacity(batch.len());
            for p in batch {
                replies.push((p.cmds.len(), p.reply));
                commands.extend(p.cmds);
            }
            let n = commands.len();
            // Why a bound here too (callers have their own): an entry
            // appended by a leader that is then cut off and deposed is
            // truncated by the next leader, and openraft 0.9 never answers
            // its client_write. Unbounded, each such entry kept its
            // in-flight slot forever; after MAX_IN_FLIGHT of them this
            // node's proposer was dead, and when the node was elected again
            // it accepted no write at all (found by the partition soak: 60-90
            // s outages with a healthy Raft quorum). The outcome of a timed
            // out entry is unknown, as for the callers.
            let written = tokio::time::timeout(timeout, writer.write(Batch { now_ms, commands }));
            let Ok(written) = written.await else {
                tracing::warn!(commands = n, "proposal not answered within the propose timeout; slot released");
                for (_, reply) in replies {
                    let _ = reply.send(Err(ProposeError::Timeout));
                }
                return;
            };
            match written {
                Ok(outcomes) if outcomes.len() == n => {
                    let mut outcomes = outcomes.into_iter();
                    for (count, reply) in replies {
                        let _ = reply.send(Ok(outcomes.by_ref().take(count).collect()));
                    }
                }
                Ok(outcomes) => {
                    let msg = format!("state machine returned {} outcomes for {n} commands", outcomes.len());
                    tracing::error!("{msg}");
                    for (_, reply) in replies {
                        let _ = reply.send(Err(ProposeError::Fatal(msg.clone())));
                    }
                }
                Err(e) => {
                    let err = match e {
                        WriteError::ForwardToLeader { leader_addr } => ProposeError::NotLeader { leader: leader_addr },
                        other => ProposeError::Fatal(other.to_string()),
                    };
                    for (_, reply) in replies {
                        let _ = reply.send(Err(match &err {
                            ProposeError::NotLeader { leader } => ProposeError::NotLeader { leader: leader.clone() },
                            ProposeError::Timeout => ProposeError::Timeout,
                            ProposeError::Fatal(m) => ProposeError::Fatal(m.clone()),
                        }));
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Never answers its first `stalled` entries (like openraft 0.9 with
    /// the entries of a leader that was cut off and deposed), then answers
    /// every command with `Outcome::Monitor { changed: 0 }`.
    #[derive(Clone)]
    struct StallingWriter {
        calls: Arc<AtomicUsize>,
        stalled: usize,
    }

    impl EntryWriter for StallingWriter {
        fn write(&self, batch: Batch) -> impl Future<Output = Result<Vec<Outcome>, WriteError>> + Send {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            let stall = call < self.stalled;
            async move {
                if stall {
                    std::future::pending::<()>().await;
                }
                Ok(batch.commands.iter().map(|_| Outcome::Monitor { changed: 0 }).collect())
            }
        }
    }

    fn cmd() -> Vec<Command> {
        vec![Command::CancelJob { job_id: uuid::Uuid::new_v4() }]
    }

    /// Regression (found by the partition soak): entries that are never
    /// answered must not keep the in-flight slots. Steps: fill every slot
    /// with an entry the writer never answers; those callers get `Timeout`;
    /// a later proposal still reaches the writer and is answered. Before the
    /// fix the later one waited for a slot forever (and timed out too).
    #[tokio::test]
    async fn unanswered_entries_release_their_slots() {
        let calls = Arc::new(AtomicUsize::new(0));
        let writer = StallingWriter { calls: calls.clone(), stalled: MAX_IN_FLIGHT };
        let timeout = Duration::from_millis(300);
        let proposer = Proposer::start(writer, Arc::new(|| 0), 256, timeout);
        let mut stuck = Vec::new();
        for _ in 0..MAX_IN_FLIGHT {
            let p = proposer.clone();
            stuck.push(tokio::spawn(async move { p.propose_all(cmd()).await }));
            // One entry each: let the proposer take this one alone.
            while calls.load(Ordering::SeqCst) < stuck.len() {
                tokio::task::yield_now().await;
            }
        }
        for s in stuck {
            assert!(matches!(s.await.unwrap(), Err(ProposeError::Timeout)));
        }
        let later = proposer.propose_all(cmd()).await;
        assert!(
            matches!(later.as_deref(), Ok([Outcome::Monitor { changed: 0 }])),
            "a later proposal was not written: {later:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), MAX_IN_FLIGHT + 1);
    }
}
