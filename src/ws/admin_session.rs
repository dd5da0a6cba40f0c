//! An `/admin/ws` socket lives only as long as the admin session that
//! opened it (MISSION.md: revocation on every node, one session layer for
//! HTTP and WebSocket). A logout on this node closes the session's sockets
//! at once; a logout on another node, the absolute timeout or a disabled
//! admin close them at the next check, which runs every
//! `DUET_ADMIN_RECHECK_S` and at the session's absolute expiry. A check
//! counts as use, so an open socket keeps its session from idling out; a
//! failed check (database down) keeps the socket: nothing says it ended.

use std::sync::Arc;
use std::time::Duration;

use duet_actors::domain::now_ms;
use duet_actors::outbound::{ConnHandle, Outbound};

use crate::app::AppState;

/// Close code of a socket whose admin session ended (policy violation:
/// it may not stay open without a valid session).
pub const CLOSE_SIGNED_OUT: u16 = 1008;
const SIGNED_OUT: &str = "the admin session ended; sign in again";

/// Held by the socket for its whole life: it is in the node's table of
/// admin sockets and its session is checked, until it is dropped.
pub struct AdminSessionWatch {
    state: Arc<AppState>,
    conn_id: u64,
    task: tokio::task::JoinHandle<()>,
}

impl AdminSessionWatch {
    pub fn start(state: &Arc<AppState>, handle: &ConnHandle, token_hash: String) -> AdminSessionWatch {
        let hash: Arc<str> = Arc::from(token_hash);
        state.admin_conns.lock().insert(handle.conn_id, (hash.clone(), handle.clone()));
        let task = actix_web::rt::spawn(recheck(state.clone(), handle.clone(), hash));
        AdminSessionWatch { state: state.clone(), conn_id: handle.conn_id, task }
    }
}

impl Drop for AdminSessionWatch {
    fn drop(&mut self) {
        self.task.abort();
        self.state.admin_conns.lock().remove(&self.conn_id);
    }
}

async fn recheck(state: Arc<AppState>, handle: ConnHandle, hash: Arc<str>) {
    // A check counts as use: often enough that an open socket's session
    // never idles out between two.
    let every = state.config.admin_recheck.min(state.config.admin_idle_ttl / 4);
    // The first check at once learns when the session expires.
    let mut next = Duration::ZERO;
    loop {
        tokio::time::sleep(next).await;
        let now = now_ms();
        match state.db.admin_session(&hash, now).await {
            Ok(Some((_, session))) => {
                // Woken at the absolute expiry too, not up to `every` after it.
                let left = Duration::from_millis(session.expires_at_ms.saturating_sub(now).max(0) as u64);
                next = every.min(left + Duration::from_millis(10));
            }
            Ok(None) => {
                tracing::info!(conn_id = handle.conn_id, "admin session ended: closing its socket");
                handle.push(Outbound::Close { code: CLOSE_SIGNED_OUT, reason: SIGNED_OUT });
                return;
            }
            Err(e) => {
                tracing::debug!(conn_id = handle.conn_id, error = %e, "admin session check failed; socket kept");
                next = every;
            }
        }
    }
}

/// Closes this node's sockets opened with the session `token_hash` (just
/// revoked); answers how many.
pub fn close_signed_out(state: &AppState, token_hash: &str) -> usize {
    state
        .admin_conns
        .lock()
        .values()
        .filter(|(h, c)| h.as_ref() == token_hash && c.push(Outbound::Close { code: CLOSE_SIGNED_OUT, reason: SIGNED_OUT }))
        .count()
}
