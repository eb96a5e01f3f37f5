//! Option negotiation (fixed newstyle).

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::protocol::*;
use crate::daemon::error::ApiError;
use crate::daemon::exports::Export;
use crate::daemon::Daemon;

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

/// Negotiates until the client picks an export (`Some`) or leaves (`None`).
pub async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    daemon: &Arc<Daemon>,
) -> Result<Option<Arc<Export>>, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    w.write_u64(NBDMAGIC).await?;
    w.write_u64(IHAVEOPT).await?;
    w.write_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).await?;
    w.flush().await?;
    let client_flags = r.read_u32().await?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(HandshakeError::Malformed(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    loop {
        let magic = r.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(HandshakeError::Malformed(format!(
                "option magic {magic:#018x} is not IHAVEOPT"
            )));
        }
        let option = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > MAX_OPTION {
            reply(w, option, REP_ERR_TOO_BIG, b"option data too large").await?;
            return Err(HandshakeError::Malformed(format!(
                "option {option} carries {len} bytes (at most {MAX_OPTION})"
            )));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let export =
                    open(daemon, name.clone())
                        .await
                        .map_err(|e| HandshakeError::Refused {
                            name,
                            reason: e.to_string(),
                        })?;
                w.write_u64(export.size()).await?;
                w.write_u16(transmission_flags(&export)).await?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124]).await?;
                }
                w.flush().await?;
                return Ok(Some(export));
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
                let Some((name, requests)) = parse_info_request(&data) else {
                    reply(
                        w,
                        option,
                        REP_ERR_INVALID,
                        b"malformed NBD_OPT_INFO/GO request",
                    )
                    .await?;
                    continue;
                };
                let export = match open(daemon, name.clone()).await {
                    Ok(export) => export,
                    Err(e) => {
                        let kind = match e {
                            ApiError::Failed(_) => REP_ERR_PLATFORM,
                            _ => REP_ERR_UNKNOWN,
                        };
                        reply(w, option, kind, e.to_string().as_bytes()).await?;
                        continue;
                    }
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
                        Some(seq) => format!("tidemark volume {} at seq {seq}", export.volume.name),
                        None => format!("tidemark volume {} (live)", export.volume.name),
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
                    return Ok(Some(export));
                }
            }
            other => {
                let text = format!("option {other} is not supported");
                reply(w, other, REP_ERR_UNSUP, text.as_bytes()).await?;
            }
        }
    }
}

/// `{ u32 name length | name | u16 count | count × u16 }`.
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = std::str::from_utf8(data.get(4..4 + name_len)?)
        .ok()?
        .to_string();
    let rest = data.get(4 + name_len..)?;
    let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let list = rest.get(2..)?;
    if list.len() != count * 2 {
        return None;
    }
    let requests = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((name, requests))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn info_requests_parse_and_malformed_ones_do_not() {
        let mut data = 2u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"db");
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&INFO_NAME.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&data),
            Some(("db".to_string(), vec![INFO_NAME, INFO_BLOCK_SIZE]))
        );
        assert_eq!(parse_info_request(&data[..data.len() - 1]), None);
        assert_eq!(parse_info_request(&[0, 0, 0, 9, b'x']), None);
        assert_eq!(parse_info_request(&[]), None);
    }
}
