//! Store tests against real RocksDB in temp dirs: openraft's storage suite,
//! durability across reopen, snapshot round trips and crash-safe install.

use std::collections::{BTreeMap, BTreeSet};

use jobsched_core::{Batch, Command, JobSpec, JobStatus, Outcome, Reader};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, RaftLogReader, RaftSnapshotBuilder};
use tempfile::TempDir;
use uuid::Uuid;

use super::state_machine::{snapshot_file_name, test_support};
use super::*;
use crate::types::{Entry, LogId, Membership, Node, SnapshotMeta, StorageError, TypeConfig, Vote};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = TempDir::new()
            .map_err(|e| StorageError::from_io_error(openraft::ErrorSubject::Store, openraft::ErrorVerb::Write, e))?;
        let (log, sm) = open_stores(dir.path())
            .map_err(|e| StorageError::from(openraft::StorageIOError::write(openraft::AnyError::new(&e))))?;
        Ok((dir, log, sm))
    }
}

/// openraft's own conformance suite (log, vote, purge, truncate, applied
/// state, snapshot transfer).
#[test]
fn openraft_storage_suite() -> Result<(), StorageError> {
    Suite::test_all(Builder)
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn spec(name: &str) -> JobSpec {
    JobSpec {
        name: name.into(),
        job_type: "email".into(),
        payload: "{}".into(),
        priority: 0,
        max_retries: 2,
        timeout_ms: None,
        run_at: None,
    }
}

fn submit_entry(index: u64, n: u128) -> Entry {
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(Batch {
            now_ms: 1_000 + index as i64,
            commands: vec![Command::SubmitJob {
                job_id: Uuid::from_u128(n),
                request_id: Some(format!("req-{n}")),
                spec: spec(&format!("job-{n}")),
            }],
        }),
    }
}

fn membership_entry(index: u64) -> Entry {
    let nodes: BTreeMap<u64, Node> = (1..=3).map(|i| (i, Node::new(format!("127.0.0.1:{}", 7000 + i)))).collect();
    let voters: BTreeSet<u64> = nodes.keys().copied().collect();
    Entry { log_id: log_id(1, index), payload: EntryPayload::Membership(Membership::new(vec![voters], nodes)) }
}

/// A blank, a membership and `n` submits, starting at index 1.
fn history(n: u64) -> Vec<Entry> {
    let mut v = vec![Entry { log_id: log_id(1, 1), payload: EntryPayload::Blank }, membership_entry(2)];
    v.extend((0..n).map(|i| submit_entry(3 + i, u128::from(i) + 1)));
    v
}

#[tokio::test]
async fn log_and_vote_survive_reopen() {
    let dir = TempDir::new().unwrap();
    let entries = history(5);
    {
        let (mut log, _sm) = open_stores(dir.path()).unwrap();
        log.blocking_append(entries.clone()).await.unwrap();
        log.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
        log.save_committed(Some(log_id(1, 4))).await.unwrap();
        log.purge(log_id(1, 2)).await.unwrap();
    }
    let (mut log, _sm) = open_stores(dir.path()).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new_committed(1, 1)));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 4)));
    let got = log.try_get_log_entries(0..).await.unwrap();
    assert_eq!(got, entries[2..].to_vec());
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_purged_log_id, Some(log_id(1, 2)));
    assert_eq!(st.last_log_id, Some(log_id(1, 7)));

    // Truncate a suffix; survives reopen too.
    log.truncate(log_id(1, 6)).await.unwrap();
    drop(log);
    drop(_sm);
    let (mut log, _sm) = open_stores(dir.path()).unwrap();
    assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(log_id(1, 5)));
    assert_eq!(log.try_get_log_entries(3..=5).await.unwrap().len(), 3);
}

