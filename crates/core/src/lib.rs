//! ubcache core: everything on the hot path of a user-space bcache, with no napi dependency.
//!
//! One module per concept, named in bcache's vocabulary. The napi crate converts types and
//! errors from here and holds no logic of its own.

pub mod alloc;
pub mod cache_set;
pub mod checkpoint;
pub mod crc64;
pub mod error;
pub mod index;
pub mod io;
pub mod journal;
mod le;
pub mod nbd;
pub mod sim;
pub mod uuids;

pub use error::{Error, ErrorKind, Result};
