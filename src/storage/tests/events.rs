//! The event log: appends (grouped, ordered, idempotent), pages, snapshots.

use std::sync::Arc;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use duet_actors::domain::{
    AgentInfo, AgentKind, EndReason, Event, EventBody, Mode, Party, SessionId,
};
use duet_actors::error::StoreError;
use duet_actors::ports::{
    AppendBatch, EventStore, NewEvent, SessionChange, SessionRecord, SessionStatus,
};
use futures_util::future::join_all;

use super::support::{each_backend, TestDb};
use crate::storage::schema::events;
use crate::storage::{Backend, DbConn, DbOptions, SqliteSync};

pub(crate) fn sid() -> SessionId {
    duet_actors::domain::new_session_id()
}

fn ev(id: &SessionId, seq: i64, body: EventBody, key: Option<&str>) -> NewEvent {
    NewEvent {
        event: Arc::new(Event {
            session_id: id.clone(),
            seq,
            at_ms: 1_700_000_000_000 + seq,
            body,
        }),
        client_key: key.map(Arc::from),
    }
}

fn message(id: &SessionId, seq: i64, key: Option<&str>) -> NewEvent {
    let body = EventBody::Message {
        from: Party::Customer,
        text: Arc::from(format!("hello {seq}")),
        msg_id: Arc::from(format!("m{seq}")),
    };
    ev(id, seq, body, key)
}

fn record(id: &SessionId) -> SessionRecord {
    SessionRecord {
        id: id.clone(),
        topic: Arc::from("support"),
        mode: Mode::Human,
        customer_name: Arc::from("Zoë"),
        resume_token_hash: Arc::from("hash"),
        created_at_ms: 1000,
    }
}

/// seq 1 (`session`) with the row, waiting since 1000.
pub(crate) fn create(id: &SessionId) -> AppendBatch {
    let body = EventBody::Session {
        resume_token: Some(Arc::from("secret")),
        topic: Arc::from("support"),
        mode: Mode::Human,
    };
    AppendBatch {
        session_id: id.clone(),
        events: vec![ev(id, 1, body, None)],
        change: Some(SessionChange::Create(
            record(id),
            SessionStatus::Waiting { queued_at_ms: 1000 },
        )),
    }
}

fn says(id: &SessionId, seq: i64, key: Option<&str>) -> AppendBatch {
    AppendBatch {
        session_id: id.clone(),
        events: vec![message(id, seq, key)],
        change: None,
    }
}

fn agent() -> AgentInfo {
    AgentInfo {
        id: Arc::from("alice"),
        name: Arc::from("Alice"),
        kind: AgentKind::Human,
    }
}

fn assigned(id: &SessionId, seq: i64) -> AppendBatch {
    AppendBatch {
        session_id: id.clone(),
        events: vec![ev(id, seq, EventBody::Assigned { agent: agent() }, None)],
        change: Some(SessionChange::Status(SessionStatus::Active {
            agent: agent(),
            assigned_at_ms: 2000,
        })),
    }
}

fn ended(id: &SessionId, seq: i64) -> AppendBatch {
    AppendBatch {
        session_id: id.clone(),
        events: vec![ev(
            id,
            seq,
            EventBody::Ended {
                reason: EndReason::CustomerLeft,
            },
            None,
        )],
        change: Some(SessionChange::Status(SessionStatus::Ended {
            reason: EndReason::CustomerLeft,
            at_ms: 3000,
        })),
    }
}

fn seqs(events: &[Arc<Event>]) -> Vec<i64> {
    events.iter().map(|e| e.seq).collect()
}

async fn ok(store: &Arc<dyn EventStore>, batch: AppendBatch) {
    if let Err(e) = store.append(batch).await {
        panic!("append failed: {e}");
    }
}

