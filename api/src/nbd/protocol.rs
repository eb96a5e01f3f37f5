//! Constants of the NBD protocol (fixed newstyle handshake, simple and
//! structured replies, metadata contexts), as in the protocol
//! specification (`doc/proto.md` of the NBD project).

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation, and the prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// The server does not send the 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// See `FLAG_NO_ZEROES`.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Ends negotiation.
pub const OPT_ABORT: u32 = 2;
/// Lists exports.
pub const OPT_LIST: u32 = 3;
/// Describes an export.
pub const OPT_INFO: u32 = 6;
/// Describes an export and enters transmission.
pub const OPT_GO: u32 = 7;
/// Asks for structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Lists metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Selects metadata contexts for `CMD_BLOCK_STATUS`.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option replies.
pub const REP_ACK: u32 = 1;
/// One export in a LIST answer.
pub const REP_SERVER: u32 = 2;
/// One piece of information in an INFO/GO answer.
pub const REP_INFO: u32 = 3;
/// One metadata context in a LIST/SET_META_CONTEXT answer.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// Option not supported.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// Malformed option.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// The server failed.
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// Option data too large.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// Information types.
pub const INFO_EXPORT: u16 = 0;
/// The export's name.
pub const INFO_NAME: u16 = 1;
/// Its description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Its block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Read-only export.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// FLUSH is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// FUA is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// TRIM is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// WRITE_ZEROES is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Several connections see one consistent export; a flush on one covers
/// writes completed on all.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim.
pub const CMD_TRIM: u16 = 4;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status of the selected metadata contexts.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: one extent per context is enough (BLOCK_STATUS).
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply flag: the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply chunk: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured reply chunk: extents of one metadata context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured reply chunk: an error with a message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// The one standard metadata context: what is allocated.
pub const CONTEXT_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag: the extent is a hole (reads as zeroes, uses no
/// storage).
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// tidemark's own context namespace: `tidemark:changed:POINT` reports
/// the blocks changed between POINT and the export's own point.
pub const CONTEXT_CHANGED_PREFIX: &str = "tidemark:changed:";
/// `tidemark:changed:` flag: the extent changed.
pub const STATE_CHANGED: u32 = 1 << 0;

/// Errors.
pub const EPERM: u32 = 1;
/// I/O error.
pub const EIO: u32 = 5;
/// Out of memory.
pub const ENOMEM: u32 = 12;
/// Invalid request.
pub const EINVAL: u32 = 22;
/// No space (a write beyond the end).
pub const ENOSPC: u32 = 28;
/// Request too large.
pub const EOVERFLOW: u32 = 75;
/// Not supported.
pub const ENOTSUP: u32 = 95;
/// Server shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Largest READ or WRITE payload accepted (and advertised as the maximum
/// block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload accepted during the handshake.
pub const MAX_OPTION: u32 = 64 << 10;
