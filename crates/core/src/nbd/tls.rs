//! TLS for `nbds://` remotes: the handshake after `NBD_OPT_STARTTLS`, with a pre-shared
//! key (nbdkit's `--tls-psk`) or certificates (`--tls-certificates`), through OpenSSL.
//!
//! The client reads replies on one thread and writes requests on another, each with its
//! own handle on the socket; an OpenSSL session cannot be used by two threads at once. So a
//! TLS connection gets a relay thread that owns the session, and the client talks to the
//! relay through a Unix socket pair: the reader and sender stay the same for every
//! transport, and a shutdown of the client's end closes the TLS connection.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use openssl::error::ErrorStack;
use openssl::ssl::{
    ErrorCode, HandshakeError, Ssl, SslConnector, SslContext, SslFiletype, SslMethod, SslMode, SslStream,
    SslVerifyMode, SslVersion,
};

use crate::error::{Error, ErrorKind, Result};
use crate::nbd::uri::{NbdAddress, NbdUri, TlsSettings};

fn tls_error(who: &str, what: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Tls, format!("{who}: {what}"))
}

fn stack(who: &str, doing: &str) -> impl Fn(ErrorStack) -> Error {
    let (who, doing) = (who.to_string(), doing.to_string());
    move |e| tls_error(&who, format_args!("{doing}: {e}"))
}

/// The login name, the PSK identity when the URI names none (as libnbd does).
fn login_name() -> String {
    for v in ["LOGNAME", "USER"] {
        if let Ok(u) = std::env::var(v) {
            if !u.is_empty() {
                return u;
            }
        }
    }
    // SAFETY: getpwuid returns a pointer to static storage or null; read it at once.
    unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        if !pw.is_null() && !(*pw).pw_name.is_null() {
            return std::ffi::CStr::from_ptr((*pw).pw_name).to_string_lossy().into_owned();
        }
    }
    "root".to_string()
}

/// The key of `identity` in a PSK file (`identity:hexkey` lines).
fn read_psk(path: &Path, identity: &str, who: &str) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| tls_error(who, format_args!("cannot read the PSK file {}: {e}", path.display())))?;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((id, hex)) = line.split_once(':') else {
            return Err(tls_error(who, format_args!("{} line {}: not identity:hexkey", path.display(), n + 1)));
        };
        if id != identity {
            continue;
        }
        let hex = hex.trim();
        if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > 512 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(tls_error(
                who,
                format_args!(
                    "{} line {}: the key of {id:?} is not an even number of hex digits (at most 512)",
                    path.display(),
                    n + 1
                ),
            ));
        }
        let key: std::result::Result<Vec<u8>, _> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16)).collect();
        return key.map_err(|_| {
            tls_error(who, format_args!("{} line {}: the key of {id:?} is not hex", path.display(), n + 1))
        });
    }
    Err(tls_error(
        who,
        format_args!(
            "{} has no key for {identity:?} (name the user as nbds://USER@… or tls-username=)",
            path.display()
        ),
    ))
}

/// A socket the TLS session runs over (the client's TCP or Unix socket), in blocking mode
/// for the handshake.
pub(crate) trait Transport: Read + Write + AsRawFd + Send + 'static {
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()>;
}

/// The socket as OpenSSL sees it: a read or write a signal interrupted is made again.
/// OpenSSL takes `EINTR` for a failure (a handshake on Node's thread, which gets SIGCHLD
/// from every child process, failed so), and std's `read` and `write` pass it on.
#[derive(Debug)]
struct Restarting<T>(T);

impl<T: Read> Read for Restarting<T> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.0.read(b) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
}