#[tokio::test]
async fn appended_events_read_back_in_order_with_snapshot() {
    each_backend(DbOptions::default(), |db| async move {
        let store = db.event_store();
        let id = sid();
        ok(&store, create(&id)).await;
        ok(&store, says(&id, 2, Some("customer:1"))).await;
        ok(&store, assigned(&id, 3)).await;
        ok(&store, says(&id, 4, Some("agent:alice:1"))).await;

        let snap = store
            .load_session(&id)
            .await
            .expect("load")
            .expect("stored");
        assert_eq!(snap.last_seq, 4);
        assert_eq!(snap.record.customer_name.as_ref(), "Zoë");
        assert_eq!(snap.record.mode, Mode::Human);
        assert_eq!(
            snap.status,
            SessionStatus::Active {
                agent: agent(),
                assigned_at_ms: 2000
            }
        );
        let keys: Vec<(&str, i64)> = snap
            .client_keys
            .iter()
            .map(|(k, s)| (k.as_ref(), *s))
            .collect();
        assert_eq!(keys, vec![("customer:1", 2), ("agent:alice:1", 4)]);

        let all = store.events_after(&id, 0, 50).await.expect("page");
        assert_eq!(seqs(&all), vec![1, 2, 3, 4]);
        // The stored session event never carries the resume token.
        assert!(matches!(
            &all[0].body,
            EventBody::Session {
                resume_token: None,
                ..
            }
        ));
        assert_eq!(all[1].body, message(&id, 2, None).event.body);
        assert_eq!(all[1].at_ms, 1_700_000_000_002);
        assert_eq!(
            seqs(&store.events_after(&id, 1, 2).await.expect("page")),
            vec![2, 3]
        );
        assert_eq!(
            seqs(&store.events_after(&id, 4, 10).await.expect("page")),
            Vec::<i64>::new()
        );
        assert_eq!(
            seqs(&store.events_before(&id, 4, 10).await.expect("page")),
            vec![1, 2, 3]
        );
        assert_eq!(
            seqs(&store.events_before(&id, 5, 2).await.expect("page")),
            vec![3, 4]
        );
        assert_eq!(
            seqs(&store.events_before(&id, 1, 2).await.expect("page")),
            Vec::<i64>::new()
        );
        assert!(store.load_session(&sid()).await.expect("load").is_none());
        assert!(store
            .events_after(&sid(), 0, 10)
            .await
            .expect("page")
            .is_empty());
    })
    .await;
}

#[tokio::test]
async fn many_sessions_commit_in_groups_and_keep_each_order() {
    // A small batch_max forces many groups, each taken where the one before stopped.
    let opts = DbOptions {
        batch_max: 64,
        ..DbOptions::default()
    };
    each_backend(opts, |db| async move {
        let store = db.event_store();
        let ids: Vec<SessionId> = (0..150).map(|_| sid()).collect();
        // Every append is queued before any is awaited: the writer sees
        // one session's batches back to back, mixed with the others'.
        let mut pending = Vec::new();
        for seq in 1..=6 {
            for id in &ids {
                let batch = if seq == 1 {
                    create(id)
                } else {
                    says(id, seq, Some(&format!("customer:{seq}")))
                };
                pending.push(store.append(batch));
            }
        }
        let appends = pending.len() as u64;
        for (i, r) in join_all(pending).await.into_iter().enumerate() {
            assert_eq!(r, Ok(()), "append {i}");
        }
        let stats = db.stats();
        assert_eq!(stats.writer_batches, appends);
        // Grouped: far fewer transactions than batches (at most 64 a group).
        assert!(stats.writer_commits * 4 < appends, "{stats:?}");
        assert!(stats.writer_commits >= appends / 64, "{stats:?}");
        assert_eq!(stats.writer_queue, 0);
        for id in &ids {
            let page = store.events_after(id, 0, 100).await.expect("page");
            assert_eq!(seqs(&page), vec![1, 2, 3, 4, 5, 6]);
            let snap = store.load_session(id).await.expect("load").expect("stored");
            assert_eq!((snap.last_seq, snap.client_keys.len()), (6, 5));
        }
    })
    .await;
}

