//! Fixed newstyle negotiation: greets the client, answers its options and picks the
//! export the connection will serve.
//!
//! Supported options: `NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`, `NBD_OPT_LIST`,
//! `NBD_OPT_INFO` and `NBD_OPT_GO` (with `NBD_INFO_EXPORT`, `NBD_INFO_BLOCK_SIZE`,
//! `NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`), `NBD_OPT_STRUCTURED_REPLY`,
//! `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT` (only after structured
//! replies, as the spec asks; contexts of `meta.rs`), and `NBD_OPT_STARTTLS` when TLS is
//! on: the negotiation then ends with [`Outcome::StartTls`], the caller wraps the
//! connection in TLS and calls [`options`] again on the encrypted stream, which forgets
//! structured replies and contexts negotiated before. Everything else (extended headers,
//! …) gets `NBD_REP_ERR_UNSUP`.
//!
//! The contexts a connection uses in transmission are those of its last
//! `NBD_OPT_SET_META_CONTEXT`, and only if that named the export it then chose.
//!
//! With `--tls require` ("forced TLS" in the spec) every option before STARTTLS other
//! than `NBD_OPT_ABORT` gets `NBD_REP_ERR_TLS_REQD` (`NBD_OPT_EXPORT_NAME`, which cannot
//! carry an error, closes the connection), so a plaintext client learns nothing, not
//! even the export names.
//!
//! Must never: buffer an option longer than `MAX_OPTION_LEN` (the connection is closed
//! instead) or more than `MAX_NEGOTIATION_BYTES` of options in all; send fixed-newstyle
//! replies to a client that did not ask for fixed newstyle; enter transmission with an
//! export the client did not name, or over plaintext when TLS is required.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::meta::{self, Selected};
use super::protocol::*;
use super::{Export, NbdServer};

/// What transmission serves: the export, and what the client negotiated for it.
pub(crate) struct Session {
    pub(crate) export: Arc<Export>,
    /// Replies are structured (`NBD_OPT_STRUCTURED_REPLY` was acknowledged).
    pub(crate) structured: bool,
    /// The metadata contexts block status reports (empty: block status is refused).
    pub(crate) contexts: Vec<Selected>,
}

/// How negotiation ended without an error.
pub(crate) enum Outcome {
    /// The client chose an export; transmission starts.
    Transmission(Session),
    /// The client sent `NBD_OPT_ABORT`; the connection ends.
    Aborted,
    /// The server acknowledged `NBD_OPT_STARTTLS`: the next bytes are a TLS handshake,
    /// after which negotiation goes on ([`options`] with `Tls::Active`).
    StartTls,
}

/// Where the connection stands with TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tls {
    /// The server does not offer TLS.
    Unavailable,
    /// Offered; the client may stay in plaintext.
    Offered,
    /// Required and not yet negotiated: only STARTTLS and ABORT are served.
    Required,
    /// The connection is encrypted.
    Active,
}

/// What the negotiation has learned so far; survives the switch to TLS.
pub(crate) struct Negotiation {
    fixed: bool,
    no_zeroes: bool,
    pub(crate) tls: Tls,
    /// Option bytes the client may still send (`MAX_NEGOTIATION_BYTES` in all).
    budget: u64,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged (since the last STARTTLS).
    structured: bool,
    /// The last `NBD_OPT_SET_META_CONTEXT`: the export's canonical name and the contexts it
    /// selected; `None` after one that failed.
    meta: Option<(String, Vec<Selected>)>,
}

impl Negotiation {
    /// What transmission on `export` gets from this negotiation.
    fn session(&self, export: &Arc<Export>) -> Session {
        let contexts = match &self.meta {
            Some((name, selected)) if *name == export.name => selected.clone(),
            _ => Vec::new(),
        };
        Session {
            export: Arc::clone(export),
            structured: self.structured,
            contexts,
        }
    }
}

