//! Typed errors for the core. Each kind has a stable code that the binding puts on the
//! JavaScript `Error` as `code`, so callers can branch on it without parsing messages.

use std::fmt;

/// What went wrong, independent of where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The path does not exist.
    NotFound,
    /// The path is not a regular file or block device (a directory, a socket, ...).
    NotADevice,
    /// The OS refused access.
    PermissionDenied,
    /// The device is already opened exclusively by someone else.
    Busy,
    /// An offset or length outside the device.
    OutOfRange,
    /// An offset or length not aligned to what the device requires.
    Misaligned,
    /// Any other I/O failure.
    Io,
    /// A stored checksum does not match the data it covers.
    ChecksumMismatch,
    /// A structure does not start with the magic it must have.
    MagicMismatch,
    /// No free space (buckets) left.
    NoSpace,
    /// A caller passed an argument that can never be valid.
    InvalidArgument,
    /// Metadata that passed its checksum is inconsistent (a chain that loops, mixed sequence
    /// numbers), or in-memory bookkeeping broke an invariant.
    Corrupt,
    /// The device or engine was closed before or while the request was made.
    Closed,
    /// A remote device (an NBD server) broke the protocol: a wrong magic, a reply to a
    /// request never made, a reply longer or shorter than the request.
    Protocol,
    /// A remote device did not answer in time.
    TimedOut,
    /// TLS to a remote device could not be set up: the server offers none, the keys or
    /// certificates could not be read, or the TLS handshake failed (a wrong key, a
    /// certificate not trusted).
    Tls,
}

impl ErrorKind {
    /// Stable code for this kind, as seen from JavaScript (`err.code`).
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "ENOENT",
            ErrorKind::NotADevice => "NOT_A_DEVICE",
            ErrorKind::PermissionDenied => "EACCES",
            ErrorKind::Busy => "EBUSY",
            ErrorKind::OutOfRange => "OUT_OF_RANGE",
            ErrorKind::Misaligned => "MISALIGNED",
            ErrorKind::Io => "EIO",
            ErrorKind::ChecksumMismatch => "CHECKSUM_MISMATCH",
            ErrorKind::MagicMismatch => "MAGIC_MISMATCH",
            ErrorKind::NoSpace => "NO_SPACE",
            ErrorKind::InvalidArgument => "INVALID_ARGUMENT",
            ErrorKind::Corrupt => "CORRUPT",
            ErrorKind::Closed => "CLOSED",
            ErrorKind::Protocol => "PROTOCOL",
            ErrorKind::TimedOut => "ETIMEDOUT",
            ErrorKind::Tls => "TLS",
        }
    }
}

/// A core error: a kind and a message that names the thing concerned.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<std::io::Error>,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into(), source: None }
    }

    /// Wraps an OS error, keeping the errno-derived kind.
    pub fn io(context: impl Into<String>, err: std::io::Error) -> Self {
        let kind = match err.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            _ if err.raw_os_error() == Some(libc::EBUSY) => ErrorKind::Busy,
            _ if err.raw_os_error() == Some(libc::ENOSPC) => ErrorKind::NoSpace,
            _ => ErrorKind::Io,
        };
        Error { kind, message: format!("{}: {}", context.into(), err), source: Some(err) }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn code(&self) -> &'static str {
        self.kind.code()
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl Clone for Error {
    /// The same error; an OS error is carried over by its errno (its exact `io::Error`
    /// cannot be cloned).
    fn clone(&self) -> Self {
        let source = self.source.as_ref().map(|e| match e.raw_os_error() {
            Some(n) => std::io::Error::from_raw_os_error(n),
            None => std::io::Error::new(e.kind(), e.to_string()),
        });
        Error { kind: self.kind, message: self.message.clone(), source }
    }
}

/// Errors are equal when their kind and message are.
impl PartialEq for Error {
    fn eq(&self, o: &Self) -> bool {
        self.kind == o.kind && self.message == o.message
    }
}

impl Eq for Error {}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

pub type Result<T> = std::result::Result<T, Error>;
