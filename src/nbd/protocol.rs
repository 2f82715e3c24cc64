//! NBD wire format: constants and the encoding of every message the server sends or
//! parses, byte by byte. All integers are big-endian (network order).
//!
//! Reference: the NBD protocol specification, `doc/proto.md` in the
//! NetworkBlockDevice/nbd repository (fixed newstyle negotiation, the INFO extension,
//! simple and structured replies, metadata contexts and block status).
//!
//! Must never: do I/O or keep state. Callers read exactly the sizes given here and
//! hand the bytes to the decoders, which only look at those bytes.

use bytes::{BufMut, Bytes, BytesMut};

/// `NBDMAGIC`, first 8 bytes the server sends.
pub(crate) const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: follows `NBDMAGIC` in the greeting and starts every client option.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Starts every option reply.
pub(crate) const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Starts every transmission request.
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Starts every simple reply.
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Starts every structured reply chunk.
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server → client, 16 bits).
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;

// Client flags (client → server, 32 bits).
pub(crate) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags (16 bits, per export).
pub(crate) const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub(crate) const FLAG_READ_ONLY: u16 = 1 << 1;
pub(crate) const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub(crate) const FLAG_SEND_FUA: u16 = 1 << 3;
pub(crate) const FLAG_SEND_TRIM: u16 = 1 << 5;
pub(crate) const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_FLAG_SEND_DF`: reads honour "don't fragment"; only with structured replies.
pub(crate) const FLAG_SEND_DF: u16 = 1 << 7;
pub(crate) const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Options.
pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_LIST: u32 = 3;
pub(crate) const OPT_STARTTLS: u32 = 5;
pub(crate) const OPT_INFO: u32 = 6;
pub(crate) const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(crate) const OPT_LIST_META_CONTEXT: u32 = 9;
pub(crate) const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types. Errors have bit 31 set.
pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_SERVER: u32 = 2;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_META_CONTEXT: u32 = 4;
pub(crate) const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub(crate) const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub(crate) const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub(crate) const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub(crate) const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Information types inside `NBD_REP_INFO`.
pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_NAME: u16 = 1;
pub(crate) const INFO_DESCRIPTION: u16 = 2;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_WRITE: u16 = 1;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_FLUSH: u16 = 3;
pub(crate) const CMD_TRIM: u16 = 4;
pub(crate) const CMD_WRITE_ZEROES: u16 = 6;
pub(crate) const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub(crate) const CMD_FLAG_FUA: u16 = 1 << 0;
pub(crate) const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// "Don't fragment": at most one content chunk in a structured read reply.
pub(crate) const CMD_FLAG_DF: u16 = 1 << 2;
/// One extent per metadata context in a block status reply.
pub(crate) const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

// Structured reply chunk flags and types.
pub(crate) const REPLY_FLAG_DONE: u16 = 1 << 0;
pub(crate) const REPLY_TYPE_NONE: u16 = 0;
pub(crate) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(crate) const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub(crate) const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub(crate) const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// Status flags of `base:allocation` extents.
pub(crate) const STATE_HOLE: u32 = 1 << 0;
pub(crate) const STATE_ZERO: u32 = 1 << 1;
/// Status flag of `qemu:dirty-bitmap:*` extents: written in the bitmap's interval.
pub(crate) const STATE_DIRTY: u32 = 1 << 0;

// Error values of simple replies (the spec's fixed subset of Linux errno values).
pub(crate) const EPERM: u32 = 1;
pub(crate) const EIO: u32 = 5;
pub(crate) const EINVAL: u32 = 22;
pub(crate) const ENOSPC: u32 = 28;
pub(crate) const EOVERFLOW: u32 = 75;

/// Largest READ or WRITE payload accepted: 32 MiB, the size the spec says no client
/// should exceed and no server should treat as abusive.
pub(crate) const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload accepted during the handshake. The longest legal option is
/// an `NBD_OPT_GO` with a 4096-byte name and a handful of info requests; 64 KiB is
/// generous and bounds what a hostile client can make us buffer.
pub(crate) const MAX_OPTION_LEN: u32 = 64 << 10;
/// Most bytes a client may send in option headers and data over the whole negotiation
/// (before and after STARTTLS together): room for hundreds of the largest legal options,
/// so only a client looping on options without ever choosing an export reaches it.
pub(crate) const MAX_NEGOTIATION_BYTES: u64 = 1 << 20;
/// Longest export name (the spec's hard limit for strings).
pub(crate) const MAX_NAME_LEN: usize = 4096;
/// Preferred block size advertised: the page size, where files and devices do their
/// best work; never below the minimum (the device's logical block size).
pub(crate) const PREFERRED_BLOCK_SIZE: u32 = 4096;

/// Length of the server greeting.
pub(crate) const GREETING_LEN: usize = 18;
/// Length of an option header.
pub(crate) const OPTION_HEADER_LEN: usize = 16;
/// Length of a request header.
pub(crate) const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub(crate) const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub(crate) const CHUNK_HEADER_LEN: usize = 20;
/// Most descriptors in one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk. The spec allows up to
/// 2^20; a client asks again from where a shorter answer ended, so a smaller bound only
/// costs a round trip per 8192 extents while it bounds what one request makes us hold
/// (4 + 8 × 8192 bytes per context).
pub(crate) const MAX_STATUS_EXTENTS: usize = 8192;
/// Longest message in an error chunk; ours are short fixed sentences.
const MAX_ERROR_MESSAGE: usize = 256;

/// The server greeting of fixed newstyle negotiation (18 bytes):
///
/// | bytes | field |
/// |---|---|
/// | 0..8 | `NBDMAGIC` |
/// | 8..16 | `IHAVEOPT` |
/// | 16..18 | handshake flags: `FIXED_NEWSTYLE` \| `NO_ZEROES` |
///
/// The client answers with 4 bytes of client flags.
pub(crate) fn greeting() -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// An option header sent by the client (16 bytes), followed by `length` bytes of data:
///
/// | bytes | field |
/// |---|---|
/// | 0..8 | magic `IHAVEOPT` |
/// | 8..12 | option code |
/// | 12..16 | length of the option data |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OptionHeader {
    pub(crate) magic: u64,
    pub(crate) option: u32,
    pub(crate) length: u32,
}

impl OptionHeader {
    pub(crate) fn decode(b: &[u8; OPTION_HEADER_LEN]) -> Self {
        Self {
            magic: u64::from_be_bytes(be(&b[0..8])),
            option: u32::from_be_bytes(be(&b[8..12])),
            length: u32::from_be_bytes(be(&b[12..16])),
        }
    }
}

/// An option reply (20-byte header, then `data`):
///
/// | bytes | field |
/// |---|---|
/// | 0..8 | magic `0x0003e889045565a9` |
/// | 8..12 | the option being answered |
/// | 12..16 | reply type (`NBD_REP_*`) |
/// | 16..20 | length of `data` |
/// | 20.. | `data` |
pub(crate) fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(20 + data.len());
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply_type);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
    out.freeze()
}

/// Data of an `NBD_REP_SERVER` reply to `NBD_OPT_LIST`:
///
/// | bytes | field |
/// |---|---|
/// | 0..4 | length N of the name |
/// | 4..4+N | export name (UTF-8) |
/// | 4+N.. | description, for humans (UTF-8, may be empty) |
pub(crate) fn rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len() + description.len());
    out.put_u32(name.len() as u32);
    out.put_slice(name.as_bytes());
    out.put_slice(description.as_bytes());
    out
}

/// Data of `NBD_REP_INFO` / `NBD_INFO_EXPORT` (12 bytes):
///
/// | bytes | field |
/// |---|---|
/// | 0..2 | `NBD_INFO_EXPORT` (0) |
/// | 2..10 | export size in bytes |
/// | 10..12 | transmission flags |
pub(crate) fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.put_u16(INFO_EXPORT);
    out.put_u64(size);
    out.put_u16(flags);
    out
}

/// Data of `NBD_REP_INFO` / `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION` (2 + N bytes):
///
/// | bytes | field |
/// |---|---|
/// | 0..2 | `NBD_INFO_NAME` (1) or `NBD_INFO_DESCRIPTION` (2) |
/// | 2.. | the string (UTF-8, no terminator) |
pub(crate) fn info_string(info_type: u16, s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + s.len());
    out.put_u16(info_type);
    out.put_slice(s.as_bytes());
    out
}

/// Data of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE` (14 bytes):
///
/// | bytes | field |
/// |---|---|
/// | 0..2 | `NBD_INFO_BLOCK_SIZE` (3) |
/// | 2..6 | minimum block size (power of 2, ≤ 64 KiB) |
/// | 6..10 | preferred block size (power of 2, ≥ max(minimum, 512)) |
/// | 10..14 | maximum payload size (≥ preferred) |
pub(crate) fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    out.put_u16(INFO_BLOCK_SIZE);
    out.put_u32(minimum);
    out.put_u32(preferred);
    out.put_u32(maximum);
    out
}