impl<T: Write> Write for Restarting<T> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        loop {
            match self.0.write(b) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Runs the TLS handshake on `sock` (after the server acknowledged `STARTTLS`) and starts
/// the relay. Returns the client's end of the relay: plain bytes in, TLS on the wire.
pub(crate) fn start<T: Transport>(sock: T, uri: &NbdUri, timeout: Duration) -> Result<UnixStream> {
    let who = uri.text.as_str();
    let settings = uri.tls.as_ref().expect("start is called for nbds URIs");
    let ssl = session(settings, &uri.address, who)?;
    let stream = match ssl.connect(Restarting(sock)) {
        Ok(s) => s,
        Err(HandshakeError::SetupFailure(e)) => return Err(stack(who, "TLS setup")(e)),
        Err(HandshakeError::Failure(m)) => {
            let why = m.error().ssl_error().map_or_else(|| m.error().to_string(), |s| s.to_string());
            let hint = if settings.psk_file.is_some() {
                " (is the key the server's for this user?)"
            } else if settings.verify_peer {
                " (is the server's certificate signed by the CA in tls-certificates, and for this host name?)"
            } else {
                ""
            };
            return Err(tls_error(who, format_args!("the TLS handshake failed: {why}{hint}")));
        }
        Err(HandshakeError::WouldBlock(_)) => {
            return Err(Error::new(
                ErrorKind::TimedOut,
                format!("{who}: the TLS handshake did not finish within {timeout:?}"),
            ))
        }
    };
    let (mine, theirs) = UnixStream::pair().map_err(|e| Error::io(format!("{who}: TLS relay socket"), e))?;
    let ready = || -> std::io::Result<()> {
        stream.get_ref().0.set_nonblocking(true)?;
        theirs.set_nonblocking(true)
    };
    ready().map_err(|e| Error::io(format!("{who}: TLS relay socket"), e))?;
    std::thread::Builder::new()
        .name("ubcache-nbd-tls".into())
        .spawn(move || relay(stream, theirs))
        .map_err(|e| Error::io("spawn the NBD TLS relay thread", e))?;
    Ok(mine)
}

/// An OpenSSL session set up as the URI asks.
fn session(t: &TlsSettings, address: &NbdAddress, who: &str) -> Result<Ssl> {
    if let Some(psk_file) = &t.psk_file {
        let identity = t.username.clone().unwrap_or_else(login_name);
        let key = read_psk(psk_file, &identity, who)?;
        let mut ctx = SslContext::builder(SslMethod::tls_client()).map_err(stack(who, "TLS setup"))?;
        // PSK over TLS 1.2, which every NBD server with PSK speaks (GnuTLS's nbdkit and
        // qemu-nbd, and Node's TLS in `ubcache serve`).
        ctx.set_max_proto_version(Some(SslVersion::TLS1_2)).map_err(stack(who, "TLS setup"))?;
        ctx.set_cipher_list("ECDHE-PSK:DHE-PSK:PSK:!aNULL:!eNULL:!MD5:!3DES:!RC4").map_err(stack(who, "TLS setup"))?;
        ctx.set_verify(SslVerifyMode::NONE);
        // As `SslConnector` sets them: the relay may retry a write with more bytes behind it.
        ctx.set_mode(SslMode::ENABLE_PARTIAL_WRITE | SslMode::ACCEPT_MOVING_WRITE_BUFFER);
        ctx.set_psk_client_callback(move |_ssl, _hint, id_out, key_out| {
            let id = identity.as_bytes();
            // The identity goes out NUL-terminated.
            if id.len() + 1 > id_out.len() || key.len() > key_out.len() {
                return Ok(0);
            }
            id_out[..id.len()].copy_from_slice(id);
            id_out[id.len()] = 0;
            key_out[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
        return Ssl::new(&ctx.build()).map_err(stack(who, "TLS setup"));
    }
    let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(stack(who, "TLS setup"))?;
    if let Some(dir) = &t.certificates {
        if !dir.is_dir() {
            return Err(tls_error(who, format_args!("tls-certificates={} is not a directory", dir.display())));
        }
        let ca = dir.join("ca-cert.pem");
        if ca.exists() {
            b.set_ca_file(&ca).map_err(stack(who, &format!("reading {}", ca.display())))?;
        }
        let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
        if cert.exists() && key.exists() {
            b.set_certificate_chain_file(&cert).map_err(stack(who, &format!("reading {}", cert.display())))?;
            b.set_private_key_file(&key, SslFiletype::PEM)
                .map_err(stack(who, &format!("reading {}", key.display())))?;
        }
    }
    if !t.verify_peer {
        b.set_verify(SslVerifyMode::NONE);
    }
    let host = t.hostname.clone().unwrap_or_else(|| match address {
        NbdAddress::Tcp { host, .. } => host.clone(),
        NbdAddress::Unix(_) => "localhost".to_string(),
    });
    let mut c = b.build().configure().map_err(stack(who, "TLS setup"))?;
    c.set_verify_hostname(t.verify_peer);
    c.set_use_server_name_indication(host.parse::<std::net::IpAddr>().is_err());
    c.into_ssl(&host).map_err(stack(who, "TLS setup"))
}

/// Bytes waiting to go one way.
struct Pipe {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Pipe {
    fn new() -> Pipe {
        Pipe { buf: vec![0; 256 << 10], start: 0, end: 0 }
    }
    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
    fn consumed(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
    fn room(&mut self) -> &mut [u8] {
        if self.start > 0 && self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }
    fn has_room(&self) -> bool {
        self.end < self.buf.len() || self.start > 0
    }
}

/// Moves bytes between the client's plain socket and the TLS session until either side
/// closes; then closes the other.
fn relay<T: Transport>(mut tls: SslStream<Restarting<T>>, mut plain: UnixStream) {
    let (mut up, mut down) = (Pipe::new(), Pipe::new());
    let (mut remote_eof, mut local_eof) = (false, false);
    loop {
        // The session waits for the socket to be writable (a write, or a renegotiation).
        let mut tls_wants_write = false;
        let mut moved = true;
        while moved {
            moved = false;
            if !remote_eof && down.has_room() {
                match tls.ssl_read(down.room()) {
                    Ok(0) => remote_eof = true,
                    Ok(n) => {
                        down.end += n;
                        moved = true;
                    }
                    Err(e) if e.code() == ErrorCode::WANT_READ => {}
                    Err(e) if e.code() == ErrorCode::WANT_WRITE => tls_wants_write = true,
                    Err(_) => remote_eof = true,
                }
            }
            if !down.data().is_empty() {
                match plain.write(down.data()) {
                    Ok(n) => {
                        down.consumed(n);
                        moved = true;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => moved = true,
                    Err(_) => return,
                }
            }
            if !local_eof && up.has_room() {
                match plain.read(up.room()) {
                    Ok(0) => local_eof = true,
                    Ok(n) => {
                        up.end += n;
                        moved = true;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => moved = true,
                    Err(_) => local_eof = true,
                }
            }
            if !up.data().is_empty() {
                match tls.ssl_write(up.data()) {
                    Ok(n) => {
                        up.consumed(n);
                        moved = true;
                    }
                    Err(e) if e.code() == ErrorCode::WANT_WRITE => tls_wants_write = true,
                    Err(e) if e.code() == ErrorCode::WANT_READ => {}
                    Err(_) => remote_eof = true,
                }
            }
        }
        if local_eof {
            // The client let go of the connection (closing, or dropping it after a fault).
            let _ = tls.shutdown();
            return;
        }
        if remote_eof && down.data().is_empty() {
            let _ = plain.shutdown(std::net::Shutdown::Both);
            return;
        }
        let mut fds = [
            libc::pollfd {
                fd: plain.as_raw_fd(),
                events: if up.has_room() { libc::POLLIN } else { 0 }
                    | if down.data().is_empty() { 0 } else { libc::POLLOUT },
                revents: 0,
            },
            libc::pollfd {
                fd: tls.get_ref().0.as_raw_fd(),
                events: if !remote_eof && down.has_room() { libc::POLLIN } else { 0 }
                    | if tls_wants_write { libc::POLLOUT } else { 0 },
                revents: 0,
            },
        ];
        // A descriptor waited on for nothing is left out: its hangup would end the wait
        // again and again (poll reports hangups unasked) with nothing to do.
        if fds[1].events == 0 {
            fds[1].fd = -1;
        }
        // SAFETY: two pollfds on descriptors this thread owns (or -1: ignored).
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
        // The client's end hung up (closed, or shut down after a stalled reply): the
        // connection is over, whatever is still buffered either way.
        if fds[0].revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            let _ = tls.shutdown();
            return;
        }
    }
}
