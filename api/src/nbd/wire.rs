//! Decoding what NBD clients send: the handshake's flags and options, and
//! the transmission phase's request headers. Pure functions over bytes, so
//! the server and the fuzz target (`fuzz/`) decode exactly alike; every
//! malformed input is an error value, never a panic.

use super::protocol::*;

/// A client broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);

/// Validates the client flags of the handshake; true if the client asked
/// for no zeroes after `NBD_OPT_EXPORT_NAME`.
pub fn decode_client_flags(flags: u32) -> Result<bool, WireError> {
    if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(WireError(format!("unknown client flags {flags:#x}")));
    }
    Ok(flags & CLIENT_NO_ZEROES != 0)
}

/// An option's header: `{ u64 IHAVEOPT | u32 option | u32 length }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option.
    pub option: u32,
    /// Bytes of data that follow.
    pub len: u32,
}

/// Decodes an option header (16 bytes, big-endian). Data longer than
/// [`MAX_OPTION`] is an error (the server answers `NBD_REP_ERR_TOO_BIG`
/// and closes, as it would otherwise have to read it).
pub fn decode_option_header(bytes: &[u8; 16]) -> Result<OptionHeader, WireError> {
    let magic = u64::from_be_bytes(array(&bytes[0..8]));
    if magic != IHAVEOPT {
        return Err(WireError(format!(
            "option magic {magic:#018x} is not IHAVEOPT"
        )));
    }
    let header = OptionHeader {
        option: u32::from_be_bytes(array(&bytes[8..12])),
        len: u32::from_be_bytes(array(&bytes[12..16])),
    };
    if header.len > MAX_OPTION {
        return Err(WireError(format!(
            "option {} carries {} bytes (at most {MAX_OPTION})",
            header.option, header.len
        )));
    }
    Ok(header)
}

/// Decodes the data of `NBD_OPT_INFO` / `NBD_OPT_GO`:
/// `{ u32 name length | name | u16 count | count × u16 }`.
pub fn decode_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = std::str::from_utf8(data.get(4..4usize.checked_add(name_len)?)?)
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

/// Decodes the data of `NBD_OPT_LIST_META_CONTEXT` and
/// `NBD_OPT_SET_META_CONTEXT`: `{ u32 name length | name | u32 count |
/// count × (u32 length | query) }`.
pub fn decode_meta_context_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let string = |at: usize| -> Option<(String, usize)> {
        let len = u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
        let end = at.checked_add(4)?.checked_add(len)?;
        let text = std::str::from_utf8(data.get(at + 4..end)?).ok()?;
        Some((text.to_string(), end))
    };
    let (name, mut at) = string(0)?;
    let count = u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
    at += 4;
    let mut queries = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let (query, next) = string(at)?;
        queries.push(query);
        at = next;
    }
    (at == data.len()).then_some((name, queries))
}

/// A transmission request's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`FUA`).
    pub flags: u16,
    /// The command.
    pub kind: u16,
    /// The client's handle, echoed in the reply.
    pub handle: u64,
    /// Where.
    pub offset: u64,
    /// How many bytes.
    pub length: u32,
}

impl RequestHeader {
    /// Bytes of payload that follow the header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

/// Decodes a request header (28 bytes, big-endian). A bad magic means
/// the stream is out of step: the server closes the connection.
pub fn decode_request(bytes: &[u8; 28]) -> Result<RequestHeader, WireError> {
    let magic = u32::from_be_bytes(array(&bytes[0..4]));
    if magic != REQUEST_MAGIC {
        return Err(WireError(format!("request magic {magic:#010x}")));
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes(array(&bytes[4..6])),
        kind: u16::from_be_bytes(array(&bytes[6..8])),
        handle: u64::from_be_bytes(array(&bytes[8..16])),
        offset: u64::from_be_bytes(array(&bytes[16..24])),
        length: u32::from_be_bytes(array(&bytes[24..28])),
    })
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

/// One thing a client said, as the server decodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The handshake's client flags.
    Flags {
        /// No zeroes after `NBD_OPT_EXPORT_NAME`.
        no_zeroes: bool,
    },
    /// An option and its data.
    Option(OptionHeader, Vec<u8>),
    /// A request (a write's payload skipped).
    Request(RequestHeader),
}

