ALTER TABLE admins DROP COLUMN telegram_chat_id;
