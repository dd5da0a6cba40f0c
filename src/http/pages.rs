//! The demo client (`/`), the admin panel page (`/admin`) and their static
//! files, embedded in the binary so `cargo run` needs nothing else. No
//! inline script or style: the CSP forbids it.

use actix_web::{web, HttpResponse};

use super::error::HttpError;

const DEMO_HTML: &str = include_str!("../../static/demo.html");
const ADMIN_HTML: &str = include_str!("../../static/admin.html");

const ASSETS: &[(&str, &str, &str)] = &[
    ("demo.js", "text/javascript; charset=utf-8", include_str!("../../static/demo.js")),
    ("admin.js", "text/javascript; charset=utf-8", include_str!("../../static/admin.js")),
    ("duet.css", "text/css; charset=utf-8", include_str!("../../static/duet.css")),
];

fn html(body: &'static str) -> HttpResponse {
    HttpResponse::Ok().content_type("text/html; charset=utf-8").insert_header(("Cache-Control", "no-cache")).body(body)
}

pub async fn demo() -> HttpResponse {
    html(DEMO_HTML)
}

pub async fn admin() -> HttpResponse {
    html(ADMIN_HTML)
}

pub async fn asset(file: web::Path<String>) -> Result<HttpResponse, HttpError> {
    let (_, mime, body) = ASSETS.iter().find(|(n, _, _)| *n == file.as_str()).ok_or(HttpError::NotFound("no such file"))?;
    Ok(HttpResponse::Ok().content_type(*mime).insert_header(("Cache-Control", "public, max-age=300")).body(*body))
}
