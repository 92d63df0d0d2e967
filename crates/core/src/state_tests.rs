//! Tests of `apply`: scenario tests for each rule, and a property test that
//! runs random command sequences and checks the invariants after every batch.

use std::collections::BTreeMap;

use proptest::prelude::*;
use uuid::Uuid;

use crate::command::{Batch, Command, CompletionReport, Outcome, Rejection};
use crate::graph::is_legal;
use crate::keys;
use crate::kv::{KvRead, MemKv, Overlay};
use crate::model::{Job, JobSpec, JobStatus, WorkerStatus};
use crate::state::{apply, Reader};

/// A tiny harness: a store, a log index and a clock.
struct Sm {
    kv: MemKv,
    index: u64,
}

impl Sm {
    fn new() -> Self {
        Sm { kv: MemKv::default(), index: 0 }
    }

    fn run(&mut self, now: i64, commands: Vec<Command>) -> Vec<Outcome> {
        self.index += 1;
        let mut ov = Overlay::new(&self.kv);
        let out = apply(&mut ov, self.index, &Batch { now_ms: now, commands }).expect("apply");
        let writes = ov.into_writes();
        self.kv.commit(writes);
        out
    }

    fn one(&mut self, now: i64, c: Command) -> Outcome {
        self.run(now, vec![c]).pop().unwrap()
    }

    fn job(&self, id: Uuid) -> Job {
        Reader::new(&self.kv).job(id).unwrap().expect("job exists")
    }
}

