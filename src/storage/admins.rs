//! Admins, their one-time login codes, their sessions, and the audit log.
//!
//! Secrets are never stored: codes and session tokens are kept as SHA-256
//! (`duet_actors::domain::hash_secret`) and compared in constant time.
//! Login attempts are counted per admin id whether or not the id exists,
//! and an unknown id costs the same hash as a known one, so the answers and
//! their timing do not tell which ids exist. Each SQL step is a plain
//! function on [`DbConn`]; [`Database`] wraps them as async calls (on the
//! blocking pool) and, where the CLI needs them, sync ones.

use diesel::prelude::*;
use diesel::sql_types::Text;
use duet_actors::domain::{now_ms, secret_matches};

use super::db_conn::per_backend;
use super::schema::{admin_lockouts, admin_otps, admin_sessions, admins, audit_log};
use super::{Database, DbConn, StorageError};

/// `last_seen_ms` is written at most this often per session (not on every
/// request); the idle timeout is therefore exact to within this much, or
/// a quarter of the idle TTL when that is shorter.
const LAST_SEEN_RESOLUTION_MS: i64 = 30_000;

/// Compared against when an admin has no code, so that path hashes too.
const NO_CODE_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Clone, Debug, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = admins)]
pub struct AdminRow {
    pub id: String,
    pub name: String,
    pub created_at_ms: i64,
    pub disabled: bool,
    /// Where Telegram delivers this admin's one-time codes.
    pub telegram_chat_id: Option<String>,
}

/// One admin login. `Debug` leaves out the token hash.
#[derive(Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = admin_sessions, treat_none_as_default_value = false)]
pub struct AdminSessionRow {
    pub token_hash: String,
    pub admin_id: String,
    pub created_at_ms: i64,
    pub last_seen_ms: i64,
    pub idle_ttl_ms: i64,
    pub expires_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

impl std::fmt::Debug for AdminSessionRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSessionRow")
            .field("admin_id", &self.admin_id)
            .field("created_at_ms", &self.created_at_ms)
            .field("last_seen_ms", &self.last_seen_ms)
            .field("idle_ttl_ms", &self.idle_ttl_ms)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("revoked_at_ms", &self.revoked_at_ms)
            .finish_non_exhaustive()
    }
}

impl AdminSessionRow {
    /// Whether this login may still be used at `now_ms`.
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.revoked_at_ms.is_none()
            && now_ms < self.expires_at_ms
            && now_ms - self.last_seen_ms < self.idle_ttl_ms
    }
}

/// How many wrong codes lock an admin id, for how long, counted over what
/// window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OtpPolicy {
    pub max_failures: i32,
    pub lockout_ms: i64,
    pub window_ms: i64,
}

impl Default for OtpPolicy {
    /// 5 failures within 15 minutes lock the id for 15 minutes.
    fn default() -> Self {
        OtpPolicy {
            max_failures: 5,
            lockout_ms: 15 * 60_000,
            window_ms: 15 * 60_000,
        }
    }
}

/// The answer to a presented code. Map `Wrong` and `Expired` to the same
/// client answer: an expired code exists only for an id a code was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtpOutcome {
    /// Right, in time, for an enabled admin; the code is now used up.
    Ok,
    /// Wrong code, no code, unknown or disabled admin. Counted.
    Wrong,
    /// The admin's code has expired (it is deleted). Counted.
    Expired,
    /// Too many failures: refused, even the right code, until `until_ms`.
    /// Not counted. The failure that locks answers `Wrong`; the next ones
    /// answer this.
    Locked { until_ms: i64 },
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = admin_otps)]
struct OtpRow {
    code_hash: String,
    expires_at_ms: i64,
    attempts: i32,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = admin_lockouts)]
struct LockoutRow {
    failures: i32,
    locked_until_ms: Option<i64>,
    window_start_ms: i64,
}

type Q<T> = QueryResult<T>;

/// Adds (or renames and enables) an admin; `telegram`, when given, is where
/// its codes go (an admin added again without it keeps its chat).
fn add_admin(c: &mut DbConn, id: &str, name: &str, telegram: Option<&str>, now: i64) -> Q<AdminRow> {
    c.write_transaction(|c| {
        per_backend!(c, c => diesel::insert_into(admins::table)
            .values((admins::id.eq(id), admins::name.eq(name), admins::created_at_ms.eq(now), admins::disabled.eq(false)))
            .on_conflict(admins::id)
            .do_update()
            .set((admins::name.eq(name), admins::disabled.eq(false)))
            .execute(c))?;
        if let Some(chat) = telegram {
            diesel::update(admins::table.find(id)).set(admins::telegram_chat_id.eq(Some(chat))).execute(c)?;
        }
        get_admin(c, id)?.ok_or(diesel::result::Error::NotFound)
    })
}

