-- The events table keeps no foreign key to sessions (see
-- ../../postgres/00000000000002_events_without_fk/up.sql for why). SQLite
-- cannot drop a constraint: the table is rebuilt. Nothing references
-- `events`, so this is safe with foreign_keys on.
CREATE TABLE events_new (
    session_id TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    body       TEXT NOT NULL,
    at_ms      BIGINT NOT NULL,
    client_key TEXT,
    PRIMARY KEY (session_id, seq),
    UNIQUE (session_id, client_key)
);
INSERT INTO events_new (session_id, seq, kind, body, at_ms, client_key)
    SELECT session_id, seq, kind, body, at_ms, client_key FROM events;
DROP TABLE events;
ALTER TABLE events_new RENAME TO events;