/// An append RPC carries at most `MAX_APPEND_BYTES` of entries (at least
/// one, however big), in order and without gaps; plain reads are not cut.
#[tokio::test]
async fn append_reads_are_capped_by_bytes() {
    use super::log_store::MAX_APPEND_BYTES;
    let dir = TempDir::new().unwrap();
    let (mut log, _sm) = open_stores(dir.path()).unwrap();
    // 10 entries of ~300 KiB each (a batch submit's worth of payload).
    let big = |index: u64| {
        let mut e = submit_entry(index, u128::from(index));
        if let EntryPayload::Normal(b) = &mut e.payload {
            if let Command::SubmitJob { spec, .. } = &mut b.commands[0] {
                spec.payload = "x".repeat(300 << 10);
            }
        }
        e
    };
    let entries: Vec<Entry> = (1..=10).map(big).collect();
    log.blocking_append(entries.clone()).await.unwrap();
    let first = log.limited_get_log_entries(1, 11).await.unwrap();
    let per_entry = 300 << 10;
    assert_eq!(first.len(), MAX_APPEND_BYTES.div_ceil(per_entry), "stops once the cap is reached");
    assert_eq!(first, entries[..first.len()].to_vec());
    let next = first.len() as u64 + 1;
    let rest = log.limited_get_log_entries(next, 11).await.unwrap();
    assert_eq!(rest.first().map(|e| e.log_id.index), Some(next));
    // One entry larger than the cap still goes, alone.
    let mut huge = big(11);
    if let EntryPayload::Normal(b) = &mut huge.payload {
        if let Command::SubmitJob { spec, .. } = &mut b.commands[0] {
            spec.payload = "y".repeat(MAX_APPEND_BYTES + 1);
        }
    }
    log.blocking_append(vec![huge.clone()]).await.unwrap();
    assert_eq!(log.limited_get_log_entries(11, 12).await.unwrap(), vec![huge]);
    assert_eq!(log.try_get_log_entries(1..12).await.unwrap().len(), 11);
}

/// Short ranges are read with point lookups, long ones with an iterator:
/// both give the same entries at every edge (purged front, end of the log,
/// a range past the end, after a truncate and a re-append).
#[tokio::test]
async fn short_and_long_log_reads_agree() {
    let dir = TempDir::new().unwrap();
    let (mut log, _sm) = open_stores(dir.path()).unwrap();
    log.blocking_append((1..=150).map(|i| submit_entry(i, u128::from(i))).collect::<Vec<_>>()).await.unwrap();
    log.purge(log_id(1, 20)).await.unwrap();
    log.truncate(log_id(1, 141)).await.unwrap();
    log.blocking_append((141..=145).map(|i| submit_entry(i, 1_000 + u128::from(i))).collect::<Vec<_>>()).await.unwrap();
    let indexes = |v: Vec<Entry>| v.iter().map(|e| e.log_id.index).collect::<Vec<_>>();
    // What exists: 21..=145, entries 141.. rewritten.
    let all = log.try_get_log_entries(0..1_000).await.unwrap();
    assert_eq!(indexes(all.clone()), (21..=145).collect::<Vec<_>>());
    for (start, end) in
        [(1, 30), (15, 25), (20, 21), (21, 22), (21, 85), (100, 140), (130, 150), (145, 146), (146, 150), (200, 210)]
    {
        let want: Vec<Entry> = all.iter().filter(|e| (start..end).contains(&e.log_id.index)).cloned().collect();
        assert_eq!(log.try_get_log_entries(start..end).await.unwrap(), want, "{start}..{end}");
        assert_eq!(log.limited_get_log_entries(start, end).await.unwrap(), want, "limited {start}..{end}");
    }
    let rewritten = log.try_get_log_entries(141..142).await.unwrap();
    assert_eq!(rewritten, vec![submit_entry(141, 1_141)]);
}

#[tokio::test]
async fn state_machine_survives_reopen() {
    let dir = TempDir::new().unwrap();
    let (digest_before, kv_check) = {
        let (_log, mut sm) = open_stores(dir.path()).unwrap();
        let mut applied = sm.subscribe_applied();
        let out = sm.apply(history(10)).await.unwrap();
        assert_eq!(out.len(), 12);
        assert!(out[0].is_empty() && out[1].is_empty(), "blank and membership answer nothing");
        assert!(matches!(&out[2][..], [Outcome::Submitted { created: true, .. }]));
        assert!(applied.has_changed().unwrap());
        assert_eq!(*applied.borrow_and_update(), 12);

        // A retried submit (same request id) returns the first job.
        let retry = Entry {
            log_id: log_id(1, 13),
            payload: EntryPayload::Normal(Batch {
                now_ms: 5_000,
                commands: vec![Command::SubmitJob {
                    job_id: Uuid::from_u128(999),
                    request_id: Some("req-1".into()),
                    spec: spec("dup"),
                }],
            }),
        };
        let out = sm.apply([retry]).await.unwrap();
        match &out[0][..] {
            [Outcome::Submitted { job, created: false }] => assert_eq!(job.id, Uuid::from_u128(1)),
            other => panic!("unexpected {other:?}"),
        }
        (sm.digest().await.unwrap(), sm.kv())
    };
    drop(kv_check);

    let (_log, mut sm) = open_stores(dir.path()).unwrap();
    let (applied, membership) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 13)));
    assert_eq!(membership.log_id(), &Some(log_id(1, 2)));
    assert_eq!(membership.voter_ids().collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(sm.digest().await.unwrap(), digest_before);
    assert_eq!(digest_before.0, Some(13));
    assert_eq!(*sm.subscribe_applied().borrow(), 13);

    let kv = sm.kv();
    assert_eq!(kv.last_applied_index().unwrap(), Some(13));
    let reader = Reader::new(&kv);
    assert_eq!(reader.count_by_status(JobStatus::Pending).unwrap(), 10);
    let job = reader.job(Uuid::from_u128(3)).unwrap().unwrap();
    assert_eq!(job.spec.name, "job-3");
    let (page, next) = kv.read_consistent(|r| Reader::new(r).list_jobs(None, None, 4)).unwrap().unwrap();
    assert_eq!(page.len(), 4);
    assert_eq!(next, Some(page[3].seq));
}