/// The reply to `NBD_OPT_EXPORT_NAME` (10 bytes, or 134 without `NO_ZEROES`):
///
/// | bytes | field |
/// |---|---|
/// | 0..8 | export size in bytes |
/// | 8..10 | transmission flags |
/// | 10..134 | zeroes, only if the client did not set `NBD_FLAG_C_NO_ZEROES` |
pub(crate) fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.put_u64(size);
    out.put_u16(flags);
    if !no_zeroes {
        out.put_bytes(0, 124);
    }
    out
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`:
///
/// | bytes | field |
/// |---|---|
/// | 0..4 | length N of the export name |
/// | 4..4+N | export name (UTF-8; empty = the default export) |
/// | 4+N..6+N | number K of information requests |
/// | 6+N..6+N+2K | K information types (`NBD_INFO_*`), 2 bytes each |
///
/// The option length must be exactly `6 + N + 2K`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct InfoRequest {
    pub(crate) name: String,
    pub(crate) requests: Vec<u16>,
}

impl InfoRequest {
    /// Parses the option data; `Err` names what is malformed.
    pub(crate) fn decode(data: &[u8]) -> Result<Self, &'static str> {
        if data.len() < 6 {
            return Err("shorter than the 6 bytes of name length and request count");
        }
        let name_len = u32::from_be_bytes(be(&data[0..4])) as usize;
        if name_len > MAX_NAME_LEN {
            return Err("export name longer than 4096 bytes");
        }
        if name_len > data.len() - 6 {
            return Err("export name length runs past the option data");
        }
        let name =
            std::str::from_utf8(&data[4..4 + name_len]).map_err(|_| "export name is not UTF-8")?;
        if name.contains('\0') {
            return Err("export name contains NUL");
        }
        let rest = &data[4 + name_len..];
        let count = u16::from_be_bytes(be(&rest[0..2])) as usize;
        let list = &rest[2..];
        if list.len() != count * 2 {
            return Err("information request count does not match the option length");
        }
        let requests = list
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes(be(c)))
            .collect();
        Ok(Self {
            name: name.to_owned(),
            requests,
        })
    }
}

/// A transmission request header (28 bytes), followed by `length` bytes of payload
/// for `NBD_CMD_WRITE` only:
///
/// | bytes | field |
/// |---|---|
/// | 0..4 | magic `0x25609513` |
/// | 4..6 | command flags (`NBD_CMD_FLAG_*`) |
/// | 6..8 | command type (`NBD_CMD_*`) |
/// | 8..16 | handle, echoed in the reply |
/// | 16..24 | offset in bytes |
/// | 24..28 | length in bytes |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) magic: u32,
    pub(crate) flags: u16,
    pub(crate) command: u16,
    pub(crate) handle: u64,
    pub(crate) offset: u64,
    pub(crate) length: u32,
}

impl Request {
    pub(crate) fn decode(b: &[u8; REQUEST_LEN]) -> Self {
        Self {
            magic: u32::from_be_bytes(be(&b[0..4])),
            flags: u16::from_be_bytes(be(&b[4..6])),
            command: u16::from_be_bytes(be(&b[6..8])),
            handle: u64::from_be_bytes(be(&b[8..16])),
            offset: u64::from_be_bytes(be(&b[16..24])),
            length: u32::from_be_bytes(be(&b[24..28])),
        }
    }

    #[cfg(test)]
    pub(crate) fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[0..4].copy_from_slice(&self.magic.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.handle.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// A simple reply header (16 bytes), followed by the data of a successful READ:
///
/// | bytes | field |
/// |---|---|
/// | 0..4 | magic `0x67446698` |
/// | 4..8 | error (0 = success, else one of the `E*` values above) |
/// | 8..16 | handle of the request |
pub(crate) fn simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out
}

/// The header of a structured reply chunk (20 bytes), followed by `length` payload bytes:
///
/// | bytes | field |
/// |---|---|
/// | 0..4 | magic `0x668e33ef` |
/// | 4..6 | flags (`NBD_REPLY_FLAG_DONE` on the last chunk of a reply) |
/// | 6..8 | chunk type (`NBD_REPLY_TYPE_*`) |
/// | 8..16 | handle of the request |
/// | 16..20 | length of the payload |
pub(crate) fn chunk_header(
    flags: u16,
    chunk_type: u16,
    handle: u64,
    length: u32,
) -> [u8; CHUNK_HEADER_LEN] {
    let mut out = [0u8; CHUNK_HEADER_LEN];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&chunk_type.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out
}

/// An `NBD_REPLY_TYPE_OFFSET_DATA` chunk's header and offset (28 bytes); the `data_len`
/// bytes of data follow:
///
/// | bytes | field |
/// |---|---|
/// | 0..20 | chunk header, length `8 + data_len` |
/// | 20..28 | offset of the data in the export |
pub(crate) fn offset_data_header(
    flags: u16,
    handle: u64,
    offset: u64,
    data_len: u32,
) -> [u8; CHUNK_HEADER_LEN + 8] {
    let mut out = [0u8; CHUNK_HEADER_LEN + 8];
    out[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        flags,
        REPLY_TYPE_OFFSET_DATA,
        handle,
        8 + data_len,
    ));
    out[CHUNK_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    out
}

/// An `NBD_REPLY_TYPE_OFFSET_HOLE` chunk (32 bytes): `len` bytes at `offset` read as zeroes.
///
/// | bytes | field |
/// |---|---|
/// | 0..20 | chunk header, length 12 |
/// | 20..28 | offset of the hole in the export |
/// | 28..32 | hole size (nonzero) |
pub(crate) fn offset_hole(
    flags: u16,
    handle: u64,
    offset: u64,
    len: u32,
) -> [u8; CHUNK_HEADER_LEN + 12] {
    let mut out = [0u8; CHUNK_HEADER_LEN + 12];
    out[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        flags,
        REPLY_TYPE_OFFSET_HOLE,
        handle,
        12,
    ));
    out[20..28].copy_from_slice(&offset.to_be_bytes());
    out[28..32].copy_from_slice(&len.to_be_bytes());
    out
}

/// An `NBD_REPLY_TYPE_ERROR` chunk, always the last of its reply (26 + N bytes):
///
/// | bytes | field |
/// |---|---|
/// | 0..20 | chunk header, flags `DONE`, length `6 + N` |
/// | 20..24 | error (nonzero, one of the `E*` values) |
/// | 24..26 | length N of the message |
/// | 26.. | message for a human (UTF-8; cut to 256 bytes) |
pub(crate) fn error_chunk(handle: u64, error: u32, message: &str) -> Vec<u8> {
    let mut end = message.len().min(MAX_ERROR_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let message = &message.as_bytes()[..end];
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + 6 + message.len());
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        6 + message.len() as u32,
    ));
    out.put_u32(error);
    out.put_u16(message.len() as u16);
    out.put_slice(message);
    out
}

/// An `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (20 + 4 + 8n bytes):
///
/// | bytes | field |
/// |---|---|
/// | 0..20 | chunk header, length `4 + 8n` |
/// | 20..24 | metadata context ID |
/// | then n times | extent length (u32, nonzero), status flags (u32) |
///
/// `descriptors` must not be empty (the spec requires at least one).
pub(crate) fn block_status_chunk(
    flags: u16,
    handle: u64,
    context_id: u32,
    descriptors: &[(u32, u32)],
) -> Vec<u8> {
    let payload = 4 + 8 * descriptors.len();
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + payload);
    out.extend_from_slice(&chunk_header(
        flags,
        REPLY_TYPE_BLOCK_STATUS,
        handle,
        payload as u32,
    ));
    out.put_u32(context_id);
    for &(len, status) in descriptors {
        out.put_u32(len);
        out.put_u32(status);
    }
    out
}

