//! Option negotiation (fixed newstyle), structured replies and the
//! metadata contexts `CMD_BLOCK_STATUS` answers for: `base:allocation`
//! and tidemark's `tidemark:changed:POINT`.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::protocol::*;
use super::wire;
use crate::daemon::error::ApiError;
use crate::daemon::exports::Export;
use crate::daemon::Daemon;
use crate::point_spec::PointSpec;
use tidemark_journal::Seq;

/// A metadata context the client selected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Context {
    /// `base:allocation`: holes and data.
    Allocation,
    /// `tidemark:changed:POINT`: what changed after `since` (POINT's seq).
    Changed {
        /// The seq POINT resolved to.
        since: Seq,
    },
}

/// What the client and the server agreed beside the export.
#[derive(Clone, Debug, Default)]
pub struct Agreed {
    /// Structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    pub structured: bool,
    /// The selected metadata contexts with the ids they were given.
    pub contexts: Vec<(u32, Context)>,
}

/// The contexts `queries` name for `export`, with their names; a query
/// that names none (unknown, or a point that cannot be used) selects
/// nothing, as the protocol wants. No queries: every context that needs
/// no argument.
async fn match_contexts(
    daemon: &Arc<Daemon>,
    export: &Arc<Export>,
    queries: Vec<String>,
) -> Vec<(String, Context)> {
    if queries.is_empty() {
        return vec![(CONTEXT_ALLOCATION.to_string(), Context::Allocation)];
    }
    let mut out = Vec::new();
    for query in queries {
        if query == CONTEXT_ALLOCATION || query == "base:" {
            out.push((CONTEXT_ALLOCATION.to_string(), Context::Allocation));
            continue;
        }
        let Some(point) = query.strip_prefix(CONTEXT_CHANGED_PREFIX) else {
            continue;
        };
        let Ok(spec) = PointSpec::parse(point) else {
            tracing::debug!(query, "nbd: metadata context with a malformed point");
            continue;
        };
        let (registry, volume, bound) = (
            daemon.registry.clone(),
            export.volume_name.clone(),
            export.seq(),
        );
        let resolved = tokio::task::spawn_blocking(move || {
            let v = registry.volume(&volume)?;
            registry.resolve(&v, &spec)
        })
        .await;
        match resolved {
            Ok(Ok(since)) if bound.is_none_or(|seq| since <= seq) => {
                out.push((query.clone(), Context::Changed { since }));
            }
            other => tracing::debug!(query, ?other, "nbd: metadata context not selected"),
        }
    }
    out
}

/// Why a handshake ended without an export.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The socket failed or closed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol.
    #[error("malformed handshake: {0}")]
    Malformed(String),
    /// NBD_OPT_EXPORT_NAME for an export that cannot be opened (the
    /// protocol's only answer is to close).
    #[error("export {name:?}: {reason}")]
    Refused {
        /// The export asked for.
        name: String,
        /// Why.
        reason: String,
    },
}

async fn reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    w.write_u64(REPLY_MAGIC).await?;
    w.write_u32(option).await?;
    w.write_u32(kind).await?;
    w.write_u32(data.len() as u32).await?;
    w.write_all(data).await?;
    w.flush().await
}

fn transmission_flags(export: &Export) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
    if export.read_only() {
        flags |= TFLAG_READ_ONLY;
    } else {
        flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
    if export.is_live() || export.read_only() {
        flags |= TFLAG_CAN_MULTI_CONN;
    }
    flags
}

async fn open(daemon: &Arc<Daemon>, name: String) -> Result<Arc<Export>, ApiError> {
    let registry = daemon.registry.clone();
    tokio::task::spawn_blocking(move || registry.open_export(&name))
        .await
        .map_err(|e| ApiError::Failed(format!("export lookup failed: {e}")))?
}

/// Opens export `name` for an option that names it, or answers the option
/// with why not (`NBD_REP_ERR_PLATFORM` when the server failed,
/// `NBD_REP_ERR_UNKNOWN` otherwise) and returns None.
async fn open_or_refuse<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    daemon: &Arc<Daemon>,
    name: &str,
) -> std::io::Result<Option<Arc<Export>>> {
    match open(daemon, name.to_string()).await {
        Ok(export) => Ok(Some(export)),
        Err(e) => {
            let kind = match e {
                ApiError::Failed(_) => REP_ERR_PLATFORM,
                _ => REP_ERR_UNKNOWN,
            };
            reply(w, option, kind, e.to_string().as_bytes()).await?;
            Ok(None)
        }
    }
}

