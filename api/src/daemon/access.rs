//! Who may use the API. The daemon acts with its operator's privileges (it
//! opens backing devices, writes restores, runs verification commands), so
//! every gRPC request must carry the daemon's token as
//! `authorization: Bearer TOKEN`, and the API speaks TLS when a certificate
//! is configured. `/metrics` and `/healthz` need no token.
//!
//! The token is `[api] token_file` (or `serve --token-file`) when one is
//! configured, else `DATA_DIR/api.token`, made at the first start: 256
//! random bits as 64 hex digits, mode 0600.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tonic::{Request, Status};

/// The token file made in the data directory when none is configured.
pub const DEFAULT_TOKEN_FILE: &str = "api.token";

/// The daemon's token: what every request must present.
#[derive(Clone)]
pub struct Token {
    secret: String,
    /// Where it is kept, for messages.
    pub path: PathBuf,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// The token in `configured` (which must exist), or in
    /// `DATA_DIR/api.token`, made there now if missing.
    pub fn load(configured: Option<&Path>, data_dir: &Path) -> Result<Token, String> {
        let path = match configured {
            Some(path) => path.to_path_buf(),
            None => data_dir.join(DEFAULT_TOKEN_FILE),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let secret = text.trim().to_string();
                if secret.is_empty() {
                    return Err(format!("token file {} is empty", path.display()));
                }
                if let Ok(meta) = std::fs::metadata(&path) {
                    if meta.permissions().mode() & 0o077 != 0 {
                        tracing::warn!(file = %path.display(), "the API token file can be read by other users; chmod 600 it");
                    }
                }
                Ok(Token { secret, path })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && configured.is_none() => {
                let secret = make_token_file(&path)?;
                tracing::info!(file = %path.display(), "made a new API token");
                Ok(Token { secret, path })
            }
            Err(e) => Err(format!("cannot read token file {}: {e}", path.display())),
        }
    }

    /// The secret, for a new primary that must reach this site.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// A token with this secret (tests).
    pub fn from_secret(secret: &str) -> Token {
        Token {
            secret: secret.to_string(),
            path: PathBuf::new(),
        }
    }

    /// True if `presented` is this token. The comparison takes as long
    /// whatever the bytes, so timing says nothing about the secret.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let secret = self.secret.as_bytes();
        presented.len() == secret.len()
            && presented
                .iter()
                .zip(secret)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// Checks a request's `authorization` header.
    // The error type is tonic's, as its interceptors require.
    #[allow(clippy::result_large_err)]
    pub fn check<T>(&self, request: Request<T>) -> Result<Request<T>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes().to_vec());
        match header.as_deref().and_then(|h| h.strip_prefix(b"Bearer ")) {
            Some(presented) if self.matches(presented) => Ok(request),
            Some(_) => Err(Status::unauthenticated(
                "the daemon refused the request: the API token is wrong (pass the daemon's token with --token, TIDEMARK_TOKEN or TIDEMARK_TOKEN_FILE)",
            )),
            None => Err(Status::unauthenticated(
                "the daemon refused the request: it carries no API token (pass the daemon's token with --token, TIDEMARK_TOKEN or TIDEMARK_TOKEN_FILE; by default it is DATA_DIR/api.token)",
            )),
        }
    }
}

/// Every request to the API passes this check first.
impl tonic::service::Interceptor for Token {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request)
    }
}

/// Writes a fresh token to `path` (which must not exist), readable by its
/// owner only, durably; returns it.
fn make_token_file(path: &Path) -> Result<String, String> {
    let bytes: [u8; 32] = rand::random();
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let failed = |e: std::io::Error| format!("cannot make token file {}: {e}", path.display());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(failed)?;
    file.write_all(format!("{secret}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(failed)?;
    let dir = tidemark_journal::fs::parent_dir(path);
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(failed)?;
    Ok(secret)
}

/// The server side of TLS, from `[api] tls_cert` and `tls_key`.
pub fn server_tls(cert: &Path, key: &Path) -> Result<tonic::transport::ServerTlsConfig, String> {
    let read = |path: &Path, what: &str| {
        std::fs::read(path)
            .map_err(|e| format!("cannot read the TLS {what} {}: {e}", path.display()))
    };
    let identity =
        tonic::transport::Identity::from_pem(read(cert, "certificate")?, read(key, "key")?);
    Ok(tonic::transport::ServerTlsConfig::new().identity(identity))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_made_once_private_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let token = Token::load(None, dir.path()).unwrap();
        let path = dir.path().join(DEFAULT_TOKEN_FILE);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(token.secret.len(), 64);
        let again = Token::load(None, dir.path()).unwrap();
        assert_eq!(
            again.secret, token.secret,
            "the token is kept across starts"
        );

        let with = |value: &str| {
            let mut r = Request::new(());
            r.metadata_mut()
                .insert("authorization", value.parse().unwrap());
            r
        };
        assert!(token
            .check(with(&format!("Bearer {}", token.secret)))
            .is_ok());
        let wrong = token.check(with("Bearer nope")).unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(wrong.message().contains("wrong"), "{}", wrong.message());
        let none = token.check(Request::new(())).unwrap_err();
        assert!(
            none.message().contains("no API token"),
            "{}",
            none.message()
        );
    }

    #[test]
    fn a_configured_token_file_must_exist_and_hold_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("t");
        let err = Token::load(Some(&missing), dir.path()).unwrap_err();
        assert!(
            err.contains("t: ") || err.contains(&missing.display().to_string()),
            "{err}"
        );
        std::fs::write(&missing, "\n").unwrap();
        assert!(Token::load(Some(&missing), dir.path())
            .unwrap_err()
            .contains("empty"));
        std::fs::write(&missing, "s3cret\n").unwrap();
        assert_eq!(
            Token::load(Some(&missing), dir.path()).unwrap().secret,
            "s3cret"
        );
    }
}
