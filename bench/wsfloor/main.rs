//! The floor probe behind BENCHMARKS.md: bare actix-web + actix-ws, a task per
//! socket that reads (and echoes text). Not part of the workspace; to run it,
//! copy this file and `Cargo.toml.txt` (as Cargo.toml) into a scratch crate,
//! `cargo build --release`, and connect 10 000 clients (`client.js`).

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use futures_util::StreamExt;
#[cfg(feature = "mi")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
async fn ws(req: HttpRequest, body: web::Payload) -> Result<HttpResponse, actix_web::Error> {
    let (res, mut session, stream) = actix_ws::handle(&req, body)?;
    let mut stream = stream.max_frame_size(65536).aggregate_continuations();
    let mode = std::env::var("MODE").unwrap_or_default();
    actix_web::rt::spawn(async move {
        if mode == "hello" { let _ = session.text(r#"{"type":"hello","protocol":1}"#).await; }
        while let Some(Ok(m)) = stream.next().await {
            if let actix_ws::AggregatedMessage::Text(t) = m { let _ = session.text(t).await; }
        }
    });
    Ok(res)
}
#[actix_web::main]
async fn main() -> std::io::Result<()> {
    HttpServer::new(|| App::new().route("/ws", web::get().to(ws))).workers(2).backlog(4096).max_connections(100000)
        .bind("127.0.0.1:8099")?.run().await
}
