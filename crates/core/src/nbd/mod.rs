//! Remote devices over NBD: the protocol as a client speaks it ([`proto`]), NBD URIs
//! ([`uri`]), TLS for `nbds://` (`tls`), and an asynchronous client that rides out a lost connection ([`client`]).
//! A [`crate::io::Device`] opened from an NBD URI is served by a client, behind the same
//! engine seam as files and block devices.

pub mod client;
pub mod proto;
mod tls;
pub mod uri;

pub use client::{NbdClient, NbdOptions, NbdStats};
pub use proto::ExportInfo;
pub use uri::{is_nbd_uri, NbdAddress, NbdUri, TlsSettings};