/// Disables the admin and revokes every login of theirs; `false` when no
/// such admin exists. Open sockets close at their next session check.
fn disable_admin(c: &mut DbConn, id: &str, now: i64) -> Q<bool> {
    c.write_transaction(|c| {
        let n = diesel::update(admins::table.find(id)).set(admins::disabled.eq(true)).execute(c)?;
        diesel::update(admin_sessions::table)
            .filter(admin_sessions::admin_id.eq(id))
            .filter(admin_sessions::revoked_at_ms.is_null())
            .set(admin_sessions::revoked_at_ms.eq(Some(now)))
            .execute(c)?;
        Ok::<_, diesel::result::Error>(n == 1)
    })
}

fn get_admin(c: &mut DbConn, id: &str) -> Q<Option<AdminRow>> {
    admins::table
        .find(id)
        .select(AdminRow::as_select())
        .first(c)
        .optional()
}

/// `NotFound` when the admin does not exist or is disabled.
fn create_admin_session(c: &mut DbConn, row: AdminSessionRow) -> Q<AdminSessionRow> {
    c.write_transaction(|c| {
        let enabled = admins::table
            .find(&row.admin_id)
            .filter(admins::disabled.eq(false))
            .select(admins::id)
            .first::<String>(c)
            .optional()?;
        if enabled.is_none() {
            return Err(diesel::result::Error::NotFound);
        }
        diesel::insert_into(admin_sessions::table)
            .values(&row)
            .execute(c)?;
        Ok(row)
    })
}

fn admin_session(
    c: &mut DbConn,
    token_hash: &str,
    now: i64,
) -> Q<Option<(AdminRow, AdminSessionRow)>> {
    let found = admin_sessions::table
        .inner_join(admins::table)
        .filter(admin_sessions::token_hash.eq(token_hash))
        .select((AdminRow::as_select(), AdminSessionRow::as_select()))
        .first::<(AdminRow, AdminSessionRow)>(c)
        .optional()?;
    let Some((admin, mut session)) = found else {
        return Ok(None);
    };
    if admin.disabled || !session.is_live(now) {
        return Ok(None);
    }
    let resolution = LAST_SEEN_RESOLUTION_MS.min(session.idle_ttl_ms / 4);
    if now - session.last_seen_ms >= resolution {
        diesel::update(admin_sessions::table)
            .filter(admin_sessions::token_hash.eq(token_hash))
            .filter(admin_sessions::last_seen_ms.lt(now))
            .set(admin_sessions::last_seen_ms.eq(now))
            .execute(c)?;
        session.last_seen_ms = now;
    }
    Ok(Some((admin, session)))
}

fn revoke_admin_session(c: &mut DbConn, token_hash: &str, now: i64) -> Q<bool> {
    let n = diesel::update(admin_sessions::table)
        .filter(admin_sessions::token_hash.eq(token_hash))
        .filter(admin_sessions::revoked_at_ms.is_null())
        .set(admin_sessions::revoked_at_ms.eq(Some(now)))
        .execute(c)?;
    Ok(n == 1)
}

fn store_otp(c: &mut DbConn, admin_id: &str, code_hash: &str, expires_at_ms: i64) -> Q<()> {
    per_backend!(c, c => diesel::insert_into(admin_otps::table)
        .values((
            admin_otps::admin_id.eq(admin_id),
            admin_otps::code_hash.eq(code_hash),
            admin_otps::expires_at_ms.eq(expires_at_ms),
            admin_otps::attempts.eq(0),
        ))
        .on_conflict(admin_otps::admin_id)
        .do_update()
        .set((
            admin_otps::code_hash.eq(code_hash),
            admin_otps::expires_at_ms.eq(expires_at_ms),
            admin_otps::attempts.eq(0),
        ))
        .execute(c))
    .map(drop)
}