/// Decodes a whole client byte stream the way the server reads it —
/// flags, options until one enters transmission (`GO`, `EXPORT_NAME`) or
/// ends it (`ABORT`), then requests until `DISC` — stopping at the first
/// error or the end of the bytes. For tests and fuzzing.
pub fn decode_session(mut bytes: &[u8]) -> (Vec<Message>, Option<WireError>) {
    let mut out = Vec::new();
    let take = |n: usize, bytes: &mut &[u8]| -> Option<Vec<u8>> {
        let (head, rest) = (bytes.get(..n)?, bytes.get(n..)?);
        *bytes = rest;
        Some(head.to_vec())
    };
    let Some(flags) = take(4, &mut bytes) else {
        return (out, None);
    };
    match decode_client_flags(u32::from_be_bytes(array(&flags))) {
        Ok(no_zeroes) => out.push(Message::Flags { no_zeroes }),
        Err(e) => return (out, Some(e)),
    }
    loop {
        let Some(head) = take(16, &mut bytes) else {
            return (out, None);
        };
        let header = match decode_option_header(&array(&head)) {
            Ok(h) => h,
            Err(e) => return (out, Some(e)),
        };
        let Some(data) = take(header.len as usize, &mut bytes) else {
            return (out, None);
        };
        // Malformed info and meta context requests get an error reply;
        // the handshake goes on.
        if matches!(header.option, OPT_INFO | OPT_GO) {
            let _ = decode_info_request(&data);
        }
        if matches!(header.option, OPT_SET_META_CONTEXT | OPT_LIST_META_CONTEXT) {
            let _ = decode_meta_context_request(&data);
        }
        out.push(Message::Option(header, data));
        match header.option {
            OPT_ABORT => return (out, None),
            OPT_GO | OPT_EXPORT_NAME => break,
            _ => {}
        }
    }
    loop {
        let Some(head) = take(28, &mut bytes) else {
            return (out, None);
        };
        let request = match decode_request(&array(&head)) {
            Ok(r) => r,
            Err(e) => return (out, Some(e)),
        };
        out.push(Message::Request(request));
        if request.kind == CMD_DISC {
            return (out, None);
        }
        let skip = (request.payload_len() as usize).min(bytes.len());
        bytes = &bytes[skip..];
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn meta_context_requests_parse_and_malformed_ones_do_not() {
        let mut data = Vec::new();
        let string = |text: &str, data: &mut Vec<u8>| {
            data.extend_from_slice(&(text.len() as u32).to_be_bytes());
            data.extend_from_slice(text.as_bytes());
        };
        string("db@5", &mut data);
        data.extend_from_slice(&2u32.to_be_bytes());
        string("base:allocation", &mut data);
        string("tidemark:changed:3", &mut data);
        assert_eq!(
            decode_meta_context_request(&data),
            Some((
                "db@5".to_string(),
                vec!["base:allocation".into(), "tidemark:changed:3".into()]
            ))
        );
        assert_eq!(decode_meta_context_request(&data[..data.len() - 1]), None);
        let mut longer = data.clone();
        longer.push(0);
        assert_eq!(decode_meta_context_request(&longer), None);
        // A count far beyond the data is refused, not allocated.
        let mut huge = Vec::new();
        string("db", &mut huge);
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode_meta_context_request(&huge), None);
    }

    #[test]
    fn info_requests_parse_and_malformed_ones_do_not() {
        let mut data = 2u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"db");
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&INFO_NAME.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            decode_info_request(&data),
            Some(("db".to_string(), vec![INFO_NAME, INFO_BLOCK_SIZE]))
        );
        assert_eq!(decode_info_request(&data[..data.len() - 1]), None);
        assert_eq!(decode_info_request(&[0, 0, 0, 9, b'x']), None);
        assert_eq!(decode_info_request(&[0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(decode_info_request(&[]), None);
    }

    #[test]
    fn a_session_decodes_and_noise_is_an_error_not_a_panic() {
        let mut s = 3u32.to_be_bytes().to_vec();
        s.extend_from_slice(&IHAVEOPT.to_be_bytes());
        s.extend_from_slice(&OPT_GO.to_be_bytes());
        s.extend_from_slice(&8u32.to_be_bytes());
        s.extend_from_slice(&[0, 0, 0, 2, b'd', b'b', 0, 0]);
        for (kind, len) in [(CMD_WRITE, 3u32), (CMD_READ, 4096), (CMD_DISC, 0)] {
            s.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            s.extend_from_slice(&0u16.to_be_bytes());
            s.extend_from_slice(&kind.to_be_bytes());
            s.extend_from_slice(&7u64.to_be_bytes());
            s.extend_from_slice(&0u64.to_be_bytes());
            s.extend_from_slice(&len.to_be_bytes());
            if kind == CMD_WRITE {
                s.extend_from_slice(b"abc");
            }
        }
        let (messages, error) = decode_session(&s);
        assert_eq!(error, None);
        assert_eq!(messages.len(), 5);
        // Every prefix and every single-byte change decodes without a panic.
        for cut in 0..s.len() {
            let _ = decode_session(&s[..cut]);
            let mut bad = s.clone();
            bad[cut] ^= 0x5a;
            let _ = decode_session(&bad);
        }
    }
}
