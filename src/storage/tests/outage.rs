//! The database going away: answers come fast as `Unavailable`, and the
//! writer and pool recover by themselves when it is back.

use std::net::ToSocketAddrs;
use std::time::{Duration, Instant};

use duet_actors::error::StoreError;

use super::events::{create, sid};
use super::support::{pg_server_url, with_database, Proxy, TestDb};
use crate::storage::{Backend, Database, DbOptions, StorageError};

/// "About connect_timeout (2 s)", with room for a loaded CI machine.
const PROMPT: Duration = Duration::from_secs(3);

fn pg_socket() -> std::net::SocketAddr {
    let url = pg_server_url();
    let host_port = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .map(|hp| hp.rsplit('@').next().unwrap_or(hp).to_owned())
        .expect("DUET_TEST_DATABASE_URL has a host");
    let host_port = if host_port.contains(':') {
        host_port
    } else {
        format!("{host_port}:5432")
    };
    host_port
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .expect("DUET_TEST_DATABASE_URL host resolves")
}

#[tokio::test]
async fn open_against_a_closed_port_fails_fast() {
    let started = Instant::now();
    let result = tokio::task::spawn_blocking(|| {
        Database::open("postgres://postgres@127.0.0.1:1/none", DbOptions::default())
    })
    .await
    .expect("join");
    assert!(
        matches!(result, Err(StorageError::Unavailable(_))),
        "{result:?}"
    );
    assert!(started.elapsed() < PROMPT, "took {:?}", started.elapsed());
}

#[tokio::test]
async fn appends_reads_and_ping_fail_fast_while_down_then_recover() {
    let (direct_url, _guard) = TestDb::unopened(Backend::Postgres);
    let proxy = Proxy::start(pg_socket()).expect("proxy");
    let name = direct_url.rsplit('/').next().expect("db name").to_owned();
    let url = with_database(&format!("postgres://postgres@{}/x", proxy.addr), &name);
    let db = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || Database::open(&url, DbOptions::default()))
            .await
            .expect("join")
            .expect("open through the proxy")
    };
    let store = db.event_store();
    let id = sid();
    store.append(create(&id)).await.expect("append while up");

    proxy.set_up(false);
    let started = Instant::now();
    let down = store.append(super::events::create(&sid())).await;
    assert_eq!(down, Err(StoreError::Unavailable { what: "database" }));
    assert!(
        started.elapsed() < PROMPT,
        "append took {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let read = store.load_session(&id).await;
    assert_eq!(
        read.map(|s| s.is_some()),
        Err(StoreError::Unavailable { what: "database" })
    );
    assert!(
        started.elapsed() < PROMPT,
        "read took {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    assert!(matches!(db.ping().await, Err(StorageError::Unavailable(_))));
    assert!(
        started.elapsed() < PROMPT,
        "ping took {:?}",
        started.elapsed()
    );

    proxy.set_up(true);
    let deadline = Instant::now() + Duration::from_secs(10);
    let back = sid();
    loop {
        match store.append(create(&back)).await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e, StoreError::Unavailable { what: "database" });
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("writer did not recover: {e}"),
        }
    }
    assert!(store
        .load_session(&back)
        .await
        .expect("read after recovery")
        .is_some());
    db.ping().await.expect("ping after recovery");
    drop(store);
    drop(db);
}
