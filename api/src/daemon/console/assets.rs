//! The console's files, embedded in the binary so the daemon needs
//! nothing beside it. They are plain HTML, CSS and JavaScript modules with
//! no build step (docs/console.md says why); the chart library, uPlot, is
//! vendored with its licence under `api/console/vendor/`.

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

/// The console page.
pub const CONSOLE_HTML: &str = include_str!("../../../console/index.html");
/// The login page.
pub const LOGIN_HTML: &str = include_str!("../../../console/login.html");

/// Files under `/assets/`: name, content type, bytes.
const FILES: &[(&str, &str, &str)] = &[
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_str!("../../../console/console.js"),
    ),
    (
        "timeline.js",
        "text/javascript; charset=utf-8",
        include_str!("../../../console/timeline.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_str!("../../../console/api.js"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_str!("../../../console/console.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("../../../console/vendor/uplot/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("../../../console/vendor/uplot/uPlot.min.css"),
    ),
    (
        "uPlot.LICENSE.txt",
        "text/plain; charset=utf-8",
        include_str!("../../../console/vendor/uplot/LICENSE"),
    ),
];

/// An HTML page.
pub fn page(html: &str) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html.to_string(),
    )
        .into_response()
}

/// `GET /assets/FILE`. The files hold nothing secret (the data comes from
/// the API), so they need no session, which lets the login page use them.
pub async fn serve(Path(file): Path<String>) -> Response {
    match FILES.iter().find(|(name, _, _)| *name == file) {
        Some((_, kind, body)) => (
            [
                (header::CONTENT_TYPE, *kind),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *body,
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("the console has no asset {file:?}"),
        )
            .into_response(),
    }
}
