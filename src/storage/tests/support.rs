//! Test databases, shared by every storage test: a SQLite file in its own
//! temp folder, or a fresh PostgreSQL database (created on the server at
//! `DUET_TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`,
//! and dropped afterwards). Plus a TCP proxy that can cut the database off.

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};

use crate::storage::{Backend, Database, DbOptions};

pub(crate) const BACKENDS: [Backend; 2] = [Backend::Sqlite, Backend::Postgres];

pub(crate) fn pg_server_url() -> String {
    std::env::var("DUET_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// `url` with its database name replaced.
pub(crate) fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let root = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{name}?{q}"),
        None => format!("{root}/{name}"),
    }
}

/// A database that exists for one test; removed on drop, even on panic.
pub(crate) struct TestDb {
    pub db: Database,
    /// What `Database::open` was given.
    pub url: String,
    cleanup: Cleanup,
}

enum Cleanup {
    Dir(PathBuf),
    PgDatabase { server: String, name: String },
}

impl TestDb {
    pub(crate) fn new(backend: Backend, opts: DbOptions) -> TestDb {
        let (url, cleanup) = fresh(backend);
        let db = match Database::open(&url, opts) {
            Ok(db) => db,
            Err(e) => panic!("cannot open the {backend:?} test database: {e}"),
        };
        TestDb { db, url, cleanup }
    }

    /// Creates the database but lets the test open it (e.g. through a proxy).
    pub(crate) fn unopened(backend: Backend) -> (String, impl Drop) {
        let (url, cleanup) = fresh(backend);
        (url, CleanupGuard(Some(cleanup)))
    }
}

fn fresh(backend: Backend) -> (String, Cleanup) {
    let name = format!("duet_storage_{}", uuid::Uuid::new_v4().simple());
    match backend {
        Backend::Sqlite => {
            let dir = std::env::temp_dir().join(&name);
            // A folder that does not exist yet: `open` must create it.
            let file = dir.join("nested").join("duet.db");
            (file.to_string_lossy().into_owned(), Cleanup::Dir(dir))
        }
        Backend::Postgres => {
            let server = pg_server_url();
            let mut admin = match PgConnection::establish(&server) {
                Ok(c) => c,
                Err(e) => panic!("PostgreSQL for tests is not reachable at {server} ({e}); set DUET_TEST_DATABASE_URL"),
            };
            if let Err(e) = admin.batch_execute(&format!("CREATE DATABASE {name}")) {
                panic!("cannot create test database {name}: {e}");
            }
            (
                with_database(&server, &name),
                Cleanup::PgDatabase { server, name },
            )
        }
    }
}

impl Cleanup {
    fn run(&self) {
        match self {
            Cleanup::Dir(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Cleanup::PgDatabase { server, name } => {
                // FORCE ends the pool's and the writer's connections.
                let dropped = PgConnection::establish(server)
                    .map_err(|e| e.to_string())
                    .and_then(|mut c| {
                        c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .map_err(|e| e.to_string())
                    });
                if let Err(e) = dropped {
                    eprintln!("could not drop test database {name}: {e}");
                }
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        self.cleanup.run();
    }
}

struct CleanupGuard(Option<Cleanup>);

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.run();
        }
    }
}

/// Runs `test` once per backend, each time on a fresh database.
pub(crate) async fn each_backend<F, Fut>(opts: DbOptions, test: F)
where
    F: Fn(Database) -> Fut,
    Fut: Future<Output = ()>,
{
    for backend in BACKENDS {
        let t = TestDb::new(backend, opts.clone());
        test(t.db.clone()).await;
    }
}

/// A TCP forwarder to the database that can be cut: while down it resets
/// the connections it carries and closes new ones at once.
pub(crate) struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub(crate) fn start(upstream: SocketAddr) -> io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let up = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (up2, stop2, open2) = (up.clone(), stop.clone(), open.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) if up2.load(Ordering::SeqCst) => {
                        let _ = forward(client, upstream, &open2);
                    }
                    Ok((client, _)) => drop(client),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Proxy {
            addr,
            up,
            stop,
            open,
        })
    }

    pub(crate) fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            if let Ok(mut open) = self.open.lock() {
                for s in open.drain(..) {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.set_up(false);
    }
}

fn forward(
    client: TcpStream,
    upstream: SocketAddr,
    open: &Mutex<Vec<TcpStream>>,
) -> io::Result<()> {
    client.set_nonblocking(false)?;
    let server = TcpStream::connect(upstream)?;
    if let Ok(mut open) = open.lock() {
        open.push(client.try_clone()?);
        open.push(server.try_clone()?);
    }
    for (mut from, mut to) in [(client.try_clone()?, server.try_clone()?), (server, client)] {
        std::thread::spawn(move || {
            let _ = io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Both);
        });
    }
    Ok(())
}
