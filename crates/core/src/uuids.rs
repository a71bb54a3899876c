//! The UUID table: one `uuid_entry` per cached device or flash-only volume, its slot number
//! being the inode of its keys. Entries are bcache's 128-byte `uuid_entry`; the table lives
//! in one bucket behind a 128-byte header of ubcache's own (checksum, magic, seq, count).
//! It is rewritten to a new bucket on every change and the journal records where. See
//! docs/format.md, "UUID table".

use crate::crc64::crc64;
use crate::error::{Error, ErrorKind, Result};
use crate::le::{u32_at, u64_at};

/// XORed with the set magic to give the UUID table's magic.
pub const UUID_TABLE_MAGIC: u64 = 0x7575_6964_7461_626c;
/// Format version in the header.
pub const UUID_TABLE_VERSION: u32 = 1;
/// Bytes per entry (and of the header).
pub const UUID_ENTRY_BYTES: usize = 128;
/// `flags` bit of a flash-only volume.
pub const UUID_FLASH_ONLY: u32 = 1;
/// `flags` bit of a backing device cached as it is, with no bcache superblock: its data
/// starts at offset 0, and its size, cache mode and state live in this entry alone.
pub const UUID_NO_SUPERBLOCK: u32 = 2;

/// One slot of the table (bcache's `uuid_entry`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UuidEntry {
    /// UUID of the cached device or volume; all zero for a free slot.
    pub uuid: [u8; 16],
    /// Label, NUL padded.
    pub label: [u8; 32],
    /// Seconds since 1970 when first registered.
    pub first_reg: u32,
    /// Seconds since 1970 when last registered.
    pub last_reg: u32,
    /// Seconds since 1970 when its data was invalidated (detached).
    pub invalidated: u32,
    /// Flags; [`UUID_FLASH_ONLY`].
    pub flags: u32,
    /// Size in sectors of a flash-only volume, or of a device with no superblock.
    pub sectors: u64,
    /// A device with no superblock: its cache mode (bcache's `BDEV_CACHE_MODE` values, in
    /// what is padding to bcache).
    pub mode: u8,
    /// A device with no superblock: its state (bcache's `BDEV_STATE` values).
    pub state: u8,
}

impl UuidEntry {
    /// True for a flash-only volume.
    pub fn flash_only(&self) -> bool {
        self.flags & UUID_FLASH_ONLY != 0
    }

    /// The label as text (NUL padding dropped, bytes that are not UTF-8 replaced).
    pub fn label_text(&self) -> String {
        String::from_utf8_lossy(&self.label).trim_end_matches('\0').to_string()
    }

    /// True for a backing device cached without a superblock.
    pub fn no_superblock(&self) -> bool {
        self.flags & UUID_NO_SUPERBLOCK != 0
    }

    fn encode(&self, out: &mut [u8]) {
        out[..UUID_ENTRY_BYTES].fill(0);
        out[0..16].copy_from_slice(&self.uuid);
        out[16..48].copy_from_slice(&self.label);
        out[48..52].copy_from_slice(&self.first_reg.to_le_bytes());
        out[52..56].copy_from_slice(&self.last_reg.to_le_bytes());
        out[56..60].copy_from_slice(&self.invalidated.to_le_bytes());
        out[60..64].copy_from_slice(&self.flags.to_le_bytes());
        out[64..72].copy_from_slice(&self.sectors.to_le_bytes());
        out[72] = self.mode;
        out[73] = self.state;
    }

    fn decode(b: &[u8]) -> UuidEntry {
        let mut e = UuidEntry::default();
        e.uuid.copy_from_slice(&b[0..16]);
        e.label.copy_from_slice(&b[16..48]);
        e.first_reg = u32_at(b, 48);
        e.last_reg = u32_at(b, 52);
        e.invalidated = u32_at(b, 56);
        e.flags = u32_at(b, 60);
        e.sectors = u64_at(b, 64);
        e.mode = b[72];
        e.state = b[73];
        e
    }
}

/// Most entries a table in a bucket of `bucket_bytes` can hold.
pub fn capacity(bucket_bytes: usize) -> usize {
    bucket_bytes / UUID_ENTRY_BYTES - 1
}

