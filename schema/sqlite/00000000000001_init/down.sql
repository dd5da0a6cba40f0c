DROP TABLE audit_log;
DROP TABLE admin_lockouts;
DROP TABLE admin_otps;
DROP TABLE admin_sessions;
DROP TABLE admins;
DROP TABLE events;
DROP TABLE sessions;