/// 40 sessions append at once, each one batch awaited then three queued
/// back to back: a session's later batches must wait for its earlier ones,
/// whichever writer holds them. Checks every log is whole and in order.
async fn interleaved_appends(store: &Arc<dyn EventStore>) {
    let tasks = (0..40).map(|_| async move {
        let id = sid();
        store.append(create(&id)).await.expect("create");
        let mut seq = 1;
        for _ in 0..10 {
            seq += 1;
            store.append(says(&id, seq, Some(&format!("c:{seq}")))).await.expect("append");
            let burst: Vec<_> = (1..=3).map(|k| store.append(says(&id, seq + k, Some(&format!("c:{}", seq + k))))).collect();
            for r in join_all(burst).await {
                assert_eq!(r, Ok(()));
            }
            seq += 3;
        }
        (id, seq)
    });
    for (id, last) in join_all(tasks).await {
        let page = store.events_after(&id, 0, 100).await.expect("page");
        assert_eq!(seqs(&page), (1..=last).collect::<Vec<_>>());
    }
}

/// Helpers wanted as soon as the main writer is busy (PostgreSQL's only).
fn helpers_at_once() -> DbOptions {
    DbOptions {
        help_after: Duration::ZERO,
        ..DbOptions::default()
    }
}

#[tokio::test]
async fn every_writer_is_connected_and_warm_before_the_first_append() {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    // A helper is wanted beside a slow commit; if it connected only then,
    // its first group waited for a backend's cold start (~50 ms under load).
    let writers = 3;
    let t = TestDb::new(Backend::Postgres, DbOptions { pg_writers: writers, ..DbOptions::default() });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = t
            .db
            .run(|c| {
                // The warm-up's last statement is the seq lookup's EXISTS.
                diesel::sql_query(format!(
                    "SELECT count(*) AS n FROM pg_stat_activity \
                     WHERE datname = current_database() AND application_name = '{}' \
                     AND query LIKE 'SELECT EXISTS%'",
                    crate::storage::append::WRITER_APPLICATION_NAME
                ))
                .get_result::<Count>(c)
            })
            .await
            .expect("pg_stat_activity")
            .n;
        if n == writers as i64 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{n} of {writers} writers connected and warmed up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(t.db.stats().writer_commits, 0, "no append was made");
}

