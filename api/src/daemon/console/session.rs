//! Who may use the console: the daemon's token, presented once at the
//! login page (or as `/?token=TOKEN`), buys a session kept in a cookie
//! that scripts cannot read (HttpOnly) and browsers never send from
//! another site (SameSite=Strict). A request that changes something must
//! also carry the session's second secret in `X-CSRF-Token`, which only a
//! page of this origin can have read, and an `Origin` (when the browser
//! sends one) of this host: a page elsewhere can neither ride the cookie
//! nor forge the header. Scripts may instead send the token itself as
//! `Authorization: Bearer TOKEN`, as gRPC clients do.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, HeaderValue, Method};
use parking_lot::Mutex;

use crate::daemon::access::Token;

/// The session cookie's name.
pub const COOKIE: &str = "tidemark_session";
/// The header that carries the session's cross-site-request secret.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts without use.
const IDLE: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; the oldest go first.
const MAX_SESSIONS: usize = 256;

/// One logged-in browser.
#[derive(Clone, Debug)]
pub struct Session {
    /// What the page sends back in `X-CSRF-Token`.
    pub csrf: String,
    last_used: Instant,
}

/// How a request proved who it is.
#[derive(Clone, Debug)]
pub enum Caller {
    /// `Authorization: Bearer TOKEN`: no ambient credential, so no
    /// cross-site check is needed.
    Bearer,
    /// The session cookie, with the session it names.
    Session(Session),
}

/// Why a request was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No (or a wrong, or an expired) credential: 401.
    Unauthenticated(String),
    /// A credential, but the request may have come from another site: 403.
    CrossSite(String),
}

/// The live sessions, in memory: a restart logs everyone out, which is
/// what a daemon whose token may have changed should do.
#[derive(Debug)]
pub struct Sessions {
    token: Token,
    /// Served over TLS: the cookie is marked `Secure`.
    secure: bool,
    live: Mutex<HashMap<String, Session>>,
}

fn random_hex() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Sessions {
    /// Sessions bought with `token`; `secure` when served over TLS.
    pub fn new(token: Token, secure: bool) -> Sessions {
        Sessions {
            token,
            secure,
            live: Mutex::new(HashMap::new()),
        }
    }

    /// True if `presented` is the daemon's token.
    pub fn token_matches(&self, presented: &str) -> bool {
        self.token.matches(presented.trim().as_bytes())
    }

    /// A new session if `presented` is the token; the `Set-Cookie` value
    /// that carries it.
    pub fn log_in(&self, presented: &str) -> Option<HeaderValue> {
        if !self.token_matches(presented) {
            return None;
        }
        let id = random_hex();
        let mut live = self.live.lock();
        live.retain(|_, s| s.last_used.elapsed() < IDLE);
        if live.len() >= MAX_SESSIONS {
            if let Some(oldest) = live
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(id, _)| id.clone())
            {
                live.remove(&oldest);
            }
        }
        live.insert(
            id.clone(),
            Session {
                csrf: random_hex(),
                last_used: Instant::now(),
            },
        );
        HeaderValue::from_str(&format!(
            "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
            IDLE.as_secs(),
            if self.secure { "; Secure" } else { "" }
        ))
        .ok()
    }

    /// Ends the session the request's cookie names; the `Set-Cookie`
    /// value that clears it.
    pub fn log_out(&self, headers: &HeaderMap) -> HeaderValue {
        if let Some(id) = cookie(headers, COOKIE) {
            self.live.lock().remove(&id);
        }
        HeaderValue::from_static("tidemark_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
    }

    /// The session the request's cookie names, if it is live.
    pub fn session(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE)?;
        let mut live = self.live.lock();
        let session = live.get_mut(&id)?;
        if session.last_used.elapsed() >= IDLE {
            live.remove(&id);
            return None;
        }
        session.last_used = Instant::now();
        Some(session.clone())
    }

    /// Checks an API request: who it comes from and, when it changes
    /// something on the strength of a cookie, that this site's page sent
    /// it.
    pub fn check(&self, method: &Method, headers: &HeaderMap) -> Result<Caller, Refusal> {
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let presented = value.to_str().unwrap_or("").strip_prefix("Bearer ");
            return match presented {
                Some(token) if self.token_matches(token) => Ok(Caller::Bearer),
                _ => Err(Refusal::Unauthenticated(
                    "the API token in the Authorization header is wrong (send `Authorization: Bearer TOKEN` with the daemon's token)".into(),
                )),
            };
        }
        let Some(session) = self.session(headers) else {
            return Err(Refusal::Unauthenticated(
                "not logged in: log in to the console with the daemon's token, or send `Authorization: Bearer TOKEN`".into(),
            ));
        };
        let changes = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        if changes {
            same_origin(headers).map_err(Refusal::CrossSite)?;
            let presented = headers
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if presented != session.csrf {
                return Err(Refusal::CrossSite(format!(
                    "a request that changes something must carry the session's {CSRF_HEADER} header (the console sends it; GET /api/v1/session gives it)"
                )));
            }
        }
        Ok(Caller::Session(session))
    }
}