async fn build_snapshot(sm: &mut StateMachineStore) -> crate::types::Snapshot {
    sm.get_snapshot_builder().await.build_snapshot().await.unwrap()
}

#[tokio::test]
async fn snapshot_round_trip_between_stores() {
    let a_dir = TempDir::new().unwrap();
    let b_dir = TempDir::new().unwrap();
    let (_la, mut a) = open_stores(a_dir.path()).unwrap();
    let (_lb, mut b) = open_stores(b_dir.path()).unwrap();
    a.apply(history(50)).await.unwrap();
    // B has some state of its own that the install must replace entirely.
    b.apply(vec![submit_entry(1, 777)]).await.unwrap();

    let first = build_snapshot(&mut a).await;
    a.apply(vec![submit_entry(53, 1000)]).await.unwrap();
    let snap = build_snapshot(&mut a).await;
    assert_eq!(snap.meta.last_log_id, Some(log_id(1, 53)));
    assert_ne!(first.meta.snapshot_id, snap.meta.snapshot_id);
    // Only the newest snapshot file remains.
    let files: Vec<_> = std::fs::read_dir(a_dir.path().join("snapshots")).unwrap().collect();
    assert_eq!(files.len(), 1);
    let current = a.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, snap.meta);

    // Stream it into B the way openraft does: write into the receive file.
    let mut recv = b.begin_receiving_snapshot().await.unwrap();
    let mut src = current.snapshot;
    tokio::io::copy(&mut *src, &mut *recv).await.unwrap();
    b.install_snapshot(&snap.meta, recv).await.unwrap();

    let da = a.digest().await.unwrap();
    let db = b.digest().await.unwrap();
    assert_eq!(da, db);
    assert_eq!(da.0, Some(53));
    assert_eq!(b.applied_state().await.unwrap(), (snap.meta.last_log_id, snap.meta.last_membership.clone()));
    assert_eq!(b.get_current_snapshot().await.unwrap().unwrap().meta, snap.meta);
    assert_eq!(*b.subscribe_applied().borrow(), 53);
    let files: Vec<_> = std::fs::read_dir(b_dir.path().join("snapshots")).unwrap().collect();
    assert_eq!(files.len(), 1, "receive file renamed into place, nothing left over");

    // B's own request id went with its state; A's came with the snapshot.
    use jobsched_core::KvRead;
    let kv_b = b.kv();
    assert_eq!(kv_b.get(&jobsched_core::keys::request("req-777")).unwrap(), None);
    assert_eq!(kv_b.get(&jobsched_core::keys::request("req-9")).unwrap(), Some(Uuid::from_u128(9).as_bytes().to_vec()));

    // B keeps applying from there.
    b.apply(vec![submit_entry(54, 2000)]).await.unwrap();
    a.apply(vec![submit_entry(54, 2000)]).await.unwrap();
    assert_eq!(a.digest().await.unwrap(), b.digest().await.unwrap());
}

