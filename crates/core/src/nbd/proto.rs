//! The NBD protocol as a client speaks it (NetworkBlockDevice/nbd `doc/proto.md`): the
//! fixed-newstyle handshake with `NBD_OPT_STRUCTURED_REPLY` and `NBD_OPT_GO` (falling back
//! to `NBD_OPT_EXPORT_NAME` on servers without `GO`), and the encoding of requests and
//! replies. Every value a server sends is checked before it is used: a wrong magic, an
//! option reply for another option, a length past what was asked, a block size that makes no
//! sense, is a [`ErrorKind::Protocol`] error naming what was wrong.
//!
//! The server (`ts/nbd/protocol.ts`) keeps its own copy of the constants: it is TypeScript.

use std::io::{Read, Write};

use crate::error::{Error, ErrorKind, Result};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1 << 0;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// Largest request this client makes (the server may allow less: [`ExportInfo::max_block`]).
pub const MAX_REQUEST: u32 = 32 << 20;
/// Longest option reply or structured-reply chunk header payload accepted that is not data.
const MAX_OPTION_REPLY: u32 = 64 << 10;

/// What the server says about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Bytes.
    pub size: u64,
    /// Transmission flags (`FLAG_*`).
    pub flags: u16,
    /// Smallest block the server accepts (1 when it does not say).
    pub min_block: u32,
    /// The block size it prefers.
    pub preferred_block: u32,
    /// Largest request it accepts.
    pub max_block: u32,
    /// Structured replies were negotiated.
    pub structured: bool,
}

impl ExportInfo {
    /// The server takes writes.
    pub fn writable(&self) -> bool {
        self.flags & FLAG_READ_ONLY == 0
    }
    /// The server takes `flag` (`FLAG_SEND_*`, `FLAG_CAN_MULTI_CONN`).
    pub fn has(&self, flag: u16) -> bool {
        self.flags & FLAG_HAS_FLAGS != 0 && self.flags & flag != 0
    }
}

pub(crate) fn protocol(who: &str, what: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Protocol, format!("{who}: the NBD server broke the protocol: {what}"))
}

fn read_exact(s: &mut impl Read, buf: &mut [u8], who: &str) -> Result<()> {
    s.read_exact(buf).map_err(|e| match e.kind() {
        // The socket's timeout ran out: a server busy with other clients (qemu-nbd takes one
        // at a time unless started with --shared) or not an NBD server at all.
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Error::new(
            ErrorKind::TimedOut,
            format!("{who}: the server did not answer the handshake in time (does it take more than one client at a time? qemu-nbd needs --shared)"),
        ),
        _ => Error::io(format!("{who}: handshake"), e),
    })
}

