//! Flash-only volumes (bcache's `flash_dev`): thin volumes that live only in the cache,
//! each an entry of the UUID table with `UUID_FLASH_ONLY` and its size, its keys under
//! that entry's inode like a cached device's.
//!
//! A volume serves requests like a cached device in writeback mode with nowhere to write
//! back to: writes go to new cache space as dirty data (never in place, never around the
//! cache: bypass does not apply), reads of what was never written (or was discarded) are
//! zeros, a flush makes the journal durable, a discard drops the range. Writeback never
//! runs for it and its mode cannot change. Space is thin: nothing is reserved; a write
//! that waits for space asks for a GC pass, and fails with `NoSpace` once a pass that
//! ended since it began waiting finds the set past `CUTOFF_CACHE_ADD` (95% of the buckets
//! in use; discards since the last pass may have freed space). Its dirty data counts towards bcache's writeback
//! cutoffs, as bcache counts flash-only dirty data.

use super::device::{CacheMode, CachedDev};
use super::CacheSet;
use crate::error::{Error, ErrorKind, Result};
use crate::io::DevId;
use crate::uuids::{self, UuidEntry, UUID_FLASH_ONLY};

/// The backing device a volume does not have.
pub(crate) const NO_BACKING: DevId = DevId(u32::MAX);

/// The error for an operation a flash-only volume does not have.
pub(crate) fn flash_refuses(inode: u32, what: &str) -> Error {
    Error::new(ErrorKind::InvalidArgument, format!("{inode} is a flash-only volume: it has no {what}"))
}

impl CacheSet {
    /// The flash-only volumes of the UUID table: (inode, entry).
    pub fn volumes(&self) -> Vec<(u32, UuidEntry)> {
        self.meta
            .latest_uuids()
            .iter()
            .enumerate()
            .filter(|(_, u)| u.flash_only() && u.uuid != [0; 16])
            .map(|(i, u)| (i as u32, u.clone()))
            .collect()
    }

    /// Creates a flash-only volume of `sectors` named by `uuid` (bcache's
    /// `bch_flash_dev_create`) and attaches it; `tag` comes back from
    /// [`CacheSet::take_events`] with its inode once the UUID table recording it is
    /// durable.
    pub fn create_volume(&mut self, tag: u64, uuid: [u8; 16], label: [u8; 32], sectors: u64) {
        if let Err(e) = self.volume_checks(uuid, sectors) {
            return self.events.push((tag, Err(e)));
        }
        let mut table = self.meta.latest_uuids().to_vec();
        if table.iter().any(|u| u.uuid == uuid) {
            let e = Error::new(
                ErrorKind::InvalidArgument,
                format!("UUID {} is already in the set's UUID table", uuids::uuid_string(&uuid)),
            );
            return self.events.push((tag, Err(e)));
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as u32);
        let e = UuidEntry {
            uuid,
            label,
            first_reg: now,
            last_reg: now,
            flags: UUID_FLASH_ONLY,
            sectors,
            ..Default::default()
        };
        let inode = match table.iter().position(|u| u.uuid == [0; 16]) {
            Some(free) => {
                table[free] = e;
                free
            }
            None if table.len() >= uuids::capacity(self.geo.bucket_bytes).min(crate::index::KEY_INODE_MAX as usize) => {
                return self.events.push((tag, Err(Error::new(ErrorKind::NoSpace, "the UUID table is full"))));
            }
            None => {
                table.push(e);
                table.len() - 1
            }
        };
        // A slot freed by a detach may still hold keys of the device it had, dropped by
        // then (a detach drops them before it frees the slot).
        self.volume_attach_slot(inode as u32, sectors);
        self.uuid_write(table, Some((tag, inode as u32)));
    }

    /// Attaches the flash-only volume named `uuid` (after a restart, as bcache registers
    /// them with their set); `tag` comes back with its inode at once.
    pub fn attach_volume(&mut self, tag: u64, uuid: [u8; 16]) {
        let found = self.volumes().into_iter().find(|(_, u)| u.uuid == uuid);
        let r = match found {
            None => Err(Error::new(
                ErrorKind::NotFound,
                format!("no flash-only volume {} in this cache set", uuids::uuid_string(&uuid)),
            )),
            Some(_) if self.failed_error().is_some() => Err(self.failed_error().expect("failed")),
            Some((inode, _)) if self.devs.get(inode as usize).is_some_and(Option::is_some) => {
                Err(Error::new(ErrorKind::Busy, format!("flash-only volume {inode} is already attached")))
            }
            Some((inode, e)) => {
                self.volume_attach_slot(inode, e.sectors);
                Ok(inode)
            }
        };
        self.events.push((tag, r));
    }

    fn volume_checks(&self, uuid: [u8; 16], sectors: u64) -> Result<()> {
        self.check_open("create a volume")?;
        if uuid == [0; 16] {
            return Err(Error::new(ErrorKind::InvalidArgument, "a volume's UUID cannot be all zeros"));
        }
        let block = u64::from(self.geo.sb.block_size);
        if sectors == 0 || !sectors.is_multiple_of(block) || sectors > crate::index::KEY_OFFSET_MAX {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "a volume of {sectors} sectors: it must be a positive whole number of {block}-sector blocks, at most {} sectors",
                    crate::index::KEY_OFFSET_MAX
                ),
            ));
        }
        Ok(())
    }

    fn volume_attach_slot(&mut self, inode: u32, sectors: u64) {
        let i = inode as usize;
        if self.devs.len() <= i {
            self.devs.resize_with(i + 1, || None);
        }
        let wb = super::writeback::WritebackConfig { running: false, ..Default::default() };
        let d = CachedDev::new(inode, NO_BACKING, 0, sectors, u64::from(self.geo.sb.block_size), CacheMode::Writeback);
        self.devs[i] = Some(CachedDev { wb: super::writeback::Writeback::new(wb), flash: true, ..d });
    }
}
