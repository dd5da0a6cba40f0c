-- The events table keeps no foreign key to sessions. The key cost a
-- referential check and a row lock (FOR KEY SHARE, a write to the session's
-- tuple) for every stored message: about a tenth of the database's CPU at
-- 2 000 messages/s. The event writer is the only writer of both tables and
-- refuses events of a session that does not exist (storage/append.rs,
-- SeqCache::stored); sessions are never deleted (retention will delete a
-- session's events with it). Keep in step with ../../sqlite/.
ALTER TABLE events DROP CONSTRAINT events_session_id_fkey;