fn spec(job_type: &str, priority: i32, max_retries: u32) -> JobSpec {
    JobSpec {
        name: "j".into(),
        job_type: job_type.into(),
        payload: "{}".into(),
        priority,
        max_retries,
        timeout_ms: None,
        run_at: None,
    }
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn submit(n: u128, t: &str, prio: i32, retries: u32) -> Command {
    Command::SubmitJob { job_id: id(n), request_id: None, spec: spec(t, prio, retries) }
}

fn register(w: u128, types: &[&str]) -> Command {
    Command::RegisterWorker {
        worker_id: id(w),
        name: "w".into(),
        capacity: 10,
        job_types: types.iter().map(|s| s.to_string()).collect(),
    }
}

fn acquire(w: u128, max: u32) -> Command {
    Command::AcquireJobs { worker_id: id(w), job_types: vec![], max_jobs: max, lease_ms: 10_000 }
}

fn acquired(o: Outcome) -> Vec<Job> {
    match o {
        Outcome::Acquired { jobs } => jobs,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

#[test]
fn acquire_orders_by_priority_then_submission() {
    let mut sm = Sm::new();
    sm.one(1, register(100, &["a", "b"]));
    sm.run(2, vec![submit(1, "a", 1, 0), submit(2, "b", 5, 0), submit(3, "a", 5, 0), submit(4, "c", 9, 0)]);
    let got: Vec<Uuid> = acquired(sm.one(3, acquire(100, 10))).iter().map(|j| j.id).collect();
    assert_eq!(got, vec![id(2), id(3), id(1)], "type c is not this worker's");
}

#[test]
fn acquisition_issues_increasing_tokens_and_counts_attempts() {
    let mut sm = Sm::new();
    sm.one(1, register(100, &[]));
    sm.one(1, submit(1, "a", 0, 3));
    let j1 = acquired(sm.one(2, acquire(100, 1))).remove(0);
    assert_eq!(j1.attempt, 1);
    let t1 = j1.lease.as_ref().unwrap().fencing_token;
    sm.one(3, Command::ReleaseJob { job_id: id(1), fencing_token: t1 });
    let j2 = acquired(sm.one(4, acquire(100, 1))).remove(0);
    assert_eq!(j2.attempt, 1, "a release does not count as an attempt");
    let t2 = j2.lease.as_ref().unwrap().fencing_token;
    assert!(t2 > t1);
    // The released holder's completion is stale.
    let o = sm.one(
        5,
        Command::CompleteJob { job_id: id(1), fencing_token: t1, report: CompletionReport::Succeeded { result: None } },
    );
    assert!(matches!(o, Outcome::Rejected(Rejection::StaleToken { current: Some(t) }) if t == t2));
    let o = sm.one(
        6,
        Command::CompleteJob {
            job_id: id(1),
            fencing_token: t2,
            report: CompletionReport::Succeeded { result: Some("1".into()) },
        },
    );
    assert!(matches!(o, Outcome::Job { ref job } if job.status == JobStatus::Completed));
    // Terminal: nothing moves it any more.
    assert!(matches!(
        sm.one(7, Command::CancelJob { job_id: id(1) }),
        Outcome::Rejected(Rejection::WrongStatus { .. })
    ));
    assert!(acquired(sm.one(8, acquire(100, 1))).is_empty());
}

#[test]
fn failures_back_off_then_die_after_max_retries() {
    let mut sm = Sm::new();
    sm.one(0, register(100, &[]));
    sm.one(0, submit(1, "a", 0, 2));
    let mut now = 1;
    for attempt in 1..=3u32 {
        let j = acquired(sm.one(now, acquire(100, 1))).remove(0);
        assert_eq!(j.attempt, attempt);
        let t = j.lease.unwrap().fencing_token;
        let o = sm.one(
            now,
            Command::CompleteJob {
                job_id: id(1),
                fencing_token: t,
                report: CompletionReport::Failed { error: "x".into() },
            },
        );
        let job = match o {
            Outcome::Job { job } => job,
            o => panic!("{o:?}"),
        };
        if attempt < 3 {
            assert_eq!(job.status, JobStatus::Failed);
            assert!(job.ready_at > now);
            // Not acquirable before the backoff ends...
            assert!(acquired(sm.one(job.ready_at - 1, acquire(100, 1))).is_empty());
            now = job.ready_at;
            // ...and Pending again once it has.
            sm.one(now, Command::Tick);
            assert_eq!(sm.job(id(1)).status, JobStatus::Pending);
        } else {
            assert_eq!(job.status, JobStatus::Dead);
            assert_eq!(job.attempt, 3);
        }
    }
}

#[test]
fn lease_expiry_respects_heartbeat_extension() {
    let mut sm = Sm::new();
    sm.one(0, register(100, &[]));
    sm.one(0, submit(1, "a", 0, 0));
    let t = acquired(sm.one(1000, acquire(100, 1)))[0].lease.as_ref().unwrap().fencing_token;
    // Lease runs to 11_000; a heartbeat at 9_000 extends it to 19_000.
    sm.one(9_000, Command::Heartbeat { worker_id: id(100), jobs: Some(vec![(id(1), t)]) });
    assert!(matches!(
        sm.one(12_000, Command::ExpireLease { job_id: id(1), fencing_token: t }),
        Outcome::Monitor { changed: 0 }
    ));
    assert_eq!(sm.job(id(1)).status, JobStatus::Running);
    assert!(matches!(
        sm.one(19_000, Command::ExpireLease { job_id: id(1), fencing_token: t }),
        Outcome::Monitor { changed: 1 }
    ));
    // max_retries 0: the expired attempt was the last.
    assert_eq!(sm.job(id(1)).status, JobStatus::Dead);
}

#[test]
fn lease_index_yields_only_due_leases_earliest_first() {
    let mut sm = Sm::new();
    sm.one(0, register(100, &[]));
    for n in 1..=3 {
        sm.one(0, submit(n, "a", 0, 0));
    }
    // 10 s leases taken at 1 s, 2 s and 3 s: they run to 11 s, 12 s, 13 s.
    let mut tokens = Vec::new();
    for t in 1..=3 {
        tokens.push(acquired(sm.one(t * 1000, acquire(100, 1)))[0].lease.as_ref().unwrap().fencing_token);
    }
    let due = |sm: &Sm, now: i64, max: usize| -> Vec<Uuid> {
        Reader::new(&sm.kv).leases_due_by(now, max).unwrap().iter().map(|j| j.id).collect()
    };
    assert!(due(&sm, 10_999, 100).is_empty());
    assert_eq!(due(&sm, 12_000, 100), vec![id(1), id(2)]);
    assert_eq!(due(&sm, 60_000, 1), vec![id(1)]);
    // A heartbeat for job 1 at 5 s moves its expiry to 15 s; completing job 2
    // takes it out of the index.
    sm.one(5_000, Command::Heartbeat { worker_id: id(100), jobs: Some(vec![(id(1), tokens[0])]) });
    sm.one(
        5_000,
        Command::CompleteJob {
            job_id: id(2),
            fencing_token: tokens[1],
            report: CompletionReport::Succeeded { result: None },
        },
    );
    assert_eq!(due(&sm, 13_000, 100), vec![id(3)]);
    assert_eq!(due(&sm, 60_000, 100), vec![id(3), id(1)]);
    let running: Vec<Uuid> = Reader::new(&sm.kv).running_jobs().unwrap().iter().map(|j| j.id).collect();
    assert_eq!(running, vec![id(3), id(1)]);
    check_indexes(&sm.kv);
}

#[test]
fn heartbeat_revokes_jobs_not_held() {
    let mut sm = Sm::new();
    sm.one(0, register(100, &[]));
    sm.one(0, submit(1, "a", 0, 0));
    let t = acquired(sm.one(1, acquire(100, 1)))[0].lease.as_ref().unwrap().fencing_token;
    match sm.one(2, Command::Heartbeat { worker_id: id(100), jobs: Some(vec![(id(1), t), (id(1), t + 1), (id(9), 1)]) })
    {
        Outcome::Heartbeat { revoked, .. } => assert_eq!(revoked, vec![id(1), id(9)]),
        o => panic!("{o:?}"),
    }
}

#[test]
fn dead_worker_releases_its_jobs_and_must_reregister() {
    let mut sm = Sm::new();
    sm.one(0, register(100, &[]));
    sm.run(0, vec![submit(1, "a", 0, 1), submit(2, "a", 0, 0)]);
    acquired(sm.one(1, acquire(100, 2)));
    // A heartbeat changed last_heartbeat_at: the stale monitor command is a no-op.
    sm.one(5, Command::Heartbeat { worker_id: id(100), jobs: None });
    assert!(matches!(
        sm.one(6, Command::MarkWorkerDead { worker_id: id(100), last_heartbeat_at: 1 }),
        Outcome::Monitor { changed: 0 }
    ));
    assert!(matches!(
        sm.one(7, Command::MarkWorkerDead { worker_id: id(100), last_heartbeat_at: 5 }),
        Outcome::Monitor { changed: 3 }
    ));
    assert_eq!(sm.job(id(1)).status, JobStatus::Pending);
    assert_eq!(sm.job(id(2)).status, JobStatus::Dead);
    assert!(matches!(sm.one(8, acquire(100, 1)), Outcome::Rejected(Rejection::WorkerDead)));
    assert!(matches!(
        sm.one(8, Command::Heartbeat { worker_id: id(100), jobs: None }),
        Outcome::Rejected(Rejection::WorkerDead)
    ));
    sm.one(9, register(100, &[]));
    assert_eq!(acquired(sm.one(10, acquire(100, 1))).len(), 1);
}

#[test]
fn request_id_dedupes_and_purge_removes_finished_jobs() {
    let mut sm = Sm::new();
    let with_rid = |n| Command::SubmitJob { job_id: id(n), request_id: Some("r1".into()), spec: spec("a", 0, 0) };
    assert!(matches!(sm.one(0, with_rid(1)), Outcome::Submitted { created: true, .. }));
    match sm.one(0, with_rid(2)) {
        Outcome::Submitted { job, created: false } => assert_eq!(job.id, id(1)),
        o => panic!("{o:?}"),
    }
    sm.one(1, Command::CancelJob { job_id: id(1) });
    assert!(matches!(
        sm.one(5, Command::PurgeFinished { finished_before: 2, max_jobs: 10 }),
        Outcome::Monitor { changed: 1 }
    ));
    assert!(Reader::new(&sm.kv).job(id(1)).unwrap().is_none());
    check_indexes(&sm.kv);
    // Only clock and sequence meta remain.
    assert!(sm.kv.map.keys().all(|k| k[0] == keys::META), "{:?}", sm.kv.map.keys().collect::<Vec<_>>());
}

#[test]
fn time_never_moves_backwards() {
    let mut sm = Sm::new();
    sm.one(1000, Command::Tick);
    sm.one(500, submit(1, "a", 0, 0));
    assert_eq!(sm.job(id(1)).created_at, 1000);
    assert_eq!(Reader::new(&sm.kv).clock().unwrap(), 1000);
}

#[test]
fn delayed_job_waits_for_run_at() {
    let mut sm = Sm::new();
    sm.one(0, register(100, &[]));
    let mut s = spec("a", 0, 0);
    s.run_at = Some(5000);
    sm.one(0, Command::SubmitJob { job_id: id(1), request_id: None, spec: s });
    assert!(acquired(sm.one(4999, acquire(100, 1))).is_empty());
    assert_eq!(acquired(sm.one(5000, acquire(100, 1))).len(), 1);
}

#[test]
fn invalid_spec_is_rejected_by_apply_too() {
    let mut sm = Sm::new();
    let o = sm.one(0, submit(1, "", 0, 0));
    assert!(matches!(o, Outcome::Rejected(Rejection::Invalid { ref field, .. }) if field == "type"));
    assert!(sm.kv.map.keys().all(|k| k[0] == keys::META));
}

/// Golden bytes: the stored encoding of a job must not change silently.
#[test]
fn job_record_encoding_is_stable() {
    let job = Job {
        id: id(1),
        seq: 2,
        spec: spec("t", -1, 3),
        request_id: Some("r".into()),
        status: JobStatus::Running,
        attempt: 1,
        lease: Some(crate::model::Lease { worker_id: id(2), fencing_token: 7, expires_at: 9, duration_ms: 10 }),
        last_token: 7,
        ready_at: 4,
        created_at: 4,
        started_at: Some(5),
        completed_at: None,
        updated_at: 5,
        last_error: None,
        result: None,
    };
    let bytes = keys::encode(&job);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        "0110000000000000000000000000000000000000000000000102000000000000000100000000000000\
6a01000000000000007402000000000000007b7dffffffff0300000000000101000000000000007201000000\
0100000001100000000000000000000000000000000000000000000002070000000000000009000000000000\
000a000000000000000700000000000000040000000000000004000000000000000105000000000000000005\
000000000000000000",
        "job encoding changed: bump keys::FORMAT_VERSION and migrate"
    );
    let back: Job = keys::decode(&bytes).unwrap();
    assert_eq!(back, job);
}

// ----- invariants --------------------------------------------------------

/// Every index entry points at a job that belongs there, and every job is in
/// exactly the indexes its status and clock call for.
fn check_indexes(kv: &MemKv) {
    let r = Reader::new(kv);
    let clock = r.clock().unwrap();
    let jobs: BTreeMap<Uuid, Job> = kv
        .scan(&[keys::JOB], &[keys::JOB], usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(_, v)| {
            let j: Job = keys::decode(&v).unwrap();
            (j.id, j)
        })
        .collect();
    let mut expected: BTreeMap<Vec<u8>, Uuid> = BTreeMap::new();
    for j in jobs.values() {
        expected.insert(keys::by_seq(j.seq), j.id);
        expected.insert(keys::by_status(j.status, j.seq), j.id);
        if let Some(r) = &j.request_id {
            expected.insert(keys::request(r), j.id);
        }
        match j.status {
            JobStatus::Pending if j.ready_at <= clock => {
                expected.insert(keys::ready_any(j.spec.priority, j.seq), j.id);
                expected.insert(keys::ready_type(&j.spec.job_type, j.spec.priority, j.seq), j.id);
            }
            JobStatus::Pending => {
                expected.insert(keys::delayed(j.ready_at, j.seq), j.id);
            }
            JobStatus::Failed => {
                assert!(j.ready_at > clock, "a due Failed job was not promoted");
                expected.insert(keys::delayed(j.ready_at, j.seq), j.id);
            }
            JobStatus::Completed | JobStatus::Dead => {
                expected.insert(keys::finished(j.completed_at.unwrap(), j.seq), j.id);
            }
            JobStatus::Running => {
                let lease = j.lease.as_ref().expect("a Running job holds a lease");
                expected.insert(keys::lease_expiry(lease.expires_at, j.seq), j.id);
            }
        }
        assert!(j.attempt <= j.max_attempts(), "attempts exceed maxRetries + 1");
        assert_eq!(j.lease.is_some(), j.status == JobStatus::Running);
    }
    let actual: BTreeMap<Vec<u8>, Uuid> = kv
        .map
        .iter()
        .filter(|(k, _)| ![keys::JOB, keys::WORKER, keys::META].contains(&k[0]))
        .map(|(k, v)| (k.clone(), keys::id_from_value(v).unwrap()))
        .collect();
    assert_eq!(actual, expected, "indexes disagree with job records");
}

fn arb_command() -> impl Strategy<Value = (i64, Command)> {
    let jid = 1u128..6;
    let wid = 100u128..103;
    let t = prop_oneof![Just("a"), Just("b")];
    let cmd = prop_oneof![
        (jid.clone(), t.clone(), -2i32..3, 0u32..3).prop_map(|(j, t, p, r)| submit(j, t, p, r)),
        (jid.clone(), t, 0i64..3000).prop_map(|(j, t, d)| Command::SubmitJob {
            job_id: id(j + 10),
            request_id: None,
            spec: JobSpec { run_at: Some(d), ..spec(t, 0, 1) },
        }),
        wid.clone().prop_map(|w| register(w, &[])),
        (wid.clone(), 1u32..3).prop_map(|(w, m)| acquire(w, m)),
        (jid.clone(), 0u64..30, any::<bool>()).prop_map(|(j, tok, ok)| Command::CompleteJob {
            job_id: id(j),
            fencing_token: tok,
            report: if ok {
                CompletionReport::Succeeded { result: None }
            } else {
                CompletionReport::Failed { error: "e".into() }
            },
        }),
        (jid.clone(), 0u64..30).prop_map(|(j, tok)| Command::ReleaseJob { job_id: id(j), fencing_token: tok }),
        (jid.clone(), 0u64..30).prop_map(|(j, tok)| Command::ExpireLease { job_id: id(j), fencing_token: tok }),
        jid.prop_map(|j| Command::CancelJob { job_id: id(j) }),
        wid.clone().prop_map(|w| Command::Heartbeat { worker_id: id(w), jobs: None }),
        (wid.clone(), 0i64..40_000)
            .prop_map(|(w, t)| Command::MarkWorkerDead { worker_id: id(w), last_heartbeat_at: t }),
        wid.prop_map(|w| Command::DeregisterWorker { worker_id: id(w) }),
        (0i64..40_000).prop_map(|t| Command::PurgeFinished { finished_before: t, max_jobs: 3 }),
        Just(Command::Tick),
    ];
    // Time mostly advances but sometimes steps back (a slow new leader).
    (-500i64..2_000, cmd)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Random histories keep every invariant, only make legal transitions,
    /// and replaying the same history gives byte-identical state.
    #[test]
    fn random_histories_keep_invariants(steps in proptest::collection::vec(arb_command(), 1..60)) {
        let mut sm = Sm::new();
        let mut replica = Sm::new();
        let mut now = 0i64;
        for (dt, cmd) in steps {
            now += dt;
            let before: BTreeMap<Uuid, Job> = all_jobs(&sm.kv);
            let out = sm.run(now, vec![cmd.clone()]);
            let out2 = replica.run(now, vec![cmd]);
            prop_assert_eq!(&out, &out2);
            let after = all_jobs(&sm.kv);
            for (id, old) in &before {
                if let Some(new) = after.get(id) {
                    // A batch first promotes due retries (Failed -> Pending)
                    // and then applies its command, so one step may show
                    // that promotion followed by one legal move.
                    let legal = old.status == new.status
                        || is_legal(old.status, new.status)
                        || (old.status == JobStatus::Failed && is_legal(JobStatus::Pending, new.status));
                    prop_assert!(legal, "illegal {:?} -> {:?}", old.status, new.status);
                    if old.status.is_terminal() {
                        prop_assert_eq!(old, new, "terminal job changed");
                    }
                    prop_assert!(new.last_token >= old.last_token);
                }
            }
            for w in Reader::new(&sm.kv).workers().unwrap() {
                if w.status == WorkerStatus::Dead {
                    prop_assert!(Reader::new(&sm.kv).running_jobs_of(w.id).unwrap().is_empty());
                }
            }
            check_indexes(&sm.kv);
        }
        prop_assert_eq!(&sm.kv, &replica.kv);
    }
}

fn all_jobs(kv: &MemKv) -> BTreeMap<Uuid, Job> {
    kv.scan(&[keys::JOB], &[keys::JOB], usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(_, v)| {
            let j: Job = keys::decode(&v).unwrap();
            (j.id, j)
        })
        .collect()
}