/// Negotiates until the client picks an export (`Some`, with what else
/// was agreed) or leaves (`None`).
pub async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    daemon: &Arc<Daemon>,
) -> Result<Option<(Arc<Export>, Agreed)>, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    w.write_u64(NBDMAGIC).await?;
    w.write_u64(IHAVEOPT).await?;
    w.write_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).await?;
    w.flush().await?;
    let client_flags = r.read_u32().await?;
    let no_zeroes =
        wire::decode_client_flags(client_flags).map_err(|e| HandshakeError::Malformed(e.0))?;
    let mut agreed = Agreed::default();
    // The export the selected contexts belong to.
    let mut contexts_for = String::new();
    loop {
        let mut head = [0u8; 16];
        r.read_exact(&mut head).await?;
        let (option, len) = match wire::decode_option_header(&head) {
            Ok(header) => (header.option, header.len),
            Err(e) => {
                let option = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
                if u64::from_be_bytes(head[0..8].try_into().unwrap_or_default()) == IHAVEOPT {
                    // Too much data to read just to refuse it.
                    reply(w, option, REP_ERR_TOO_BIG, b"option data too large").await?;
                }
                return Err(HandshakeError::Malformed(e.0));
            }
        };
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let export =
                    open(daemon, name.clone())
                        .await
                        .map_err(|e| HandshakeError::Refused {
                            name: name.clone(),
                            reason: e.to_string(),
                        })?;
                w.write_u64(export.size()).await?;
                w.write_u16(transmission_flags(&export)).await?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124]).await?;
                }
                w.flush().await?;
                if contexts_for != name {
                    agreed.contexts.clear();
                }
                return Ok(Some((export, agreed)));
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(
                        w,
                        option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY carries no data",
                    )
                    .await?;
                } else {
                    agreed.structured = true;
                    reply(w, option, REP_ACK, &[]).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let Some((name, queries)) = wire::decode_meta_context_request(&data) else {
                    reply(
                        w,
                        option,
                        REP_ERR_INVALID,
                        b"malformed metadata context request",
                    )
                    .await?;
                    continue;
                };
                if option == OPT_SET_META_CONTEXT && !agreed.structured {
                    reply(
                        w,
                        option,
                        REP_ERR_INVALID,
                        b"metadata contexts need structured replies (NBD_OPT_STRUCTURED_REPLY) first",
                    )
                    .await?;
                    continue;
                }
                let Some(export) = open_or_refuse(w, option, daemon, &name).await? else {
                    continue;
                };
                let matched = match_contexts(daemon, &export, queries).await;
                // The export opened to check the queries: let it go off
                // the event loop (a view's hold is released with an fsync).
                let _ = tokio::task::spawn_blocking(move || drop(export)).await;
                if option == OPT_SET_META_CONTEXT {
                    agreed.contexts.clear();
                    contexts_for = name;
                }
                for (i, (context_name, context)) in matched.into_iter().enumerate() {
                    let id = i as u32 + 1;
                    let mut body = id.to_be_bytes().to_vec();
                    body.extend_from_slice(context_name.as_bytes());
                    reply(w, option, REP_META_CONTEXT, &body).await?;
                    if option == OPT_SET_META_CONTEXT {
                        agreed.contexts.push((id, context));
                    }
                }
                reply(w, option, REP_ACK, &[]).await?;
            }
            OPT_ABORT => {
                reply(w, option, REP_ACK, &[]).await?;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(w, option, REP_ERR_INVALID, b"NBD_OPT_LIST carries no data").await?;
                    continue;
                }
                let registry = daemon.registry.clone();
                let names = tokio::task::spawn_blocking(move || registry.export_names())
                    .await
                    .unwrap_or_default();
                for name in names {
                    let mut body = Vec::with_capacity(4 + name.len());
                    body.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    body.extend_from_slice(name.as_bytes());
                    reply(w, option, REP_SERVER, &body).await?;
                }
                reply(w, option, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, requests)) = wire::decode_info_request(&data) else {
                    reply(
                        w,
                        option,
                        REP_ERR_INVALID,
                        b"malformed NBD_OPT_INFO/GO request",
                    )
                    .await?;
                    continue;
                };
                let Some(export) = open_or_refuse(w, option, daemon, &name).await? else {
                    continue;
                };
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&export.size().to_be_bytes());
                info.extend_from_slice(&transmission_flags(&export).to_be_bytes());
                reply(w, option, REP_INFO, &info).await?;
                if requests.contains(&INFO_NAME) {
                    let mut body = INFO_NAME.to_be_bytes().to_vec();
                    body.extend_from_slice(export.name.as_bytes());
                    reply(w, option, REP_INFO, &body).await?;
                }
                if requests.contains(&INFO_DESCRIPTION) {
                    let text = match export.seq() {
                        Some(seq) => format!("tidemark volume {} at seq {seq}", export.volume_name),
                        None => format!("tidemark volume {} (live)", export.volume_name),
                    };
                    let mut body = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    body.extend_from_slice(text.as_bytes());
                    reply(w, option, REP_INFO, &body).await?;
                }
                if requests.contains(&INFO_BLOCK_SIZE) {
                    let mut body = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    body.extend_from_slice(&1u32.to_be_bytes());
                    body.extend_from_slice(&4096u32.to_be_bytes());
                    body.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                    reply(w, option, REP_INFO, &body).await?;
                }
                reply(w, option, REP_ACK, &[]).await?;
                if option == OPT_GO {
                    if contexts_for != name {
                        agreed.contexts.clear();
                    }
                    return Ok(Some((export, agreed)));
                }
            }
            other => {
                let text = format!("option {other} is not supported");
                reply(w, other, REP_ERR_UNSUP, text.as_bytes()).await?;
            }
        }
    }
}
