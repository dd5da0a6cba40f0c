//! Admins: one-time codes with lockout, login sessions, the audit log.

use diesel::prelude::*;
use duet_actors::domain::hash_secret;
use futures_util::future::join_all;

use super::support::each_backend;
use crate::storage::schema::{admins, audit_log};
use crate::storage::{Database, DbOptions, OtpOutcome, OtpPolicy, StorageError};

const T0: i64 = 1_700_000_000_000;
const MIN: i64 = 60_000;

async fn with_code(db: &Database, admin: &str, code: &str, expires_at_ms: i64) {
    db.store_otp(admin, &hash_secret(code), expires_at_ms)
        .await
        .expect("store otp");
}

async fn verify(db: &Database, admin: &str, code: &str, now: i64) -> OtpOutcome {
    db.verify_otp(admin, code, now, OtpPolicy::default())
        .await
        .expect("verify")
}

#[tokio::test]
async fn a_code_works_once_and_replaces_the_previous_one() {
    each_backend(DbOptions::default(), |db| async move {
        db.add_admin("alice", "Alice").await.expect("add");
        with_code(&db, "alice", "11111111", T0 + 5 * MIN).await;
        with_code(&db, "alice", "22222222", T0 + 5 * MIN).await;
        assert_eq!(
            verify(&db, "alice", "11111111", T0).await,
            OtpOutcome::Wrong
        );
        assert_eq!(
            verify(&db, "alice", "22222222", T0 + 1).await,
            OtpOutcome::Ok
        );
        assert_eq!(
            verify(&db, "alice", "22222222", T0 + 2).await,
            OtpOutcome::Wrong
        );

        with_code(&db, "alice", "33333333", T0 + MIN).await;
        assert_eq!(
            verify(&db, "alice", "33333333", T0 + MIN).await,
            OtpOutcome::Expired
        );
        assert_eq!(
            verify(&db, "alice", "33333333", T0 + MIN - 1).await,
            OtpOutcome::Wrong
        );
    })
    .await;
}