#[tokio::test]
async fn corrupt_snapshot_is_rejected_without_touching_state() {
    let a_dir = TempDir::new().unwrap();
    let b_dir = TempDir::new().unwrap();
    let (_la, mut a) = open_stores(a_dir.path()).unwrap();
    let (_lb, mut b) = open_stores(b_dir.path()).unwrap();
    a.apply(history(5)).await.unwrap();
    b.apply(history(2)).await.unwrap();
    let before = b.digest().await.unwrap();
    let snap = build_snapshot(&mut a).await;
    let path = a_dir.path().join("snapshots").join(snapshot_file_name(&snap.meta.snapshot_id));
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;

    let mut recv = b.begin_receiving_snapshot().await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut *recv, &bytes).await.unwrap();
    assert!(b.install_snapshot(&snap.meta, recv).await.is_err());
    assert_eq!(b.digest().await.unwrap(), before);
    assert!(b.get_current_snapshot().await.unwrap().is_none());
}

/// A crash after the pending-install marker was written (state possibly half
/// replaced): reopening completes the install.
#[tokio::test]
async fn interrupted_install_completes_on_reopen() {
    let a_dir = TempDir::new().unwrap();
    let b_dir = TempDir::new().unwrap();
    let (_la, mut a) = open_stores(a_dir.path()).unwrap();
    a.apply(history(30)).await.unwrap();
    let snap = build_snapshot(&mut a).await;
    let name = snapshot_file_name(&snap.meta.snapshot_id);

    {
        let (_lb, mut b) = open_stores(b_dir.path()).unwrap();
        b.apply(history(3)).await.unwrap();
        // Step 1 of an install: the file in place. Step 3: the marker.
        std::fs::copy(a_dir.path().join("snapshots").join(&name), b_dir.path().join("snapshots").join(&name)).unwrap();
        let db = test_support::db_of(&b);
        test_support::write_pending_marker(&db, &snap.meta, &name);
        // Consistent reads refuse a half-installed state rather than wait.
        assert!(b.kv().read_consistent(|_| ()).is_err());
        assert!(b.kv().digest().is_err());
        // Part of step 4: some old keys deleted, some new ones written.
        let sm_cf = cf(&db, CF_SM).unwrap();
        let mut it = db.raw_iterator_cf(sm_cf);
        it.seek_to_first();
        let k = it.key().unwrap().to_vec();
        drop(it);
        db.delete_cf(sm_cf, k).unwrap();
        db.put_cf(sm_cf, b"zz-partial", b"x").unwrap();
        // Leftover temp files from the interrupted transfer.
        std::fs::write(b_dir.path().join("snapshots").join("recv-1.tmp"), b"junk").unwrap();
    } // "crash"

    let (_lb, mut b) = open_stores(b_dir.path()).unwrap();
    assert!(!test_support::has_pending_marker(&test_support::db_of(&b)));
    assert_eq!(a.digest().await.unwrap(), b.digest().await.unwrap());
    assert_eq!(b.applied_state().await.unwrap(), (snap.meta.last_log_id, snap.meta.last_membership.clone()));
    assert_eq!(b.get_current_snapshot().await.unwrap().unwrap().meta, snap.meta);
    let files: Vec<_> = std::fs::read_dir(b_dir.path().join("snapshots"))
        .unwrap()
        .map(|d| d.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(files, vec![name]);
}

#[tokio::test]
async fn missing_snapshot_file_is_forgotten() {
    let dir = TempDir::new().unwrap();
    let name = {
        let (_l, mut sm) = open_stores(dir.path()).unwrap();
        sm.apply(history(2)).await.unwrap();
        let snap = build_snapshot(&mut sm).await;
        snapshot_file_name(&snap.meta.snapshot_id)
    };
    std::fs::remove_file(dir.path().join("snapshots").join(name)).unwrap();
    let (_l, mut sm) = open_stores(dir.path()).unwrap();
    assert!(sm.get_current_snapshot().await.unwrap().is_none());
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 4)));
}

/// Golden bytes of what the log stores on disk: a change here breaks
/// existing data directories.
#[test]
fn golden_stored_log_id_and_vote() {
    let id = log_id(3, 7);
    let mut want = vec![STORE_VERSION];
    want.extend_from_slice(&3u64.to_le_bytes()); // term
    want.extend_from_slice(&1u64.to_le_bytes()); // node id
    want.extend_from_slice(&7u64.to_le_bytes()); // index
    assert_eq!(encode(&id).unwrap(), want);

    let blank = Entry { log_id: id, payload: EntryPayload::Blank };
    let mut want_entry = want.clone();
    want_entry.extend_from_slice(&0u32.to_le_bytes()); // EntryPayload::Blank
    assert_eq!(encode(&blank).unwrap(), want_entry);
    assert_eq!(decode::<Entry>(&want_entry).unwrap(), blank);

    let vote = Vote::new_committed(4, 2);
    let mut want_vote = vec![STORE_VERSION];
    want_vote.extend_from_slice(&4u64.to_le_bytes());
    want_vote.extend_from_slice(&2u64.to_le_bytes());
    want_vote.push(1);
    assert_eq!(encode(&vote).unwrap(), want_vote);
    assert!(decode::<Vote>(&[STORE_VERSION + 1, 0]).is_err());
}