/// One attempt, serialized per admin id: SQLite's `BEGIN IMMEDIATE` holds
/// the write lock; on PostgreSQL a transaction advisory lock on the id does
/// (its lockout row may not exist yet, so there is no row to lock), so that
/// parallel guesses cannot slip past the failure count.
fn verify_otp(
    c: &mut DbConn,
    admin_id: &str,
    presented: &str,
    now: i64,
    policy: OtpPolicy,
) -> Q<OtpOutcome> {
    c.write_transaction(|c| {
        if let DbConn::Pg(pg) = c {
            diesel::sql_query("SELECT pg_advisory_xact_lock(hashtext($1))")
                .bind::<Text, _>(format!("duet.otp:{admin_id}"))
                .execute(pg)?;
        }
        let lockout = admin_lockouts::table
            .find(admin_id)
            .select(LockoutRow::as_select())
            .first(c)
            .optional()?;
        if let Some(until_ms) = lockout
            .as_ref()
            .and_then(|l| l.locked_until_ms)
            .filter(|&u| u > now)
        {
            return Ok(OtpOutcome::Locked { until_ms });
        }
        let otp = admin_otps::table
            .find(admin_id)
            .select(OtpRow::as_select())
            .first(c)
            .optional()?;
        let code = admin_otps::table.find(admin_id);
        let outcome = match otp {
            None => {
                std::hint::black_box(secret_matches(presented, NO_CODE_HASH));
                OtpOutcome::Wrong
            }
            Some(otp) if now >= otp.expires_at_ms => {
                diesel::delete(code).execute(c)?;
                OtpOutcome::Expired
            }
            Some(otp) => {
                let right = secret_matches(presented, &otp.code_hash);
                if right && get_admin(c, admin_id)?.is_some_and(|a| !a.disabled) {
                    diesel::delete(code).execute(c)?;
                    diesel::delete(admin_lockouts::table.find(admin_id)).execute(c)?;
                    return Ok(OtpOutcome::Ok);
                }
                if otp.attempts + 1 >= policy.max_failures {
                    diesel::delete(code).execute(c)?;
                } else {
                    diesel::update(code)
                        .set(admin_otps::attempts.eq(otp.attempts + 1))
                        .execute(c)?;
                }
                OtpOutcome::Wrong
            }
        };
        count_failure(c, admin_id, lockout, now, policy)?;
        Ok(outcome)
    })
}

/// Counts a failure in the current window (a new one when none is open or
/// a lock has run out) and locks the id when the window reaches the limit.
fn count_failure(
    c: &mut DbConn,
    admin_id: &str,
    before: Option<LockoutRow>,
    now: i64,
    policy: OtpPolicy,
) -> Q<()> {
    let (failures, window_start_ms) = match &before {
        Some(l) if l.locked_until_ms.is_none() && now < l.window_start_ms + policy.window_ms => {
            (l.failures + 1, l.window_start_ms)
        }
        _ => (1, now),
    };
    let locked_until_ms = (failures >= policy.max_failures).then_some(now + policy.lockout_ms);
    if locked_until_ms.is_some() {
        tracing::warn!(
            admin_id,
            failures,
            "admin id locked after failed login codes"
        );
    }
    let columns = (
        admin_lockouts::failures.eq(failures),
        admin_lockouts::locked_until_ms.eq(locked_until_ms),
        admin_lockouts::window_start_ms.eq(window_start_ms),
    );
    if before.is_some() {
        diesel::update(admin_lockouts::table.find(admin_id))
            .set(columns)
            .execute(c)?;
    } else {
        diesel::insert_into(admin_lockouts::table)
            .values((
                admin_lockouts::admin_id.eq(admin_id),
                columns.0,
                columns.1,
                columns.2,
            ))
            .execute(c)?;
    }
    Ok(())
}

fn audit(c: &mut DbConn, actor: &str, action: &str, detail: &str, now: i64) -> Q<()> {
    diesel::insert_into(audit_log::table)
        .values((
            audit_log::id.eq(uuid::Uuid::new_v4().to_string()),
            audit_log::at_ms.eq(now),
            audit_log::actor.eq(actor),
            audit_log::action.eq(action),
            audit_log::detail.eq(detail),
        ))
        .execute(c)
        .map(drop)
}

fn new_session_row(
    admin_id: &str,
    token_hash: &str,
    now_ms: i64,
    idle_ttl_ms: i64,
    absolute_ttl_ms: i64,
) -> AdminSessionRow {
    AdminSessionRow {
        token_hash: token_hash.to_owned(),
        admin_id: admin_id.to_owned(),
        created_at_ms: now_ms,
        last_seen_ms: now_ms,
        idle_ttl_ms,
        expires_at_ms: now_ms.saturating_add(absolute_ttl_ms),
        revoked_at_ms: None,
    }
}