/// Every way negotiation fails; each closes the connection (and only it).
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// Reading from or writing to the client failed (including the client hanging up).
    #[error("connection failed during the handshake: {0}")]
    Io(#[source] io::Error),
    /// The client set flags the server did not offer; the spec requires a disconnect.
    #[error("client flags {flags:#x} include bits this server does not know")]
    UnknownClientFlags { flags: u32 },
    /// An option did not start with `IHAVEOPT`: the client is not speaking NBD.
    #[error("option header has magic {magic:#018x} instead of IHAVEOPT")]
    BadOptionMagic { magic: u64 },
    /// An option claims more data than the server is willing to buffer.
    #[error(
        "option {option} claims {length} bytes of data, more than the {MAX_OPTION_LEN}-byte limit"
    )]
    OptionTooLong { option: u32, length: u32 },
    /// A client that did not negotiate fixed newstyle sent an option other than
    /// `NBD_OPT_EXPORT_NAME`; it could not parse an error reply.
    #[error(
        "client without fixed newstyle sent option {option}; only NBD_OPT_EXPORT_NAME is allowed"
    )]
    NotFixedNewstyle { option: u32 },
    /// `NBD_OPT_EXPORT_NAME` cannot report errors, so a bad name ends the session.
    #[error("NBD_OPT_EXPORT_NAME carries an invalid export name: {reason}")]
    BadExportName { reason: &'static str },
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist.
    #[error("NBD_OPT_EXPORT_NAME asked for unknown export {name:?}")]
    UnknownExport { name: String },
    /// A plaintext client chose an export with `NBD_OPT_EXPORT_NAME` while TLS is
    /// required; that option cannot carry an error, so the connection is closed.
    #[error("plaintext NBD_OPT_EXPORT_NAME refused: this server requires TLS (NBD_OPT_STARTTLS)")]
    TlsRequired,
    /// The client kept negotiating past the byte bound without choosing an export.
    #[error("the client sent more than {MAX_NEGOTIATION_BYTES} bytes of options without choosing an export")]
    TooMuchNegotiation,
    /// The TLS handshake after `NBD_OPT_STARTTLS` failed (no common cipher, no or an
    /// untrusted client certificate, a client that sent too much, …).
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] io::Error),
    /// The client sent bytes after `NBD_OPT_STARTTLS` before reading the reply: they
    /// would be plaintext injected into the encrypted session (CVE-2021-3716 in nbdkit).
    #[error("the client sent data after NBD_OPT_STARTTLS before the server's reply")]
    DataAfterStartTls,
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// Greets a fresh connection and reads the client's flags.
pub(crate) async fn greet<R, W>(
    reader: &mut R,
    writer: &mut W,
    tls: Tls,
) -> Result<Negotiation, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer.write_all(&greeting()).await?;
    writer.flush().await?;

    let client_flags = reader.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::UnknownClientFlags {
            flags: client_flags,
        });
    }
    Ok(Negotiation {
        fixed: client_flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        tls,
        budget: MAX_NEGOTIATION_BYTES,
        structured: false,
        meta: None,
    })
}

