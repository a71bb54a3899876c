//! NBD URIs (the NBD project's `doc/uri.md`): where a remote device is and which export.
//!
//! - `nbd://host[:port]/export`: TCP, port 10809 by default;
//! - `nbd+unix:///export?socket=/path/to.sock`: a Unix socket;
//! - `nbds://` and `nbds+unix://`: the same over TLS.
//!
//! The export name is the path after the first `/`, percent-decoded (empty: the server's
//! default export).

use crate::error::{Error, ErrorKind, Result};

/// The standard NBD port.
pub const NBD_PORT: u16 = 10809;

/// How to reach the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// `host:port` over TCP.
    Tcp { host: String, port: u16 },
    /// A Unix socket.
    Unix(std::path::PathBuf),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Where the server listens.
    pub address: NbdAddress,
    /// The export's name.
    pub export: String,
    /// `nbds`: TLS required.
    pub tls: bool,
    /// The URI as given, for messages.
    pub text: String,
}

/// True when `s` names a remote device (an NBD URI) rather than a path.
pub fn is_nbd_uri(s: &str) -> bool {
    ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"].iter().any(|p| s.starts_with(p))
}

fn bad(uri: &str, why: &str) -> Error {
    Error::new(ErrorKind::InvalidArgument, format!("{uri}: not a usable NBD URI ({why})"))
}

fn percent_decode(uri: &str, s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(|| bad(uri, "a % escape is cut short"))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad(uri, "a % escape is not hex"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad(uri, "the export name is not UTF-8"))
}

impl NbdUri {
    /// Parses `uri`; anything it cannot use gets an error naming the URI and the reason.
    pub fn parse(uri: &str) -> Result<NbdUri> {
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad(uri, "no scheme"))?;
        let (unix, tls) = match scheme {
            "nbd" => (false, false),
            "nbds" => (false, true),
            "nbd+unix" => (true, false),
            "nbds+unix" => (true, true),
            _ => return Err(bad(uri, "the scheme must be nbd, nbds, nbd+unix or nbds+unix")),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(uri, path)?;
        let mut socket = None;
        for kv in query.into_iter().flat_map(|q| q.split('&')).filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "socket" if unix => socket = Some(percent_decode(uri, v)?),
                // Client certificates and PSK files are given as options, not in the URI.
                "tls-certificates" | "tls-psk-file" | "tls-hostname" | "tls-verify-peer" if tls => {}
                _ => return Err(bad(uri, &format!("unknown query parameter {k:?}"))),
            }
        }
        let address = if unix {
            if !authority.is_empty() {
                return Err(bad(uri, "a Unix-socket URI has no host (nbd+unix:///export?socket=PATH)"));
            }
            let s = socket.ok_or_else(|| bad(uri, "socket= is missing"))?;
            if s.is_empty() {
                return Err(bad(uri, "socket= is empty"));
            }
            NbdAddress::Unix(s.into())
        } else {
            if authority.is_empty() {
                return Err(bad(uri, "no host"));
            }
            let (host, port) = if let Some(h) = authority.strip_prefix('[') {
                // [v6]:port
                let (h, after) = h.split_once(']').ok_or_else(|| bad(uri, "an IPv6 address without its ]"))?;
                (h.to_string(), after.strip_prefix(':'))
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p)),
                    None => (authority.to_string(), None),
                }
            };
            let port = match port {
                None => NBD_PORT,
                Some(p) => {
                    p.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| bad(uri, "the port is not 1-65535"))?
                }
            };
            NbdAddress::Tcp { host, port }
        };
        Ok(NbdUri { address, export, tls, text: uri.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_and_refuses_the_rest() {
        let u = NbdUri::parse("nbd://example.com/disk").unwrap();
        assert_eq!(u.address, NbdAddress::Tcp { host: "example.com".into(), port: 10809 });
        assert_eq!(u.export, "disk");
        assert!(!u.tls);
        let u = NbdUri::parse("nbds://[::1]:1234/a%20b").unwrap();
        assert_eq!(u.address, NbdAddress::Tcp { host: "::1".into(), port: 1234 });
        assert_eq!(u.export, "a b");
        assert!(u.tls);
        let u = NbdUri::parse("nbd+unix:///?socket=/run/x.sock").unwrap();
        assert_eq!(u.address, NbdAddress::Unix("/run/x.sock".into()));
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd://h").unwrap();
        assert_eq!(u.export, "");
        for (s, why) in [
            ("http://h/x", "scheme"),
            ("nbd:///x", "no host"),
            ("nbd://h:0/x", "port"),
            ("nbd://h:99999/x", "port"),
            ("nbd+unix:///x", "socket= is missing"),
            ("nbd+unix://h/x?socket=/s", "no host"),
            ("nbd://h/x?socket=/s", "unknown query parameter"),
            ("nbd://h/%zz", "not hex"),
            ("nbd", "no scheme"),
        ] {
            let e = NbdUri::parse(s).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
            assert!(e.message().contains(why) && e.message().starts_with(s), "{s}: {}", e.message());
        }
        assert!(is_nbd_uri("nbd+unix:///x?socket=/s") && !is_nbd_uri("/dev/sda") && !is_nbd_uri("nbd.img"));
    }
}