fn u16_of(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn u32_of(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn u64_of(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

fn send_option(s: &mut impl Write, opt: u32, data: &[u8], who: &str) -> Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).map_err(|e| Error::io(format!("{who}: handshake"), e))
}

/// One option reply: its type and data.
fn read_option_reply(s: &mut impl Read, opt: u32, who: &str) -> Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    read_exact(s, &mut h, who)?;
    if u64_of(&h) != REPLY_MAGIC {
        return Err(protocol(who, format_args!("option reply magic {:#x}", u64_of(&h))));
    }
    if u32_of(&h[8..]) != opt {
        return Err(protocol(who, format_args!("a reply to option {} when {opt} was sent", u32_of(&h[8..]))));
    }
    let len = u32_of(&h[16..]);
    if len > MAX_OPTION_REPLY {
        return Err(protocol(who, format_args!("an option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    read_exact(s, &mut data, who)?;
    Ok((u32_of(&h[12..]), data))
}

fn option_error(who: &str, export: &str, ty: u32, data: &[u8]) -> Error {
    let msg = String::from_utf8_lossy(data);
    let (kind, what) = match ty {
        REP_ERR_UNKNOWN => (ErrorKind::NotFound, format!("no export named {export:?}")),
        REP_ERR_TLS_REQD => (ErrorKind::PermissionDenied, "the server requires TLS (use nbds://)".to_string()),
        REP_ERR_UNSUP => (ErrorKind::InvalidArgument, "the server does not support the request".to_string()),
        _ => (ErrorKind::Io, format!("the server refused (error {:#x})", ty)),
    };
    let msg = if msg.is_empty() { String::new() } else { format!(": {msg}") };
    Error::new(kind, format!("{who}: {what}{msg}"))
}

/// Runs the fixed-newstyle handshake for `export` on a fresh connection; `who` names the
/// remote in errors. Returns what the server said about the export.
pub fn handshake(s: &mut (impl Read + Write), export: &str, who: &str) -> Result<ExportInfo> {
    let no_zeroes = greet(s, who)?;
    negotiate(s, export, no_zeroes, who)
}

/// The greeting: the server's magic and flags, the client's flags. Returns whether the
/// server left out the 124 zero bytes after `EXPORT_NAME`'s reply.
pub fn greet(s: &mut (impl Read + Write), who: &str) -> Result<bool> {
    let mut h = [0u8; 18];
    read_exact(s, &mut h, who)?;
    if u64_of(&h) != NBDMAGIC {
        return Err(protocol(who, format_args!("greeting magic {:#x} (not an NBD server?)", u64_of(&h))));
    }
    if u64_of(&h[8..]) != IHAVEOPT {
        return Err(protocol(who, "an oldstyle server (only fixed newstyle is supported)"));
    }
    let server = u16_of(&h[16..]);
    if server & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol(who, "the server does not speak fixed newstyle"));
    }
    let no_zeroes = server & FLAG_NO_ZEROES != 0;
    let client = u32::from(FLAG_FIXED_NEWSTYLE) | if no_zeroes { u32::from(FLAG_NO_ZEROES) } else { 0 };
    s.write_all(&client.to_be_bytes()).map_err(|e| Error::io(format!("{who}: handshake"), e))?;
    Ok(no_zeroes)
}

/// `NBD_OPT_STARTTLS`: once the server acknowledges it, the TLS handshake follows on the
/// same connection, and every option after it goes over TLS.
pub fn starttls(s: &mut (impl Read + Write), who: &str) -> Result<()> {
    send_option(s, OPT_STARTTLS, &[], who)?;
    let (ty, data) = read_option_reply(s, OPT_STARTTLS, who)?;
    match ty {
        REP_ACK if data.is_empty() => Ok(()),
        // nbdkit --tls=off answers ERR_POLICY, servers without TLS ERR_UNSUP.
        t if t & REP_ERR != 0 => {
            let msg = String::from_utf8_lossy(&data);
            Err(Error::new(
                ErrorKind::Tls,
                format!(
                    "{who}: the server does not offer TLS (it refused NBD_OPT_STARTTLS with error {t:#x}{}); use nbd:// for a plain connection",
                    if msg.is_empty() { String::new() } else { format!(": {msg}") }
                ),
            ))
        }
        t => Err(protocol(who, format_args!("reply type {t} ({} bytes) to STARTTLS", data.len()))),
    }
}

/// The options after the greeting (and TLS): structured replies, then `GO` for `export`.
pub fn negotiate(s: &mut (impl Read + Write), export: &str, no_zeroes: bool, who: &str) -> Result<ExportInfo> {
    send_option(s, OPT_STRUCTURED_REPLY, &[], who)?;
    let (ty, data) = read_option_reply(s, OPT_STRUCTURED_REPLY, who)?;
    let structured = match ty {
        REP_ACK => true,
        t if t & REP_ERR != 0 => false,
        t => return Err(protocol(who, format_args!("reply type {t} to STRUCTURED_REPLY ({} bytes)", data.len()))),
    };

    let name = export.as_bytes();
    if name.len() > 4096 {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("{who}: the export name is longer than 4096 bytes"),
        ));
    }
    let mut go = Vec::with_capacity(8 + name.len());
    go.extend_from_slice(&(name.len() as u32).to_be_bytes());
    go.extend_from_slice(name);
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &go, who)?;
    let mut info: Option<(u64, u16)> = None;
    let mut blocks = (1u32, 4096u32, MAX_REQUEST);
    loop {
        let (ty, data) = read_option_reply(s, OPT_GO, who)?;
        match ty {
            REP_INFO => {
                if data.len() < 2 {
                    return Err(protocol(who, "an empty NBD_REP_INFO"));
                }
                match (u16_of(&data), data.len()) {
                    (INFO_EXPORT, 12) => info = Some((u64_of(&data[2..]), u16_of(&data[10..]))),
                    (INFO_BLOCK_SIZE, 14) => {
                        let (min, pref, max) = (u32_of(&data[2..]), u32_of(&data[6..]), u32_of(&data[10..]));
                        let pow2 = |v: u32| v.is_power_of_two();
                        if !pow2(min) || min > 65536 || !pow2(pref) || pref < min || max < pref.max(min) {
                            return Err(protocol(
                                who,
                                format_args!("block sizes min {min}, preferred {pref}, max {max}"),
                            ));
                        }
                        blocks = (min, pref, max.min(MAX_REQUEST));
                    }
                    (INFO_EXPORT | INFO_BLOCK_SIZE, n) => {
                        return Err(protocol(who, format_args!("NBD_REP_INFO of {n} bytes for its type")))
                    }
                    _ => {} // Information not asked for may be ignored.
                }
            }
            REP_ACK => break,
            REP_ERR_UNSUP => {
                // An older server without GO: EXPORT_NAME, which has no error reply.
                s.write_all(&IHAVEOPT.to_be_bytes()).map_err(|e| Error::io(format!("{who}: handshake"), e))?;
                s.write_all(&OPT_EXPORT_NAME.to_be_bytes()).map_err(|e| Error::io(format!("{who}: handshake"), e))?;
                s.write_all(&(name.len() as u32).to_be_bytes())
                    .map_err(|e| Error::io(format!("{who}: handshake"), e))?;
                s.write_all(name).map_err(|e| Error::io(format!("{who}: handshake"), e))?;
                let mut r = vec![0u8; if no_zeroes { 10 } else { 134 }];
                read_exact(s, &mut r, who).map_err(|_| option_error(who, export, REP_ERR_UNKNOWN, &[]))?;
                info = Some((u64_of(&r), u16_of(&r[8..])));
                // Structured replies are negotiated for GO's transmission phase only.
                return finish(who, info, blocks, structured);
            }
            t if t & REP_ERR != 0 => return Err(option_error(who, export, t, &data)),
            t => return Err(protocol(who, format_args!("reply type {t} to GO"))),
        }
    }
    finish(who, info, blocks, structured)
}