#[tokio::test]
async fn five_failures_lock_known_and_unknown_ids_alike() {
    each_backend(DbOptions::default(), |db| async move {
        db.add_admin("alice", "Alice").await.expect("add");
        for admin in ["alice", "nobody"] {
            with_code(&db, admin, "12345678", T0 + 60 * MIN).await;
            for i in 0..5 {
                assert_eq!(
                    verify(&db, admin, "00000000", T0 + i).await,
                    OtpOutcome::Wrong,
                    "{admin} try {i}"
                );
            }
            let until_ms = T0 + 4 + 15 * MIN;
            // Locked: even the right code is refused, and not counted.
            for now in [T0 + 10, until_ms - 1] {
                assert_eq!(
                    verify(&db, admin, "12345678", now).await,
                    OtpOutcome::Locked { until_ms },
                    "{admin}"
                );
            }
            // After the lock a fresh code works for the known admin; the
            // unknown id has nothing to log into.
            with_code(&db, admin, "87654321", until_ms + 10 * MIN).await;
            let expected = if admin == "alice" {
                OtpOutcome::Ok
            } else {
                OtpOutcome::Wrong
            };
            assert_eq!(
                verify(&db, admin, "87654321", until_ms).await,
                expected,
                "{admin}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn failures_far_apart_do_not_lock() {
    each_backend(DbOptions::default(), |db| async move {
        db.add_admin("bob", "Bob").await.expect("add");
        for i in 0..12 {
            assert_eq!(
                verify(&db, "bob", "00000000", T0 + i * 4 * MIN).await,
                OtpOutcome::Wrong,
                "try {i}"
            );
        }
        with_code(&db, "bob", "12345678", T0 + 60 * MIN).await;
        assert_eq!(
            verify(&db, "bob", "12345678", T0 + 48 * MIN).await,
            OtpOutcome::Ok
        );
    })
    .await;
}

#[tokio::test]
async fn parallel_guesses_cannot_pass_the_limit() {
    each_backend(DbOptions::default(), |db| async move {
        db.add_admin("carol", "Carol").await.expect("add");
        with_code(&db, "carol", "12345678", T0 + 60 * MIN).await;
        let guesses = (0..20).map(|i| {
            let db = db.clone();
            async move {
                db.verify_otp("carol", &format!("{i:08}"), T0, OtpPolicy::default())
                    .await
            }
        });
        let answers: Vec<OtpOutcome> = join_all(guesses)
            .await
            .into_iter()
            .map(|r| r.expect("verify"))
            .collect();
        let wrong = answers.iter().filter(|a| **a == OtpOutcome::Wrong).count();
        let locked = answers
            .iter()
            .filter(|a| matches!(a, OtpOutcome::Locked { .. }))
            .count();
        assert_eq!((wrong, locked), (5, 15), "{answers:?}");
    })
    .await;
}

#[tokio::test]
async fn a_disabled_admin_cannot_log_in_or_use_a_session() {
    each_backend(DbOptions::default(), |db| async move {
        db.add_admin("dave", "Dave").await.expect("add");
        db.create_admin_session("dave", "tok", T0, 60 * MIN, 600 * MIN)
            .await
            .expect("session");
        db.run(|c| {
            diesel::update(admins::table)
                .set(admins::disabled.eq(true))
                .execute(c)
        })
        .await
        .expect("disable");
        with_code(&db, "dave", "12345678", T0 + 5 * MIN).await;
        assert_eq!(verify(&db, "dave", "12345678", T0).await, OtpOutcome::Wrong);
        assert!(db
            .admin_session("tok", T0 + 1)
            .await
            .expect("lookup")
            .is_none());
        let refused = db.create_admin_session("dave", "tok2", T0, MIN, MIN).await;
        assert!(
            matches!(refused, Err(StorageError::NotFound)),
            "{refused:?}"
        );
        let unknown = db.create_admin_session("ghost", "tok3", T0, MIN, MIN).await;
        assert!(
            matches!(unknown, Err(StorageError::NotFound)),
            "{unknown:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn sessions_end_when_idle_at_their_limit_or_revoked() {
    each_backend(DbOptions::default(), |db| async move {
        let admin = db.add_admin("erin", "Erin").await.expect("add");
        assert_eq!((admin.name.as_str(), admin.disabled), ("Erin", false));
        let renamed = db.add_admin("erin", "Erin E.").await.expect("rename");
        assert_eq!(
            (renamed.name.as_str(), renamed.created_at_ms),
            ("Erin E.", admin.created_at_ms)
        );
        assert_eq!(db.get_admin("erin").await.expect("get"), Some(renamed));
        assert_eq!(db.get_admin("nobody").await.expect("get"), None);

        // Idle 1 min, at most 5 min.
        let idle = MIN;
        let made = db
            .create_admin_session("erin", "idle", T0, idle, 5 * MIN)
            .await
            .expect("create");
        assert_eq!((made.expires_at_ms, made.last_seen_ms), (T0 + 5 * MIN, T0));
        let seen = |now| {
            let db = db.clone();
            async move {
                db.admin_session("idle", now)
                    .await
                    .expect("lookup")
                    .map(|(a, s)| (a.id, s.last_seen_ms))
            }
        };
        // Used within the resolution (idle/4 = 15 s): not rewritten.
        assert_eq!(seen(T0 + 10_000).await, Some(("erin".to_owned(), T0)));
        // Used later: rewritten, so activity keeps it alive past one idle TTL.
        assert_eq!(
            seen(T0 + 50_000).await,
            Some(("erin".to_owned(), T0 + 50_000))
        );
        assert_eq!(
            seen(T0 + 100_000).await,
            Some(("erin".to_owned(), T0 + 100_000))
        );
        assert_eq!(seen(T0 + 100_000 + idle).await, None);

        // Kept busy, it still ends at its absolute limit.
        db.create_admin_session("erin", "abs", T0, idle, 5 * MIN)
            .await
            .expect("create");
        let mut now = T0;
        while now < T0 + 5 * MIN {
            assert!(
                db.admin_session("abs", now)
                    .await
                    .expect("lookup")
                    .is_some(),
                "at {}",
                now - T0
            );
            now += 30_000;
        }
        assert!(db
            .admin_session("abs", T0 + 5 * MIN)
            .await
            .expect("lookup")
            .is_none());

        db.create_admin_session("erin", "rev", T0, idle, 5 * MIN)
            .await
            .expect("create");
        assert!(db
            .revoke_admin_session("rev", T0 + 1)
            .await
            .expect("revoke"));
        assert!(!db
            .revoke_admin_session("rev", T0 + 2)
            .await
            .expect("revoke"));
        assert!(db
            .admin_session("rev", T0 + 3)
            .await
            .expect("lookup")
            .is_none());
        assert!(db
            .admin_session("never", T0)
            .await
            .expect("lookup")
            .is_none());
    })
    .await;
}

#[tokio::test]
async fn cli_helpers_and_audit_work_without_a_runtime() {
    each_backend(DbOptions::default(), |db| async move {
        let sync_db = db.clone();
        let made = tokio::task::spawn_blocking(move || {
            let admin = sync_db.add_admin_sync("frank", "Frank", Some("4242"))?;
            sync_db.audit_sync("cli", "admin.add", &admin.id)?;
            sync_db.create_admin_session_sync("frank", "cli-token", T0, MIN, 10 * MIN)
        })
        .await
        .expect("join")
        .expect("cli calls");
        assert_eq!(made.admin_id, "frank");
        assert!(!format!("{made:?}").contains("cli-token"));
        // Added again without a chat, the admin keeps the one it had.
        let renamed = db.add_admin("frank", "Frank F.").await.expect("rename");
        assert_eq!((renamed.name.as_str(), renamed.telegram_chat_id.as_deref()), ("Frank F.", Some("4242")));
        db.audit("frank", "login", "otp").await.expect("audit");
        let rows: Vec<(String, String, String)> = db
            .run(|c| {
                audit_log::table
                    .order(audit_log::at_ms.asc())
                    .select((audit_log::actor, audit_log::action, audit_log::detail))
                    .load(c)
            })
            .await
            .expect("audit rows");
        let rows: Vec<(&str, &str, &str)> = rows
            .iter()
            .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
            .collect();
        assert_eq!(rows.len(), 2);
        assert!(
            rows.contains(&("cli", "admin.add", "frank"))
                && rows.contains(&("frank", "login", "otp"))
        );
    })
    .await;
}
