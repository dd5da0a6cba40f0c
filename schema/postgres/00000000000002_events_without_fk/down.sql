ALTER TABLE events ADD CONSTRAINT events_session_id_fkey
    FOREIGN KEY (session_id) REFERENCES sessions (id) ON DELETE CASCADE;
