//! The `duet` binary: configuration, HTTP and WebSocket routes, and the
//! adapters (diesel storage) that the actors reach through their traits.
//!
//! ```text
//! duet                          serve (the default)
//! duet migrate                  run the database migrations and exit
//! duet admin add <id> --name N [--telegram CHAT]
//!                               add (or rename) an admin; CHAT: where
//!                               Telegram delivers its one-time codes
//! duet admin token <id>         print a fresh admin bearer token
//! duet admin disable <id>       disable an admin and revoke their logins
//! ```

mod app;
mod auth;
mod config;
mod http;
mod metrics;
mod notify;
mod protocol;
mod storage;
mod telemetry;
mod ws;

use anyhow::{bail, Context};

use crate::config::Config;

enum Command {
    Serve,
    Migrate,
    AdminAdd { id: String, name: String, telegram: Option<String> },
    AdminToken { id: String },
    AdminDisable { id: String },
}

const USAGE: &str = "usage: duet [migrate | admin add <id> --name <name> [--telegram <chat id>] | admin token <id> | admin disable <id>]";

/// `admin add`'s words: one id, `--name` and `--telegram` in any order.
fn admin_add(words: &[&str]) -> anyhow::Result<Command> {
    let (mut id, mut name, mut telegram) = (None, None, None);
    let mut it = words.iter();
    while let Some(w) = it.next() {
        let slot = match *w {
            "--name" => &mut name,
            "--telegram" => &mut telegram,
            flag if flag.starts_with("--") => bail!("unknown option {flag}\n{USAGE}"),
            _ => &mut id,
        };
        let value = if w.starts_with("--") { it.next().with_context(|| format!("{w} needs a value\n{USAGE}"))? } else { w };
        if slot.replace((*value).to_owned()).is_some() {
            bail!("{w} given twice\n{USAGE}");
        }
    }
    let id = id.with_context(|| format!("admin add needs an id\n{USAGE}"))?;
    Ok(Command::AdminAdd { name: name.unwrap_or_else(|| id.clone()), id, telegram })
}

fn parse_args(args: &[String]) -> anyhow::Result<Command> {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    Ok(match a.as_slice() {
        [] | ["serve"] => Command::Serve,
        ["migrate"] => Command::Migrate,
        ["admin", "add", rest @ ..] => admin_add(rest)?,
        ["admin", "token", id] => Command::AdminToken { id: (*id).to_owned() },
        ["admin", "disable", id] => Command::AdminDisable { id: (*id).to_owned() },
        ["-h" | "--help" | "help"] => {
            println!("{USAGE}");
            std::process::exit(0)
        }
        _ => bail!("{USAGE}"),
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = parse_args(&args)?;
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("duet: {e}");
            std::process::exit(2);
        }
    };
    telemetry::init(config.log_format, &config.log_filter);
    match command {
        Command::Serve => serve(config),
        Command::Migrate => {
            app::open_database(&config).context("opening the database")?;
            eprintln!("migrations are up to date");
            Ok(())
        }
        Command::AdminAdd { id, name, telegram } => {
            if id.is_empty() || id.chars().count() > 64 || name.is_empty() || name.chars().count() > 80 {
                bail!("admin id must be 1-64 characters and name 1-80");
            }
            // Telegram chat ids are integers (negative for groups), or a
            // channel's @username.
            if let Some(chat) = &telegram {
                let number = chat.strip_prefix('-').unwrap_or(chat);
                let valid = (!number.is_empty() && number.len() <= 20 && number.bytes().all(|b| b.is_ascii_digit()))
                    || (chat.len() <= 33 && chat.strip_prefix('@').is_some_and(|u| !u.is_empty() && u.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')));
                if !valid {
                    bail!("--telegram must be a Telegram chat id (digits, - for groups) or @channel");
                }
            }
            let db = app::open_database(&config).context("opening the database")?;
            db.add_admin_sync(&id, &name, telegram.as_deref()).context("adding the admin")?;
            let _ = db.audit_sync("cli", "admin_added", &id);
            eprintln!("admin {id} ({name}) is ready");
            Ok(())
        }
        Command::AdminToken { id } => {
            let db = app::open_database(&config).context("opening the database")?;
            let (token, _) = auth::mint_login_sync(&db, &config, &id).with_context(|| format!("no admin {id:?}: add it first with `duet admin add {id} --name <name>`"))?;
            let _ = db.audit_sync("cli", "token_minted", &id);
            println!("{token}");
            Ok(())
        }
        Command::AdminDisable { id } => {
            let db = app::open_database(&config).context("opening the database")?;
            if !db.disable_admin_sync(&id).context("disabling the admin")? {
                bail!("no admin {id:?}");
            }
            let _ = db.audit_sync("cli", "admin_disabled", &id);
            eprintln!("admin {id} is disabled and signed out everywhere (open sockets close within DUET_ADMIN_RECHECK_S); `duet admin add {id} --name <name>` enables them again");
            Ok(())
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    actix_web::rt::System::new().block_on(async move {
        let db = app::open_database(&config).with_context(|| format!("opening the database at {}", redact(&config.database_url)))?;
        if config.redis_url.is_some() {
            tracing::warn!("REDIS_URL is set, but cluster coordination is not built yet: this node runs with in-process coordination");
        }
        let state = app::build_state(config, db).await?;
        app::serve(state).await?;
        Ok(())
    })
}

/// A database URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}