/// Data of an `NBD_REP_META_CONTEXT` reply (4 + N bytes):
///
/// | bytes | field |
/// |---|---|
/// | 0..4 | metadata context ID (0 in replies to `NBD_OPT_LIST_META_CONTEXT`) |
/// | 4.. | context name (UTF-8, no terminator) |
pub(crate) fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.put_u32(id);
    out.put_slice(name.as_bytes());
    out
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`:
///
/// | bytes | field |
/// |---|---|
/// | 0..4 | length N of the export name |
/// | 4..4+N | export name (UTF-8; empty = the default export) |
/// | 4+N..8+N | number Q of queries |
/// | then Q times | length L of the query (u32), the query (UTF-8, `namespace:rest`) |
///
/// The option length must be exactly what the fields add up to; every string is at most
/// 4096 bytes with no NUL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MetaContextRequest {
    pub(crate) name: String,
    pub(crate) queries: Vec<String>,
}

impl MetaContextRequest {
    /// Parses the option data; `Err` names what is malformed.
    pub(crate) fn decode(data: &[u8]) -> Result<Self, &'static str> {
        let mut rest = data;
        let name = take_string(&mut rest, "export name")?;
        if rest.len() < 4 {
            return Err("the query count runs past the option data");
        }
        let count = u32::from_be_bytes(be(&rest[0..4]));
        rest = &rest[4..];
        // Each query takes at least its 4-byte length: a count the data cannot hold is
        // refused before anything is allocated for it.
        if u64::from(count) * 4 > rest.len() as u64 {
            return Err("the query count does not fit in the option data");
        }
        let mut queries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            queries.push(take_string(&mut rest, "query")?);
        }
        if !rest.is_empty() {
            return Err("bytes left over after the last query");
        }
        Ok(Self { name, queries })
    }
}

/// Takes one length-prefixed string off the front of `rest`.
fn take_string(rest: &mut &[u8], what: &'static str) -> Result<String, &'static str> {
    if rest.len() < 4 {
        return Err(match what {
            "export name" => "shorter than the 4 bytes of the export name length",
            _ => "a query length runs past the option data",
        });
    }
    let len = u32::from_be_bytes(be(&rest[0..4])) as usize;
    if len > MAX_NAME_LEN {
        return Err(match what {
            "export name" => "export name longer than 4096 bytes",
            _ => "query longer than 4096 bytes",
        });
    }
    if len > rest.len() - 4 {
        return Err(match what {
            "export name" => "export name length runs past the option data",
            _ => "a query length runs past the option data",
        });
    }
    let s = std::str::from_utf8(&rest[4..4 + len]).map_err(|_| match what {
        "export name" => "export name is not UTF-8",
        _ => "a query is not UTF-8",
    })?;
    if s.contains('\0') {
        return Err(match what {
            "export name" => "export name contains NUL",
            _ => "a query contains NUL",
        });
    }
    *rest = &rest[4 + len..];
    Ok(s.to_owned())
}

/// Copies a slice whose length the caller fixed into an array for `from_be_bytes`.
/// Every call site slices a fixed-size buffer with constant bounds, so the lengths match.
fn be<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[..N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_flags() {
        let g = greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0, 3]);
    }

    #[test]
    fn request_round_trips() {
        let r = Request {
            magic: REQUEST_MAGIC,
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        let bytes = r.encode();
        assert_eq!(&bytes[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::decode(&bytes), r);
    }

    #[test]
    fn info_request_parses_and_rejects_inconsistent_lengths() {
        let mut data = Vec::new();
        data.put_u32(3);
        data.put_slice(b"abc");
        data.put_u16(2);
        data.put_u16(INFO_BLOCK_SIZE);
        data.put_u16(INFO_NAME);
        let parsed = InfoRequest::decode(&data).unwrap();
        assert_eq!(parsed.name, "abc");
        assert_eq!(parsed.requests, vec![INFO_BLOCK_SIZE, INFO_NAME]);

        assert!(InfoRequest::decode(&data[..data.len() - 1]).is_err());
        let mut long_name = data.clone();
        long_name[0..4].copy_from_slice(&100u32.to_be_bytes());
        assert!(InfoRequest::decode(&long_name).is_err());
        let mut bad_utf8 = data.clone();
        bad_utf8[4] = 0xff;
        assert!(InfoRequest::decode(&bad_utf8).is_err());
        assert!(InfoRequest::decode(&[0, 0, 0]).is_err());
    }

    #[test]
    fn replies_have_documented_sizes() {
        assert_eq!(option_reply(OPT_GO, REP_ACK, &[]).len(), 20);
        assert_eq!(info_export(1, 1).len(), 12);
        assert_eq!(info_block_size(512, 4096, MAX_PAYLOAD).len(), 14);
        assert_eq!(export_name_reply(1, 1, true).len(), 10);
        assert_eq!(export_name_reply(1, 1, false).len(), 134);
        assert_eq!(simple_reply(EIO, 9)[4..8], [0, 0, 0, 5]);
        assert_eq!(
            chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, 0).len(),
            20
        );
        assert_eq!(offset_hole(0, 1, 512, 512).len(), 32);
        assert_eq!(offset_data_header(0, 1, 0, 512)[16..20], [0, 0, 2, 8]);
        let err = error_chunk(3, EINVAL, "bad");
        assert_eq!(err.len(), 20 + 6 + 3);
        assert_eq!(&err[4..8], &[0, 1, 0x80, 1], "DONE, NBD_REPLY_TYPE_ERROR");
        assert_eq!(error_chunk(3, EIO, &"é".repeat(300)).len(), 20 + 6 + 256);
        let bs = block_status_chunk(REPLY_FLAG_DONE, 4, 1, &[(512, 3), (1024, 0)]);
        assert_eq!(bs.len(), 20 + 4 + 16);
        assert_eq!(&bs[16..20], &[0, 0, 0, 20]);
    }

    fn meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut data = Vec::new();
        data.put_u32(name.len() as u32);
        data.put_slice(name.as_bytes());
        data.put_u32(queries.len() as u32);
        for q in queries {
            data.put_u32(q.len() as u32);
            data.put_slice(q.as_bytes());
        }
        data
    }

    #[test]
    fn meta_context_requests_parse_and_reject_inconsistent_lengths() {
        let data = meta_request("disk", &["base:allocation", "qemu:"]);
        let parsed = MetaContextRequest::decode(&data).unwrap();
        assert_eq!(parsed.name, "disk");
        assert_eq!(parsed.queries, vec!["base:allocation", "qemu:"]);
        assert!(MetaContextRequest::decode(&meta_request("", &[])).is_ok());

        assert!(MetaContextRequest::decode(&data[..data.len() - 1]).is_err());
        let mut extra = data.clone();
        extra.push(0);
        assert!(MetaContextRequest::decode(&extra).is_err());
        let mut huge_count = meta_request("disk", &[]);
        let at = huge_count.len() - 4;
        huge_count[at..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(MetaContextRequest::decode(&huge_count).is_err());
        let long = "x".repeat(MAX_NAME_LEN + 1);
        assert!(MetaContextRequest::decode(&meta_request(&long, &[])).is_err());
        assert!(MetaContextRequest::decode(&meta_request("d", &[&long])).is_err());
        assert!(MetaContextRequest::decode(&meta_request("d", &["a\0b"])).is_err());
        assert!(MetaContextRequest::decode(&[0, 0]).is_err());
    }
}
