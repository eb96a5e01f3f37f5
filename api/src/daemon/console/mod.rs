//! The web console on the HTTP address: the page where a user sees each
//! volume's timeline, chooses a point and recovers it, and the JSON API
//! it talks to. Both need the daemon's token; `/metrics` and `/healthz`
//! (in [`super::http`]) stay open.
//!
//! - [`session`] — logging in with the token, the session cookie, and the
//!   checks against requests from other sites.
//! - [`json_api`] — `/api/v1/…`: the gRPC operations as JSON.
//! - [`jobs`] — restores started from the console and their progress.
//! - [`assets`] — the page, its script, style and the vendored chart
//!   library, embedded in the binary.

pub mod assets;
pub mod jobs;
pub mod json_api;
pub mod session;

use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;

use super::access::Token;
use super::grpc::Service;
use super::Daemon;
use session::{Refusal, Sessions};

/// What the console's handlers share.
#[derive(Debug)]
pub struct Console {
    /// The daemon, for the few routes the gRPC service has no call for.
    pub daemon: Arc<Daemon>,
    /// The gRPC service, which does the work of every API route.
    pub service: Service,
    /// Who is logged in.
    pub sessions: Sessions,
    /// Restores started from the console.
    pub jobs: Arc<jobs::Jobs>,
}

/// The console's routes: `/`, `/login`, `/logout`, `/assets/…` and
/// `/api/v1/…`; `secure` when served over TLS.
pub fn router(daemon: Arc<Daemon>, token: Token, secure: bool) -> Router {
    let console = Arc::new(Console {
        service: Service::new(daemon.clone()),
        daemon,
        sessions: Sessions::new(token, secure),
        jobs: Arc::default(),
    });
    let api = json_api::routes().layer(middleware::from_fn_with_state(
        console.clone(),
        require_caller,
    ));
    Router::new()
        .route("/", get(index))
        .route("/login", get(login_page).post(log_in))
        .route("/logout", post(log_out))
        .route("/assets/:file", get(assets::serve))
        .nest("/api/v1", api)
        .layer(middleware::from_fn(page_headers))
        .with_state(console)
}

/// Lets an API request through only with the token or a live session
/// (and, for changes by session, proof that this site's page sent it).
async fn require_caller(
    State(console): State<Arc<Console>>,
    mut request: Request,
    next: Next,
) -> Response {
    match console.sessions.check(request.method(), request.headers()) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(Refusal::Unauthenticated(message)) => {
            json_api::JsonError::from(tonic::Status::unauthenticated(message)).into_response()
        }
        Err(Refusal::CrossSite(message)) => {
            json_api::JsonError::from(tonic::Status::permission_denied(message)).into_response()
        }
    }
}

/// Headers on every console response: nothing is framed by another site
/// (a rollback button must not be clickjacked), and scripts come only
/// from the daemon itself.
async fn page_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        // Not no-referrer: with it browsers send `Origin: null` on the
        // login form's POST, which the same-origin check must refuse.
        HeaderValue::from_static("same-origin"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TokenQuery {
    token: Option<String>,
}

/// `GET /`: the console for a logged-in browser; `/?token=TOKEN` logs in
/// and redirects to `/` (so the token does not stay in the address bar);
/// anyone else gets the login page.
async fn index(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
) -> Response {
    if let Some(token) = query.token {
        return match console.sessions.log_in(&token) {
            Some(cookie) => logged_in(cookie),
            None => login_refused(),
        };
    }
    if console.sessions.session(&headers).is_some() {
        assets::page(assets::CONSOLE_HTML)
    } else {
        assets::page(assets::LOGIN_HTML)
    }
}

async fn login_page() -> Response {
    assets::page(assets::LOGIN_HTML)
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

/// `POST /login` with the token from the login form.
async fn log_in(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if let Err(message) = session::same_origin(&headers) {
        return (StatusCode::FORBIDDEN, message).into_response();
    }
    match console.sessions.log_in(&form.token) {
        Some(cookie) => logged_in(cookie),
        None => login_refused(),
    }
}

fn logged_in(cookie: HeaderValue) -> Response {
    let mut response = Redirect::to("/").into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    response
}

/// The login page again, with its "wrong token" line shown, as a 401.
fn login_refused() -> Response {
    let mut response = assets::page(&assets::LOGIN_HTML.replace(
        "<p id=\"login-error\" class=\"error\" hidden>",
        "<p id=\"login-error\" class=\"error\">",
    ));
    *response.status_mut() = StatusCode::UNAUTHORIZED;
    response
}

/// `POST /logout`: ends the session.
async fn log_out(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if let Err(message) = session::same_origin(&headers) {
        return (StatusCode::FORBIDDEN, message).into_response();
    }
    let cookie = console.sessions.log_out(&headers);
    let mut response = Redirect::to("/").into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    response
}
