CREATE TABLE events_old (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq        BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    body       TEXT NOT NULL,
    at_ms      BIGINT NOT NULL,
    client_key TEXT,
    PRIMARY KEY (session_id, seq),
    UNIQUE (session_id, client_key)
);
INSERT INTO events_old (session_id, seq, kind, body, at_ms, client_key)
    SELECT session_id, seq, kind, body, at_ms, client_key FROM events;
DROP TABLE events;
ALTER TABLE events_old RENAME TO events;