/// Answers options until the client chooses an export, aborts, or (over plaintext, TLS
/// offered) asks for STARTTLS. `peer` is only used for logging.
pub(crate) async fn options<R, W>(
    reader: &mut R,
    writer: &mut W,
    server: &NbdServer,
    peer: &str,
    state: &mut Negotiation,
) -> Result<Outcome, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let fixed = state.fixed;
    let no_zeroes = state.no_zeroes;
    loop {
        let mut raw = [0u8; OPTION_HEADER_LEN];
        reader.read_exact(&mut raw).await?;
        let header = OptionHeader::decode(&raw);
        if header.magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic {
                magic: header.magic,
            });
        }
        let option = header.option;
        if header.length > MAX_OPTION_LEN {
            if fixed && option != OPT_EXPORT_NAME {
                // Tell the client why before hanging up; it may not read it, which is fine.
                let _ = send(
                    writer,
                    option,
                    REP_ERR_TOO_BIG,
                    b"option data too long for this server",
                )
                .await;
            }
            return Err(HandshakeError::OptionTooLong {
                option,
                length: header.length,
            });
        }
        let cost = OPTION_HEADER_LEN as u64 + u64::from(header.length);
        state.budget = state
            .budget
            .checked_sub(cost)
            .ok_or(HandshakeError::TooMuchNegotiation)?;
        let mut data = vec![0u8; header.length as usize];
        reader.read_exact(&mut data).await?;
        if !fixed && option != OPT_EXPORT_NAME {
            return Err(HandshakeError::NotFixedNewstyle { option });
        }
        tracing::debug!(peer, option, length = header.length, tls = ?state.tls, "NBD option");

        if state.tls == Tls::Required {
            match option {
                OPT_STARTTLS | OPT_ABORT => {}
                OPT_EXPORT_NAME => return Err(HandshakeError::TlsRequired),
                _ => {
                    send(
                        writer,
                        option,
                        REP_ERR_TLS_REQD,
                        b"this server requires TLS: send NBD_OPT_STARTTLS first",
                    )
                    .await?;
                    continue;
                }
            }
        }

        match option {
            OPT_EXPORT_NAME => {
                let name = parse_export_name(&data)
                    .map_err(|reason| HandshakeError::BadExportName { reason })?;
                let export = server
                    .lookup(name)
                    .ok_or_else(|| HandshakeError::UnknownExport {
                        name: name.to_owned(),
                    })?;
                let info = export.device.info();
                writer
                    .write_all(&export_name_reply(
                        info.size,
                        export.transmission_flags(state.structured),
                        no_zeroes,
                    ))
                    .await?;
                writer.flush().await?;
                return Ok(Outcome::Transmission(state.session(export)));
            }
            OPT_ABORT => {
                // The client may already be gone; the spec asks us not to mind.
                let _ = send(writer, option, REP_ACK, &[]).await;
                return Ok(Outcome::Aborted);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    send(
                        writer,
                        option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_LIST takes no data",
                    )
                    .await?;
                    continue;
                }
                for export in server.exports() {
                    let data = rep_server(&export.name, &export.description);
                    writer
                        .write_all(&option_reply(option, REP_SERVER, &data))
                        .await?;
                }
                send(writer, option, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let request = match InfoRequest::decode(&data) {
                    Ok(request) => request,
                    Err(reason) => {
                        send(writer, option, REP_ERR_INVALID, reason.as_bytes()).await?;
                        continue;
                    }
                };
                let Some(export) = server.lookup(&request.name) else {
                    let message = format!("no export named {:?}", request.name);
                    send(writer, option, REP_ERR_UNKNOWN, message.as_bytes()).await?;
                    continue;
                };
                send_export_info(writer, option, export, &request, state.structured).await?;
                if option == OPT_GO {
                    return Ok(Outcome::Transmission(state.session(export)));
                }
            }
            OPT_STARTTLS => {
                let (reply, message): (u32, &[u8]) = match state.tls {
                    _ if !data.is_empty() => (REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data"),
                    Tls::Unavailable => (
                        REP_ERR_UNSUP,
                        b"TLS is not enabled on this server (--tls off)",
                    ),
                    Tls::Active => (REP_ERR_INVALID, b"TLS is already active"),
                    Tls::Offered | Tls::Required => (REP_ACK, b""),
                };
                send(writer, option, reply, message).await?;
                if reply == REP_ACK {
                    // The spec: nothing negotiated before STARTTLS survives it.
                    state.structured = false;
                    state.meta = None;
                    return Ok(Outcome::StartTls);
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send(
                        writer,
                        option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                    continue;
                }
                state.structured = true;
                send(writer, option, REP_ACK, &[]).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(writer, server, state, option, &data).await?;
            }
            _ => {
                send(writer, option, REP_ERR_UNSUP, b"unknown option").await?;
            }
        }
    }
}

