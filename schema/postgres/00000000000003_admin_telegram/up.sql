-- The Telegram chat an admin's one-time codes go to (`duet admin add --telegram`).
ALTER TABLE admins ADD COLUMN telegram_chat_id TEXT;