impl Database {
    /// Adds an admin, or renames an existing one (its other fields stay).
    #[allow(
        dead_code,
        reason = "the CLI uses add_admin_sync; kept for an admin API"
    )]
    pub async fn add_admin(&self, id: &str, name: &str) -> Result<AdminRow, StorageError> {
        let (id, name) = (id.to_owned(), name.to_owned());
        self.run(move |c| add_admin(c, &id, &name, None, now_ms())).await
    }

    pub fn add_admin_sync(&self, id: &str, name: &str, telegram: Option<&str>) -> Result<AdminRow, StorageError> {
        self.run_sync(|c| add_admin(c, id, name, telegram, now_ms()))
    }

    /// `duet admin disable`: see [`disable_admin`].
    pub fn disable_admin_sync(&self, id: &str) -> Result<bool, StorageError> {
        self.run_sync(|c| disable_admin(c, id, now_ms()))
    }

    pub async fn get_admin(&self, id: &str) -> Result<Option<AdminRow>, StorageError> {
        let id = id.to_owned();
        self.run(move |c| get_admin(c, &id)).await
    }

    /// Stores a login (by the hash of its token) that ends at
    /// `now_ms + absolute_ttl_ms`, or after `idle_ttl_ms` without use.
    /// `NotFound` for an unknown or disabled admin.
    pub async fn create_admin_session(
        &self,
        admin_id: &str,
        token_hash: &str,
        now_ms: i64,
        idle_ttl_ms: i64,
        absolute_ttl_ms: i64,
    ) -> Result<AdminSessionRow, StorageError> {
        let row = new_session_row(admin_id, token_hash, now_ms, idle_ttl_ms, absolute_ttl_ms);
        self.run(move |c| create_admin_session(c, row)).await
    }

    pub fn create_admin_session_sync(
        &self,
        admin_id: &str,
        token_hash: &str,
        now_ms: i64,
        idle_ttl_ms: i64,
        absolute_ttl_ms: i64,
    ) -> Result<AdminSessionRow, StorageError> {
        let row = new_session_row(admin_id, token_hash, now_ms, idle_ttl_ms, absolute_ttl_ms);
        self.run_sync(move |c| create_admin_session(c, row))
    }

    /// The admin and login behind a token hash, if the login is live (not
    /// revoked, not past its absolute or idle end) and the admin enabled.
    /// Records the use, at most once per resolution period.
    pub async fn admin_session(
        &self,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<Option<(AdminRow, AdminSessionRow)>, StorageError> {
        let token_hash = token_hash.to_owned();
        self.run(move |c| admin_session(c, &token_hash, now_ms))
            .await
    }

    /// Revokes a login; answers whether it was not revoked already. Every
    /// node sees it at its next [`Database::admin_session`].
    pub async fn revoke_admin_session(
        &self,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<bool, StorageError> {
        let token_hash = token_hash.to_owned();
        self.run(move |c| revoke_admin_session(c, &token_hash, now_ms))
            .await
    }

    /// Stores the hash of a new code for the admin, replacing any earlier one.
    pub async fn store_otp(
        &self,
        admin_id: &str,
        code_hash: &str,
        expires_at_ms: i64,
    ) -> Result<(), StorageError> {
        let (admin_id, code_hash) = (admin_id.to_owned(), code_hash.to_owned());
        self.run(move |c| store_otp(c, &admin_id, &code_hash, expires_at_ms))
            .await
    }

    /// Checks a presented code: single use, constant-time, failures counted
    /// per id (known or not), locked after `policy.max_failures`.
    pub async fn verify_otp(
        &self,
        admin_id: &str,
        presented_code: &str,
        now_ms: i64,
        policy: OtpPolicy,
    ) -> Result<OtpOutcome, StorageError> {
        let (admin_id, presented) = (admin_id.to_owned(), presented_code.to_owned());
        self.run(move |c| verify_otp(c, &admin_id, &presented, now_ms, policy))
            .await
    }

    /// Appends to the audit trail. Never put secrets or message text in it.
    pub async fn audit(&self, actor: &str, action: &str, detail: &str) -> Result<(), StorageError> {
        let (actor, action, detail) = (actor.to_owned(), action.to_owned(), detail.to_owned());
        self.run(move |c| audit(c, &actor, &action, &detail, now_ms()))
            .await
    }

    pub fn audit_sync(&self, actor: &str, action: &str, detail: &str) -> Result<(), StorageError> {
        self.run_sync(|c| audit(c, actor, action, detail, now_ms()))
    }
}
