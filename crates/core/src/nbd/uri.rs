//! NBD URIs (the NBD project's `doc/uri.md`): where a remote device is and which export.
//!
//! - `nbd://host[:port]/export`: TCP, port 10809 by default;
//! - `nbd+unix:///export?socket=/path/to.sock`: a Unix socket;
//! - `nbds://` and `nbds+unix://`: the same over TLS (`NBD_OPT_STARTTLS`), with libnbd's
//!   query parameters: `tls-psk-file=PATH` (a pre-shared key, for the user named before
//!   an `@` in the authority or by `tls-username=`), `tls-certificates=DIR` (`ca-cert.pem`,
//!   and `client-cert.pem`/`client-key.pem` when the server asks for one),
//!   `tls-verify-peer=false`, `tls-hostname=NAME`.
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
    /// `nbds`: TLS required, with these settings.
    pub tls: Option<TlsSettings>,
    /// The URI as given, for messages.
    pub text: String,
}

/// How an `nbds` URI asks for TLS (libnbd's query parameters).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    /// `user@` or `tls-username=`: the PSK identity (default: the login name).
    pub username: Option<String>,
    /// `tls-psk-file=`: `identity:hexkey` lines (nbdkit's and GnuTLS's `psktool` format).
    pub psk_file: Option<std::path::PathBuf>,
    /// `tls-certificates=`: a directory with `ca-cert.pem`, and `client-cert.pem` and
    /// `client-key.pem` for a server that asks for a client certificate.
    pub certificates: Option<std::path::PathBuf>,
    /// `tls-verify-peer=false` turns off the server certificate's check (default on).
    pub verify_peer: bool,
    /// `tls-hostname=`: the name the certificate must carry (default: the URI's host,
    /// `localhost` for a Unix socket).
    pub hostname: Option<String>,
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
        // userinfo: the TLS user name (libnbd's `nbds://alice@host/`).
        let (user, authority) = match authority.rsplit_once('@') {
            Some((u, a)) => (Some(percent_decode(uri, u)?), a),
            None => (None, authority),
        };
        let mut settings = TlsSettings { username: user, verify_peer: true, ..TlsSettings::default() };
        let mut socket = None;
        for kv in query.into_iter().flat_map(|q| q.split('&')).filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "socket" if unix => socket = Some(percent_decode(uri, v)?),
                "tls-psk-file" if tls => settings.psk_file = Some(percent_decode(uri, v)?.into()),
                "tls-certificates" if tls => settings.certificates = Some(percent_decode(uri, v)?.into()),
                "tls-username" if tls => settings.username = Some(percent_decode(uri, v)?),
                "tls-hostname" if tls => settings.hostname = Some(percent_decode(uri, v)?),
                "tls-verify-peer" if tls => {
                    settings.verify_peer = match v {
                        "true" | "1" | "yes" => true,
                        "false" | "0" | "no" => false,
                        _ => return Err(bad(uri, &format!("tls-verify-peer={v} is not true or false"))),
                    }
                }
                k if k.starts_with("tls-") && !tls => {
                    return Err(bad(uri, &format!("{k} is given, but the scheme has no TLS (nbds:// or nbds+unix://)")))
                }
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
        if settings.psk_file.is_some() && settings.certificates.is_some() {
            return Err(bad(uri, "tls-psk-file and tls-certificates are both given; pick one"));
        }
        if !tls && settings.username.is_some() {
            return Err(bad(uri, "a user name is given, but the scheme has no TLS"));
        }
        Ok(NbdUri { address, export, tls: tls.then_some(settings), text: uri.to_string() })
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
        assert!(u.tls.is_none());
        let u = NbdUri::parse("nbds://[::1]:1234/a%20b").unwrap();
        assert_eq!(u.address, NbdAddress::Tcp { host: "::1".into(), port: 1234 });
        assert_eq!(u.export, "a b");
        assert_eq!(u.tls, Some(TlsSettings { verify_peer: true, ..TlsSettings::default() }));
        let u = NbdUri::parse("nbds+unix://alice@/x?socket=/s&tls-psk-file=/k%20s.psk").unwrap();
        assert_eq!(u.address, NbdAddress::Unix("/s".into()));
        let t = u.tls.unwrap();
        assert_eq!((t.username.as_deref(), t.psk_file), (Some("alice"), Some("/k s.psk".into())));
        let u = NbdUri::parse("nbds://bob@h:5/x?tls-certificates=/c&tls-verify-peer=false&tls-hostname=n").unwrap();
        assert_eq!(u.address, NbdAddress::Tcp { host: "h".into(), port: 5 });
        let t = u.tls.unwrap();
        assert_eq!((t.certificates, t.verify_peer, t.hostname.as_deref()), (Some("/c".into()), false, Some("n")));
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
            ("nbd://h/x?tls-psk-file=/k", "no TLS"),
            ("nbd://alice@h/x", "no TLS"),
            ("nbds://h/x?tls-verify-peer=maybe", "not true or false"),
            ("nbds://h/x?tls-psk-file=/k&tls-certificates=/c", "pick one"),
            ("nbd", "no scheme"),
        ] {
            let e = NbdUri::parse(s).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
            assert!(e.message().contains(why) && e.message().starts_with(s), "{s}: {}", e.message());
        }
        assert!(is_nbd_uri("nbd+unix:///x?socket=/s") && !is_nbd_uri("/dev/sda") && !is_nbd_uri("nbd.img"));
    }
}