/// Refuses a request whose `Origin` names another host than the one it
/// was sent to. Browsers send `Origin` with every cross-site POST; a
/// request without one (curl, an old browser's same-site form) passes.
pub fn same_origin(headers: &HeaderMap) -> Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = origin
        .split_once("://")
        .map_or(origin, |(_, rest)| rest)
        .trim_end_matches('/');
    if !host.is_empty() && origin_host.eq_ignore_ascii_case(host) {
        Ok(())
    } else {
        Err(format!(
            "refused a request from origin {origin} to host {host}: the console only takes changes from its own pages"
        ))
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn a_session_needs_the_token_and_changes_need_its_csrf_secret() {
        let sessions = Sessions::new(Token::from_secret("s3cret"), false);
        assert!(sessions.log_in("wrong").is_none());
        let cookie_value = sessions.log_in("s3cret\n").unwrap();
        let set = cookie_value.to_str().unwrap();
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"));
        let id = set.split(';').next().unwrap().to_string();

        let get = headers(&[("cookie", &format!("a=b; {id}")), ("host", "127.0.0.1:9")]);
        let Caller::Session(session) = sessions.check(&Method::GET, &get).unwrap() else {
            panic!("a cookie makes a session caller");
        };
        // A POST without the secret, or from another origin, is refused.
        assert!(matches!(
            sessions.check(&Method::POST, &get),
            Err(Refusal::CrossSite(_))
        ));
        let from_elsewhere = headers(&[
            ("cookie", &id),
            ("host", "127.0.0.1:9"),
            ("origin", "http://evil.example"),
            ("x-csrf-token", &session.csrf),
        ]);
        assert!(matches!(
            sessions.check(&Method::POST, &from_elsewhere),
            Err(Refusal::CrossSite(_))
        ));
        let from_here = headers(&[
            ("cookie", &id),
            ("host", "127.0.0.1:9"),
            ("origin", "http://127.0.0.1:9"),
            ("x-csrf-token", &session.csrf),
        ]);
        assert!(sessions.check(&Method::POST, &from_here).is_ok());

        // The bearer token works without a session; a wrong one does not.
        let bearer = headers(&[("authorization", "Bearer s3cret")]);
        assert!(matches!(
            sessions.check(&Method::DELETE, &bearer),
            Ok(Caller::Bearer)
        ));
        let wrong = headers(&[("authorization", "Bearer nope")]);
        assert!(matches!(
            sessions.check(&Method::GET, &wrong),
            Err(Refusal::Unauthenticated(_))
        ));

        // After logging out the cookie buys nothing.
        sessions.log_out(&get);
        assert!(matches!(
            sessions.check(&Method::GET, &get),
            Err(Refusal::Unauthenticated(_))
        ));
    }
}
