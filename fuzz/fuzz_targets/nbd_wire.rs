//! Everything an NBD client can send, as the server decodes it: the
//! handshake's flags and options, `NBD_OPT_INFO`/`GO` data, and request
//! headers. Any input must decode to messages or an error, never a panic
//! or a hang. Run with `cargo fuzz run nbd_wire` (nightly).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark::nbd::wire;

fuzz_target!(|data: &[u8]| {
    let (messages, _) = wire::decode_session(data);
    for message in messages {
        if let wire::Message::Option(header, body) = message {
            assert_eq!(header.len as usize, body.len());
            let _ = wire::decode_info_request(&body);
        }
    }
    let _ = wire::decode_info_request(data);
});