/// Answers `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT`: one
/// `NBD_REP_META_CONTEXT` per matching context (IDs only when setting), then `NBD_REP_ACK`;
/// or one error reply. A SET replaces the selection even when it fails.
async fn meta_context<W: AsyncWrite + Unpin>(
    writer: &mut W,
    server: &NbdServer,
    state: &mut Negotiation,
    option: u32,
    data: &[u8],
) -> io::Result<()> {
    let listing = option == OPT_LIST_META_CONTEXT;
    if !listing {
        state.meta = None;
    }
    if !state.structured {
        return send(
            writer,
            option,
            REP_ERR_INVALID,
            b"metadata contexts need structured replies: send NBD_OPT_STRUCTURED_REPLY first",
        )
        .await;
    }
    let request = match MetaContextRequest::decode(data) {
        Ok(request) => request,
        Err(reason) => return send(writer, option, REP_ERR_INVALID, reason.as_bytes()).await,
    };
    let Some(export) = server.lookup(&request.name) else {
        let message = format!("no export named {:?}", request.name);
        return send(writer, option, REP_ERR_UNKNOWN, message.as_bytes()).await;
    };
    let selected = match meta::select(&server.contexts(export), &request.queries, listing) {
        Ok(selected) => selected,
        Err(reason) => return send(writer, option, REP_ERR_INVALID, reason.as_bytes()).await,
    };
    for s in &selected {
        // The spec reserves the ID in list replies; clients must ignore it.
        let id = if listing { 0 } else { s.id };
        writer
            .write_all(&option_reply(
                option,
                REP_META_CONTEXT,
                &rep_meta_context(id, &s.context.name()),
            ))
            .await?;
    }
    if !listing {
        state.meta = Some((export.name.clone(), selected));
    }
    send(writer, option, REP_ACK, &[]).await
}

/// The `NBD_REP_INFO` replies and the final `NBD_REP_ACK` of a successful
/// `NBD_OPT_INFO` / `NBD_OPT_GO`.
async fn send_export_info<W: AsyncWrite + Unpin>(
    writer: &mut W,
    option: u32,
    export: &Export,
    request: &InfoRequest,
    structured: bool,
) -> io::Result<()> {
    let info = export.device.info();
    let mut replies = vec![
        info_export(info.size, export.transmission_flags(structured)),
        // Always sent, asked or not: the minimum (the device's logical block size) is
        // stricter than the protocol's default of 1, and we reject misaligned requests.
        info_block_size(
            info.block_size,
            PREFERRED_BLOCK_SIZE.max(info.block_size),
            MAX_PAYLOAD,
        ),
    ];
    if request.requests.contains(&INFO_NAME) {
        replies.push(info_string(INFO_NAME, &export.name));
    }
    if request.requests.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
        replies.push(info_string(INFO_DESCRIPTION, &export.description));
    }
    for data in replies {
        writer
            .write_all(&option_reply(option, REP_INFO, &data))
            .await?;
    }
    send(writer, option, REP_ACK, &[]).await
}

/// Writes one option reply and flushes it.
async fn send<W: AsyncWrite + Unpin>(
    writer: &mut W,
    option: u32,
    reply_type: u32,
    data: &[u8],
) -> io::Result<()> {
    writer
        .write_all(&option_reply(option, reply_type, data))
        .await?;
    writer.flush().await
}

fn parse_export_name(data: &[u8]) -> Result<&str, &'static str> {
    if data.len() > MAX_NAME_LEN {
        return Err("longer than 4096 bytes");
    }
    let name = std::str::from_utf8(data).map_err(|_| "not UTF-8")?;
    if name.contains('\0') {
        return Err("contains NUL");
    }
    Ok(name)
}
