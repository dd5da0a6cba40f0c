-- duet's tables (SQLite). Keep in step with ../../postgres/00000000000001_init/up.sql
-- and ../../schema.rs: one portable schema for diesel's MultiConnection, so
-- ids are UUID text, JSON is text and instants are BIGINT milliseconds.
-- SQLite lets a non-INTEGER PRIMARY KEY hold NULL unless it says NOT NULL,
-- and enforces REFERENCES only with PRAGMA foreign_keys=ON (set per connection).

-- One row per session; `status` and its columns are updated in the same
-- transaction as the events that change it. The last seq of a session is
-- MAX(events.seq), read through the primary key: the hot path updates no
-- session row per message.
CREATE TABLE sessions (
    id                TEXT PRIMARY KEY NOT NULL,
    topic             TEXT NOT NULL,
    mode              TEXT NOT NULL,
    customer_name     TEXT NOT NULL,
    resume_token_hash TEXT NOT NULL,
    created_at_ms     BIGINT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('waiting', 'active', 'ended')),
    queued_at_ms      BIGINT,
    agent_id          TEXT,
    agent_name        TEXT,
    agent_kind        TEXT,
    assigned_at_ms    BIGINT,
    ended_reason      TEXT,
    ended_at_ms       BIGINT
);
CREATE INDEX sessions_status_idx ON sessions (status);

-- The ordered log of each session (its foreign key is dropped by migration 2,
-- which says why). NULL client keys never collide (NULLs are
-- distinct in a UNIQUE constraint), so only keyed events are deduplicated.
CREATE TABLE events (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq        BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    body       TEXT NOT NULL,
    at_ms      BIGINT NOT NULL,
    client_key TEXT,
    PRIMARY KEY (session_id, seq),
    UNIQUE (session_id, client_key)
);
-- Not WITHOUT ROWID: clustered by (session_id, seq), rows of many sessions
-- would land on many pages per commit; appended by rowid they share one.

CREATE TABLE admins (
    id            TEXT PRIMARY KEY NOT NULL,
    name          TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    disabled      BOOLEAN NOT NULL DEFAULT FALSE
);

-- Only the SHA-256 of a session token is stored. `idle_ttl_ms` is kept per
-- row so the idle timeout given at login is the one enforced.
CREATE TABLE admin_sessions (
    token_hash    TEXT PRIMARY KEY NOT NULL,
    admin_id      TEXT NOT NULL REFERENCES admins (id) ON DELETE CASCADE,
    created_at_ms BIGINT NOT NULL,
    last_seen_ms  BIGINT NOT NULL,
    idle_ttl_ms   BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    revoked_at_ms BIGINT
);
CREATE INDEX admin_sessions_admin_idx ON admin_sessions (admin_id);

-- At most one live one-time code per admin; no foreign key, so that asking a
-- code for an unknown id behaves like asking one for a known id.
CREATE TABLE admin_otps (
    admin_id      TEXT PRIMARY KEY NOT NULL,
    code_hash     TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0
);

-- Failed code checks per admin id, known or not (answers must not differ).
CREATE TABLE admin_lockouts (
    admin_id        TEXT PRIMARY KEY NOT NULL,
    failures        INTEGER NOT NULL,
    locked_until_ms BIGINT,
    window_start_ms BIGINT NOT NULL
);

CREATE TABLE audit_log (
    id     TEXT PRIMARY KEY NOT NULL,
    at_ms  BIGINT NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX audit_log_at_idx ON audit_log (at_ms);