fn finish(who: &str, info: Option<(u64, u16)>, blocks: (u32, u32, u32), structured: bool) -> Result<ExportInfo> {
    let (size, flags) = info.ok_or_else(|| protocol(who, "GO acknowledged without NBD_INFO_EXPORT"))?;
    if size > i64::MAX as u64 {
        return Err(protocol(who, format_args!("an export of {size} bytes")));
    }
    Ok(ExportInfo { size, flags, min_block: blocks.0, preferred_block: blocks.1, max_block: blocks.2, structured })
}

/// A request header (28 bytes).
pub fn request(cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

/// A reply's header, read from the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply: an errno (0: success); a successful read's data follows.
    Simple { cookie: u64, error: u32 },
    /// A structured-reply chunk of `len` payload bytes.
    Chunk { cookie: u64, flags: u16, ty: u16, len: u32 },
}

/// Reads the magic and the header after it.
pub fn read_reply_header(
    s: &mut impl Read,
    structured: bool,
) -> std::io::Result<std::result::Result<ReplyHeader, String>> {
    let mut m = [0u8; 4];
    s.read_exact(&mut m)?;
    match u32::from_be_bytes(m) {
        SIMPLE_REPLY_MAGIC => {
            let mut h = [0u8; 12];
            s.read_exact(&mut h)?;
            Ok(Ok(ReplyHeader::Simple { error: u32_of(&h), cookie: u64_of(&h[4..]) }))
        }
        STRUCTURED_REPLY_MAGIC if structured => {
            let mut h = [0u8; 16];
            s.read_exact(&mut h)?;
            Ok(Ok(ReplyHeader::Chunk {
                flags: u16_of(&h),
                ty: u16_of(&h[2..]),
                cookie: u64_of(&h[4..]),
                len: u32_of(&h[12..]),
            }))
        }
        other => Ok(Err(format!("reply magic {other:#x}"))),
    }
}

/// The errno an NBD error value stands for (the protocol's values are Linux's).
pub fn errno_of(error: u32) -> i32 {
    match error {
        1 | 5 | 12 | 22 | 28 | 75 | 95 | 108 => error as i32,
        _ => libc::EIO,
    }
}