/// Serializes the table into `out`, padded to `block_bytes`.
pub fn encode(
    entries: &[UuidEntry],
    set_magic: u64,
    seq: u64,
    bucket_bytes: usize,
    block_bytes: usize,
) -> Result<Vec<u8>> {
    if entries.len() > capacity(bucket_bytes) {
        return Err(Error::new(
            ErrorKind::NoSpace,
            format!("{} UUID entries; a bucket holds {}", entries.len(), capacity(bucket_bytes)),
        ));
    }
    let end = UUID_ENTRY_BYTES * (1 + entries.len());
    let mut out = vec![0u8; end.div_ceil(block_bytes) * block_bytes];
    out[8..16].copy_from_slice(&(set_magic ^ UUID_TABLE_MAGIC).to_le_bytes());
    out[16..24].copy_from_slice(&seq.to_le_bytes());
    out[24..28].copy_from_slice(&UUID_TABLE_VERSION.to_le_bytes());
    out[28..32].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        e.encode(&mut out[UUID_ENTRY_BYTES * (1 + i)..]);
    }
    let c = crc64(&out[8..end]);
    out[0..8].copy_from_slice(&c.to_le_bytes());
    Ok(out)
}

/// Bytes to read to get the header (the first block).
pub fn header_len(block_bytes: usize) -> usize {
    block_bytes
}

/// Entries the header at the start of `first_block` announces (0 if it is not a header).
pub fn announced(first_block: &[u8]) -> usize {
    u32_at(first_block, 28) as usize
}

/// Decodes a table written with `seq` from `buf` (the first blocks of its bucket); any
/// damage is an error naming the UUID table.
pub fn decode(buf: &[u8], set_magic: u64, seq: u64, bucket: u64) -> Result<Vec<UuidEntry>> {
    let bad = |m: String| Error::new(ErrorKind::Corrupt, format!("UUID table in bucket {bucket}: {m}"));
    if buf.len() < UUID_ENTRY_BYTES {
        return Err(bad("short read".into()));
    }
    if u64_at(buf, 8) != set_magic ^ UUID_TABLE_MAGIC {
        return Err(bad("bad magic".into()));
    }
    let nr = announced(buf);
    let end = UUID_ENTRY_BYTES * (1 + nr);
    if end > buf.len() {
        return Err(bad(format!("{nr} entries do not fit in {} bytes", buf.len())));
    }
    if crc64(&buf[8..end]) != u64_at(buf, 0) {
        return Err(bad("checksum mismatch".into()));
    }
    if u64_at(buf, 16) != seq {
        return Err(bad(format!("holds table {} where the journal expects {seq}", u64_at(buf, 16))));
    }
    Ok((0..nr).map(|i| UuidEntry::decode(&buf[UUID_ENTRY_BYTES * (1 + i)..])).collect())
}

/// `uuid` in the usual 8-4-4-4-12 hex form.
pub fn uuid_string(uuid: &[u8; 16]) -> String {
    let h: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_layout_and_damage() {
        let mut e =
            UuidEntry { uuid: [9; 16], first_reg: 5, flags: UUID_FLASH_ONLY, sectors: 1 << 30, ..Default::default() };
        e.label[..4].copy_from_slice(b"vol0");
        let existing = UuidEntry {
            uuid: [7; 16],
            flags: UUID_NO_SUPERBLOCK,
            sectors: 99,
            mode: 1,
            state: 2,
            ..Default::default()
        };
        let t = vec![UuidEntry::default(), e.clone(), existing];
        let buf = encode(&t, 77, 3, 8192, 4096).unwrap();
        assert_eq!(buf.len(), 4096);
        assert_eq!(&buf[256..272], &[9; 16], "entry 1 after the header and entry 0");
        assert_eq!(&buf[256 + 16..256 + 20], b"vol0");
        assert_eq!(u64::from_le_bytes(buf[256 + 64..256 + 72].try_into().unwrap()), 1 << 30);
        let d = decode(&buf, 77, 3, 1).unwrap();
        assert_eq!(d, t);
        assert!(d[1].flash_only());
        assert!(d[2].no_superblock() && !d[2].flash_only());
        assert_eq!((buf[384 + 60], buf[384 + 72], buf[384 + 73]), (2, 1, 2), "flags, mode, state");
        assert!(decode(&buf, 77, 4, 1).is_err(), "older table");
        let mut b = buf.clone();
        b[300] ^= 1;
        let err = decode(&b, 77, 3, 1).unwrap_err();
        assert!(err.message().contains("UUID table"), "{err}");
        assert_eq!(capacity(8192), 63);
        assert!(encode(&vec![UuidEntry::default(); 64], 77, 3, 8192, 4096).is_err());
    }
}