#[test]
fn snapshot_file_names_are_safe() {
    assert_eq!(snapshot_file_name("3-10-abc-1"), "3-10-abc-1.snap");
    let odd = snapshot_file_name("../../etc/passwd");
    assert!(odd.starts_with('x') && !odd.contains('/'));
    let _unused: Option<SnapshotMeta> = None;
}

/// The RocksDB state machine (whose apply path skips tombstones with scan
/// hints) gives the same outcomes and the same state as the reference
/// `MemKv` on a queue-like history: many acquisitions (deletes at the front
/// of the ready indexes), jobs re-queued below the hint (release, failure
/// with backoff coming due), higher priorities jumping the queue, and both
/// typed and untyped acquires.
#[tokio::test]
async fn hinted_scans_match_the_reference_store() {
    use jobsched_core::{CompletionReport, KvRead, MemKv, Overlay};

    let dir = TempDir::new().unwrap();
    let (_log, mut sm) = open_stores(dir.path()).unwrap();
    let mut mem = MemKv::default();
    let typed = Uuid::from_u128(0xA);
    let any = Uuid::from_u128(0xB);
    let mut entries = vec![Entry {
        log_id: log_id(1, 1),
        payload: EntryPayload::Normal(Batch {
            now_ms: 1_000,
            commands: vec![
                Command::RegisterWorker {
                    worker_id: typed,
                    name: "t".into(),
                    capacity: 100,
                    job_types: vec!["email".into()],
                },
                Command::RegisterWorker { worker_id: any, name: "a".into(), capacity: 100, job_types: vec![] },
            ],
        }),
    }];
    // A small deterministic generator (no RNG crate needed).
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut held: Vec<(Uuid, u64)> = Vec::new();
    let mut n = 0u128;
    for index in 2..400u64 {
        let now_ms = 1_000 + index as i64 * 700;
        let mut commands = Vec::new();
        for _ in 0..(next() % 4 + 1) {
            match next() % 10 {
                0..=3 => {
                    n += 1;
                    let mut s = spec(&format!("job-{n}"));
                    s.priority = (next() % 3) as i32 - 1;
                    if next() % 2 == 0 {
                        s.job_type = "sms".into();
                    }
                    // Some with request ids (some of them retries).
                    let request_id = (next() % 3 == 0).then(|| format!("req-{}", next() % 40));
                    commands.push(Command::SubmitJob { job_id: Uuid::from_u128(n), request_id, spec: s });
                }
                4..=6 => {
                    let worker_id = if next() % 2 == 0 { typed } else { any };
                    let max_jobs = (next() % 3 + 1) as u32;
                    commands.push(Command::AcquireJobs { worker_id, job_types: vec![], max_jobs, lease_ms: 60_000 });
                }
                7 if !held.is_empty() => {
                    let (job_id, fencing_token) = held.remove((next() % held.len() as u64) as usize);
                    commands.push(Command::ReleaseJob { job_id, fencing_token });
                }
                8 if !held.is_empty() => {
                    let (job_id, fencing_token) = held.remove((next() % held.len() as u64) as usize);
                    let report = if next() % 2 == 0 {
                        CompletionReport::Succeeded { result: None }
                    } else {
                        CompletionReport::Failed { error: "no".into() }
                    };
                    commands.push(Command::CompleteJob { job_id, fencing_token, report });
                }
                _ => commands.push(Command::Tick),
            }
        }
        let batch = Batch { now_ms, commands };
        // The reference: the same batch through MemKv.
        let want = {
            let mut ov = Overlay::new(&mem);
            let out = jobsched_core::apply(&mut ov, index, &batch).unwrap();
            let writes = ov.into_writes();
            mem.commit(writes);
            out
        };
        for o in &want {
            if let Outcome::Acquired { jobs } = o {
                held.extend(jobs.iter().map(|j| (j.id, j.last_token)));
            }
        }
        entries.push(Entry { log_id: log_id(1, index), payload: EntryPayload::Normal(batch) });
    }
    // Apply in several calls, as openraft does, so hints carry across calls.
    // One pause lets the once-a-second refresh of the readers' hints (the
    // lease-expiry index) run again mid-history, over the tombstones of the
    // leases that ended since the first refresh.
    // After each call, the readers' queue scans (answered from the queue
    // fronts when they can) see what the reference sees at that index.
    let mut got = Vec::new();
    let mut at_chunk = MemKv::default();
    let kv = sm.kv();
    let chunks: Vec<&[Entry]> = entries.chunks(37).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        if i == chunks.len() / 2 {
            tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
        }
        got.extend(sm.apply(chunk.to_vec()).await.unwrap());
        for entry in chunk.iter() {
            let EntryPayload::Normal(batch) = &entry.payload else { unreachable!() };
            let mut ov = Overlay::new(&at_chunk);
            jobsched_core::apply(&mut ov, entry.log_id.index, batch).unwrap();
            let writes = ov.into_writes();
            at_chunk.commit(writes);
        }
        let (stored, reference) = (Reader::new(&kv), Reader::new(&at_chunk));
        for (types, max) in
            [(vec![], 1), (vec![], 7), (vec!["email".to_string()], 1), (vec!["sms".into(), "email".into()], 9)]
        {
            assert_eq!(stored.ready_candidates(&types, max).unwrap(), reference.ready_candidates(&types, max).unwrap());
            assert_eq!(stored.has_ready(&types, 0).unwrap(), reference.has_ready(&types, 0).unwrap());
        }
        assert_eq!(stored.next_delayed_at().unwrap(), reference.next_delayed_at().unwrap());
    }
    // Same outcomes, entry by entry (the first entry registered the workers).
    let mut check = MemKv::default();
    for (entry, out) in entries.iter().zip(&got) {
        let EntryPayload::Normal(batch) = &entry.payload else { unreachable!() };
        let mut ov = Overlay::new(&check);
        let want = jobsched_core::apply(&mut ov, entry.log_id.index, batch).unwrap();
        let writes = ov.into_writes();
        check.commit(writes);
        assert_eq!(out, &want, "entry {}", entry.log_id.index);
    }
    // The leader's reads of the lease index (which use the refreshed hints)
    // see what the reference sees.
    for now in [0, 200_000, 260_000, 300_000, i64::MAX] {
        let ids = |jobs: Vec<jobsched_core::Job>| jobs.into_iter().map(|j| (j.id, j.last_token)).collect::<Vec<_>>();
        let (stored, reference) = (Reader::new(&kv), Reader::new(&check));
        assert_eq!(ids(stored.leases_due_by(now, 1_000).unwrap()), ids(reference.leases_due_by(now, 1_000).unwrap()));
    }
    assert!(!Reader::new(&check).running_jobs().unwrap().is_empty(), "the history leaves leases running");
    // Same final state: scans of the whole key space from the start, from
    // inside the request ids and after them, and of the request-id prefix.
    let reference: Vec<(Vec<u8>, Vec<u8>)> = check.map.clone().into_iter().collect();
    assert!(
        reference.iter().filter(|(k, _)| k.first() == Some(&jobsched_core::keys::REQUEST)).count() > 10,
        "the history submits with request ids"
    );
    assert_eq!(kv.scan(&[], &[], usize::MAX).unwrap(), reference);
    for (prefix, start, limit) in [(&b""[..], &b"r"[..], 7), (b"", b"req-2", 3), (b"", b"s", 5), (b"r", b"req-1", 4)] {
        let want = check.scan(prefix, start, limit).unwrap();
        assert_eq!(kv.scan(prefix, start, limit).unwrap(), want, "scan {prefix:?} from {start:?}");
        assert_eq!(kv.read_consistent(|r| r.scan(prefix, start, limit)).unwrap().unwrap(), want);
    }
}

/// A scan whose seek key lies past every key of its prefix (the hint of a
/// prefix known empty is the prefix's end) is answered without an iterator;
/// any seek inside the prefix is not.
#[test]
fn only_seeks_past_the_prefix_skip_the_iterator() {
    use super::state_machine::seeks_past;
    assert!(seeks_past(b"d", b"e"));
    assert!(seeks_past(b"d", b"e\x00"));
    assert!(!seeks_past(b"d", b"d"));
    assert!(!seeks_past(b"d", b"d\xff\xff"));
    assert!(!seeks_past(b"t\x00\x05email", b"t\x00\x05email\x01"));
    assert!(seeks_past(b"t\x00\x05email", b"t\x00\x05emaim"));
    assert!(!seeks_past(b"d", b"c"));
}
