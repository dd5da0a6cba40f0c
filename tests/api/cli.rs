//! The command line against a fresh database, as an operator bootstraps a
//! node: `duet migrate` (twice: the second finds nothing to do), `duet admin
//! add` (with a Telegram chat; bad options refused), `duet admin token` (the token on stdout and nothing else), an
//! unknown admin refused, and an invalid variable named.

use crate::support::{Backend, TestDb};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn migrate_and_admin_commands_on_both_backends() {
    for backend in Backend::both() {
        let db = TestDb::new(backend);
        for round in 0..2 {
            let out = db.cli(&["migrate"], &[]);
            assert!(out.status.success(), "{backend:?} migrate {round}: {}", text(&out.stderr));
        }
        let add = db.cli(&["admin", "add", "alice", "--name", "Alice Example"], &[]);
        assert!(add.status.success(), "{backend:?}: {}", text(&add.stderr));
        let token = db.cli(&["admin", "token", "alice"], &[]);
        assert!(token.status.success(), "{backend:?}: {}", text(&token.stderr));
        let stdout = text(&token.stdout);
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 1, "{backend:?}: only the token on stdout: {stdout:?}");
        assert!(lines[0].len() >= 32 && lines[0].chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c)), "{stdout:?}");
        let again = db.cli(&["admin", "token", "alice"], &[]);
        assert_ne!(text(&again.stdout), stdout, "{backend:?}: a fresh token each time");

        let chat = db.cli(&["admin", "add", "bob", "--telegram", "-1001234", "--name", "Bob"], &[]);
        assert!(chat.status.success(), "{backend:?}: flags in any order: {}", text(&chat.stderr));
        for bad in [&["admin", "add", "bob", "--telegram", "not a chat"][..], &["admin", "add", "bob", "--colour", "red"], &["admin", "add", "bob", "--name"]] {
            let out = db.cli(bad, &[]);
            assert!(!out.status.success(), "{backend:?}: {bad:?} refused");
        }

        let nobody = db.cli(&["admin", "token", "nobody"], &[]);
        assert!(!nobody.status.success(), "{backend:?}: a token for an unknown admin");
        assert!(nobody.stdout.is_empty(), "{backend:?}: nothing on stdout: {}", text(&nobody.stdout));
        assert!(text(&nobody.stderr).contains("nobody"), "{backend:?}: {}", text(&nobody.stderr));
    }
    let db = TestDb::new(Backend::Sqlite);
    let bad = db.cli(&["migrate"], &[("DUET_HEARTBEAT_S", "0")]);
    assert!(!bad.status.success(), "an invalid variable stops the command");
    assert!(text(&bad.stderr).contains("DUET_HEARTBEAT_S"), "{}", text(&bad.stderr));
}
