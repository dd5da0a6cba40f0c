// @generated-style: matches what `diesel print-schema` gives for
// schema/postgres (see diesel.toml); the SQLite migrations create the same
// tables. Only types MultiConnection maps are used: Text, BigInt, Integer, Bool.

diesel::table! {
    admin_lockouts (admin_id) {
        admin_id -> Text,
        failures -> Integer,
        locked_until_ms -> Nullable<BigInt>,
        window_start_ms -> BigInt,
    }
}

diesel::table! {
    admin_otps (admin_id) {
        admin_id -> Text,
        code_hash -> Text,
        expires_at_ms -> BigInt,
        attempts -> Integer,
    }
}

diesel::table! {
    admin_sessions (token_hash) {
        token_hash -> Text,
        admin_id -> Text,
        created_at_ms -> BigInt,
        last_seen_ms -> BigInt,
        idle_ttl_ms -> BigInt,
        expires_at_ms -> BigInt,
        revoked_at_ms -> Nullable<BigInt>,
    }
}

diesel::table! {
    admins (id) {
        id -> Text,
        name -> Text,
        created_at_ms -> BigInt,
        disabled -> Bool,
        telegram_chat_id -> Nullable<Text>,
    }
}

diesel::table! {
    audit_log (id) {
        id -> Text,
        at_ms -> BigInt,
        actor -> Text,
        action -> Text,
        detail -> Text,
    }
}

diesel::table! {
    events (session_id, seq) {
        session_id -> Text,
        seq -> BigInt,
        kind -> Text,
        body -> Text,
        at_ms -> BigInt,
        client_key -> Nullable<Text>,
    }
}

diesel::table! {
    sessions (id) {
        id -> Text,
        topic -> Text,
        mode -> Text,
        customer_name -> Text,
        resume_token_hash -> Text,
        created_at_ms -> BigInt,
        status -> Text,
        queued_at_ms -> Nullable<BigInt>,
        agent_id -> Nullable<Text>,
        agent_name -> Nullable<Text>,
        agent_kind -> Nullable<Text>,
        assigned_at_ms -> Nullable<BigInt>,
        ended_reason -> Nullable<Text>,
        ended_at_ms -> Nullable<BigInt>,
    }
}

diesel::joinable!(admin_sessions -> admins (admin_id));
diesel::joinable!(events -> sessions (session_id));

diesel::allow_tables_to_appear_in_same_query!(
    admin_lockouts,
    admin_otps,
    admin_sessions,
    admins,
    audit_log,
    events,
    sessions,
);