/// At NORMAL no commit fsyncs: the checkpointer must, every round, even
/// while a reader's open snapshot keeps SQLite's own checkpoint from
/// copying (and so from syncing) anything.
#[tokio::test]
async fn at_normal_sync_the_checkpointer_fsyncs_the_wal_every_round_despite_a_reader() {
    let t = TestDb::new(Backend::Sqlite, DbOptions { sqlite_sync: SqliteSync::Normal, ..DbOptions::default() });
    let store = t.db.event_store();
    let id = sid();
    ok(&store, create(&id)).await;
    let mut reader = diesel::SqliteConnection::establish(&t.url).expect("reader");
    reader.batch_execute("BEGIN; SELECT count(*) FROM events;").expect("reader snapshot");
    ok(&store, says(&id, 2, Some("k2"))).await;
    let before = t.db.stats().wal_syncs;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while t.db.stats().wal_syncs < before + 2 {
        assert!(std::time::Instant::now() < deadline, "the WAL was not fsynced within 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reader.batch_execute("COMMIT").expect("reader done");
    let full = TestDb::new(Backend::Sqlite, DbOptions { sqlite_sync: SqliteSync::Full, ..DbOptions::default() });
    ok(&full.db.event_store(), create(&sid())).await;
    tokio::time::sleep(super::super::checkpoint::CHECKPOINT_EVERY * 3).await;
    assert_eq!(full.db.stats().wal_syncs, 0, "at FULL every commit syncs itself");
}

#[tokio::test]
async fn sqlite_has_one_writer_and_no_session_is_reordered() {
    let t = TestDb::new(Backend::Sqlite, helpers_at_once());
    interleaved_appends(&t.db.event_store()).await;
    assert_eq!(t.db.stats().writer_helper_commits, 0, "SQLite has one writer");
}

#[tokio::test]
async fn helpers_commit_beside_a_slow_main_writer_and_no_session_is_reordered() {
    // The main writer is made slow for real: another transaction holds the
    // key its group inserts, so its commit waits on PostgreSQL's lock until
    // that transaction rolls back. Appends queued meanwhile must go to the
    // helpers (help_after zero: at once), and once the lock is gone the
    // main writer and the helpers share the rest: the most interleaving the
    // writers can see. (Without the lock whether helpers run depends on the
    // scheduler: a CI run once saw none.)
    let t = TestDb::new(Backend::Postgres, helpers_at_once());
    let store = t.db.event_store();
    let blocked = sid();
    ok(&store, create(&blocked)).await;

    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let url = t.url.clone();
    let key = blocked.to_string();
    let holder = std::thread::spawn(move || {
        let held = PgConnection::establish(&url).map_err(|e| e.to_string()).and_then(|mut c| {
            c.batch_execute(&format!(
                "BEGIN; INSERT INTO events (session_id, seq, kind, body, at_ms) VALUES ('{key}', 2, 'message', '{{}}', 0)"
            ))
            .map_err(|e| e.to_string())?;
            Ok(c)
        });
        let mut conn = match held {
            Ok(c) => c,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let _ = ready_tx.send(Ok(()));
        // Released by the test, or by its end (the sender dropped).
        let _ = release_rx.recv();
        conn.batch_execute("ROLLBACK").expect("rollback");
    });
    ready_rx.recv().expect("holder thread").expect("holder transaction");

    let slow = store.append(says(&blocked, 2, Some("slow")));
    // The main writer has taken it once nothing is queued.
    for _ in 0..500 {
        if t.db.stats().writer_queue == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let release = async {
        for _ in 0..1000 {
            if t.db.stats().writer_helper_commits > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let helped = t.db.stats();
        let _ = release_tx.send(());
        helped
    };
    let (helped, ()) = tokio::join!(release, interleaved_appends(&store));
    assert!(helped.writer_helper_commits > 0, "helpers committed while the main writer waited: {helped:?}");
    // Its one commit so far is the first create: it held the batch.
    assert_eq!(helped.writer_commits - helped.writer_helper_commits, 1, "the main writer was blocked: {helped:?}");
    assert_eq!(slow.await, Ok(()), "the held batch commits once the lock is gone");
    holder.join().expect("holder thread");
    let page = store.events_after(&blocked, 0, 10).await.expect("page");
    assert_eq!(seqs(&page), vec![1, 2]);
}

#[tokio::test]
async fn one_big_batch_is_split_under_the_bind_limit() {
    each_backend(DbOptions::default(), |db| async move {
        let store = db.event_store();
        let id = sid();
        let mut batch = create(&id);
        batch
            .events
            .extend((2..=12_001).map(|seq| message(&id, seq, Some(&format!("k{seq}")))));
        ok(&store, batch).await;
        let snap = store
            .load_session(&id)
            .await
            .expect("load")
            .expect("stored");
        assert_eq!((snap.last_seq, snap.client_keys.len()), (12_001, 12_000));
        let tail = store.events_before(&id, 12_002, 3).await.expect("page");
        assert_eq!(seqs(&tail), vec![11_999, 12_000, 12_001]);
    })
    .await;
}

#[tokio::test]
async fn a_duplicate_key_fails_alone_and_stores_nothing() {
    // Linger so that all of these land in one group.
    let opts = DbOptions {
        batch_linger: Duration::from_millis(100),
        ..DbOptions::default()
    };
    each_backend(opts, |db| async move {
        let store = db.event_store();
        let (a, b) = (sid(), sid());
        ok(&store, create(&a)).await;
        ok(&store, create(&b)).await;
        ok(&store, says(&a, 2, Some("customer:7"))).await;

        let dup = store.append(says(&a, 3, Some("customer:7")));
        let after_dup = store.append(says(&a, 4, Some("customer:8")));
        let other = store.append(says(&b, 2, Some("customer:7")));
        let (dup, after_dup, other) = futures_util::future::join3(dup, after_dup, other).await;
        assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
        // Committing seq 4 without seq 3 would leave a gap.
        assert!(
            matches!(after_dup, Err(StoreError::Conflict(_))),
            "{after_dup:?}"
        );
        assert_eq!(other, Ok(()));

        let snap = store.load_session(&a).await.expect("load").expect("stored");
        assert_eq!(snap.last_seq, 2);
        assert_eq!(
            seqs(&store.events_after(&a, 0, 10).await.expect("page")),
            vec![1, 2]
        );
        // The same seq again is refused too (a second writer of the session).
        assert!(matches!(
            store.append(says(&a, 2, None)).await,
            Err(StoreError::Conflict(_))
        ));
        ok(&store, says(&a, 3, Some("customer:8"))).await;
    })
    .await;
}

#[tokio::test]
async fn gaps_foreign_events_and_unknown_sessions_are_refused() {
    each_backend(DbOptions::default(), |db| async move {
        let store = db.event_store();
        let id = sid();
        ok(&store, create(&id)).await;
        assert!(matches!(
            store.append(says(&id, 5, None)).await,
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            store.append(says(&sid(), 1, None)).await,
            Err(StoreError::Conflict(_))
        ));
        let mut mixed = says(&id, 2, None);
        mixed.events.push(message(&sid(), 3, None));
        assert_eq!(store.append(mixed).await, Err(StoreError::Internal));
        let mut unordered = says(&id, 2, None);
        unordered.events.push(message(&id, 4, None));
        assert_eq!(store.append(unordered).await, Err(StoreError::Internal));
        assert_eq!(
            store
                .load_session(&id)
                .await
                .expect("load")
                .map(|s| s.last_seq),
            Some(1)
        );
    })
    .await;
}

#[tokio::test]
async fn open_sessions_are_those_not_ended() {
    each_backend(DbOptions::default(), |db| async move {
        let store = db.event_store();
        let (waiting, active, done) = (sid(), sid(), sid());
        for id in [&waiting, &active, &done] {
            ok(&store, create(id)).await;
        }
        ok(&store, says(&waiting, 2, Some("customer:1"))).await;
        ok(&store, assigned(&active, 2)).await;
        ok(&store, says(&active, 3, Some("customer:1"))).await;
        ok(&store, says(&done, 2, Some("customer:1"))).await;
        ok(&store, ended(&done, 3)).await;
        // Back to the queue (its agent was lost): the agent columns clear.
        let requeued = sid();
        ok(&store, create(&requeued)).await;
        ok(&store, assigned(&requeued, 2)).await;
        let back = AppendBatch {
            session_id: requeued.clone(),
            events: vec![],
            change: Some(SessionChange::Status(SessionStatus::Waiting {
                queued_at_ms: 5,
            })),
        };
        ok(&store, back).await;

        let mut open = store.open_sessions().await.expect("open");
        open.sort_by_key(|s| {
            [&waiting, &active, &requeued]
                .iter()
                .position(|id| **id == s.record.id)
        });
        let ids: Vec<&SessionId> = open.iter().map(|s| &s.record.id).collect();
        assert_eq!(ids, vec![&waiting, &active, &requeued]);
        assert_eq!(
            open[0].status,
            SessionStatus::Waiting { queued_at_ms: 1000 }
        );
        assert_eq!(
            open[1].status,
            SessionStatus::Active {
                agent: agent(),
                assigned_at_ms: 2000
            }
        );
        assert_eq!(open[2].status, SessionStatus::Waiting { queued_at_ms: 5 });
        assert_eq!((open[1].last_seq, open[1].client_keys.len()), (3, 1));
        assert_eq!(open[2].last_seq, 2);
        let ended = store
            .load_session(&done)
            .await
            .expect("load")
            .expect("stored");
        assert_eq!(
            ended.status,
            SessionStatus::Ended {
                reason: EndReason::CustomerLeft,
                at_ms: 3000
            }
        );
    })
    .await;
}

#[tokio::test]
async fn rows_that_do_not_decode_are_skipped() {
    each_backend(DbOptions::default(), |db| async move {
        let store = db.event_store();
        let id = sid();
        ok(&store, create(&id)).await;
        let sid_text = id.to_string();
        // Written behind the writer's back, as a foreign tool might.
        db.run(move |c: &mut DbConn| {
            diesel::insert_into(events::table)
                .values((
                    events::session_id.eq(sid_text),
                    events::seq.eq(2),
                    events::kind.eq("martian"),
                    events::body.eq("{}"),
                    events::at_ms.eq(1),
                ))
                .execute(c)
        })
        .await
        .expect("raw insert");
        assert_eq!(seqs(&store.events_after(&id, 0, 10).await.expect("page")), vec![1]);
        let snap = store.load_session(&id).await.expect("load").expect("stored");
        assert_eq!(snap.last_seq, 2, "the foreign row still counts for the next seq");
    })
    .await;
}

#[tokio::test]
async fn sqlite_file_is_wal_at_the_configured_sync_level_and_pg_commits_synchronously() {
    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Text)]
        value: String,
    }
    // SQLite's `synchronous` codes: 1 = NORMAL, 2 = FULL.
    let cases = [
        (Backend::Sqlite, SqliteSync::default()),
        (Backend::Sqlite, SqliteSync::Normal),
        (Backend::Sqlite, SqliteSync::Full),
        (Backend::Postgres, SqliteSync::default()),
    ];
    for (backend, sqlite_sync) in cases {
        // A cache size of our own per level, so the pragma is seen to be set.
        let sqlite_cache_kib = 2000 + sqlite_sync as u32;
        let t = TestDb::new(backend, DbOptions { sqlite_sync, sqlite_cache_kib, ..DbOptions::default() });
        assert_eq!(t.db.backend(), backend);
        let got =
            t.db.run(|c| {
                let q = |sql: &str| diesel::sql_query(sql.to_owned());
                Ok(match c {
                    DbConn::Sqlite(c) => vec![
                        q("SELECT journal_mode AS value FROM pragma_journal_mode")
                            .get_result::<Setting>(c)?
                            .value,
                        q("SELECT CAST(synchronous AS TEXT) AS value FROM pragma_synchronous")
                            .get_result::<Setting>(c)?
                            .value,
                        q("SELECT CAST(timeout AS TEXT) AS value FROM pragma_busy_timeout")
                            .get_result::<Setting>(c)?
                            .value,
                        q("SELECT CAST(foreign_keys AS TEXT) AS value FROM pragma_foreign_keys")
                            .get_result::<Setting>(c)?
                            .value,
                        q("SELECT CAST(cache_size AS TEXT) AS value FROM pragma_cache_size")
                            .get_result::<Setting>(c)?
                            .value,
                    ],
                    DbConn::Pg(c) => vec![
                        q("SELECT current_setting('synchronous_commit') AS value")
                            .get_result::<Setting>(c)?
                            .value,
                    ],
                })
            })
            .await
            .expect("settings");
        match backend {
            Backend::Sqlite => {
                let level = match sqlite_sync {
                    SqliteSync::Normal => "1",
                    SqliteSync::Full => "2",
                };
                let cache = format!("-{sqlite_cache_kib}");
                assert_eq!(got, vec!["wal", level, "5000", "1", cache.as_str()], "{sqlite_sync:?}");
                assert!(std::path::Path::new(&t.url).exists());
            }
            Backend::Postgres => assert_eq!(got, vec!["on"]),
        }
        t.db.ping().await.expect("ping");
        // Opening again finds nothing left to migrate.
        drop(crate::storage::Database::open(&t.url, DbOptions::default()).expect("reopen"));
    }
}
