//! Backing devices cached as they are, with no bcache superblock (Open CAS's "core"
//! devices): their data starts at offset 0 and nothing but their own data is ever written to
//! them, so what a backing superblock would record (size, cache mode, state) lives in the
//! device's UUID-table entry instead, flagged [`UUID_NO_SUPERBLOCK`]. See docs/format.md,
//! "UUID table".

use super::{CacheMode, CacheSet, CachedDevConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::uuids::{self, UuidEntry, UUID_NO_SUPERBLOCK};

/// bcache's `BDEV_STATE_CLEAN`: attached, nothing dirty.
const STATE_CLEAN: u8 = 1;
/// bcache's `BDEV_STATE_DIRTY`: the set holds data the device lacks.
const STATE_DIRTY: u8 = 2;
/// bcache's states run `none`, `clean`, `dirty`, `stale`.
const STATE_MAX: u8 = 3;

/// Refusals of an attach of `cfg` (`sectors` long) whose UUID the table holds as `entry`:
/// a device with a superblock never takes over an entry of one without (or the other way
/// round), and a device without one must be the size its entry recorded, the one check
/// left that it is the same device.
pub(crate) fn check_attach(entry: Option<&UuidEntry>, cfg: &CachedDevConfig, sectors: u64) -> Result<()> {
    let path = cfg.device.path().display();
    if cfg.no_superblock && cfg.data_offset != 0 {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("{path}: a device cached without a superblock has its data at offset 0, not {}", cfg.data_offset),
        ));
    }
    let Some(e) = entry else { return Ok(()) };
    let uuid = uuids::uuid_string(&cfg.uuid);
    if e.no_superblock() != cfg.no_superblock {
        let (was, now) = if e.no_superblock() { ("without", "with") } else { ("with", "without") };
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "{path}: UUID {uuid} names a device this set caches {was} a superblock; it cannot attach {now} one"
            ),
        ));
    }
    if cfg.no_superblock && e.sectors != sectors {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "{path}: {} bytes, but the cache set recorded {} bytes for UUID {uuid}: not the device it caches (detach a device before resizing it)",
                sectors * 512,
                e.sectors * 512
            ),
        ));
    }
    Ok(())
}

/// The UUID-table entry of a device first attached without a superblock at `now`.
pub(crate) fn new_entry(cfg: &CachedDevConfig, sectors: u64, now: u32) -> UuidEntry {
    UuidEntry {
        uuid: cfg.uuid,
        label: cfg.label,
        first_reg: now,
        last_reg: now,
        flags: UUID_NO_SUPERBLOCK,
        sectors,
        mode: cfg.mode.number(),
        state: STATE_CLEAN,
        ..Default::default()
    }
}

impl CacheSet {
    /// The backing devices the UUID table records as cached without a superblock, with
    /// their slots, attached or not.
    pub fn existing_devices(&self) -> Vec<(u32, UuidEntry)> {
        let table = self.meta.latest_uuids();
        table
            .iter()
            .enumerate()
            .filter(|(_, u)| u.no_superblock() && u.uuid != [0; 16])
            .map(|(i, u)| (i as u32, u.clone()))
            .collect()
    }

    /// Records the cache mode and state (bcache's `BDEV_STATE` number) of the attached
    /// device `inode`, which has no superblock to hold them; `tag` comes back with the
    /// inode once the UUID table saying so is durable. A device detaching for good has its
    /// entry freed instead: nothing to record, `tag` comes back at once.
    pub fn record_entry(&mut self, tag: u64, inode: u32, mode: CacheMode, state: u8) {
        let r = self.record_entry_checks(inode, state);
        match r {
            Err(e) => self.events.push((tag, Err(e))),
            Ok(false) => self.events.push((tag, Ok(inode))),
            Ok(true) => {
                let mut table = self.meta.latest_uuids().to_vec();
                let e = &mut table[inode as usize];
                e.mode = mode.number();
                e.state = state;
                self.uuid_write(table, Some((tag, inode)));
            }
        }
    }

    /// At a clean close, once nothing moves: records `dirty` or `clean` in the entry of each
    /// attached device with no superblock, as its dirty data says (bcache writes a backing
    /// superblock's state so at a stop). True if a UUID-table write went out for it.
    pub(crate) fn record_final_states(&mut self) -> bool {
        let mut table = self.meta.latest_uuids().to_vec();
        let mut changed = false;
        for d in self.devs.iter().flatten() {
            let Some(e) = table.get_mut(d.inode as usize) else { continue };
            if !e.no_superblock() || d.detach.is_some() {
                continue;
            }
            let state = if self.index.dirty_sectors(d.inode) > 0 { STATE_DIRTY } else { STATE_CLEAN };
            if e.state != state {
                e.state = state;
                changed = true;
            }
        }
        if changed {
            self.uuid_write(table, None);
        }
        changed
    }

    /// Whether the entry of `inode` can take a record (false: being freed by a detach).
    fn record_entry_checks(&self, inode: u32, state: u8) -> Result<bool> {
        self.check_open("record a device's state")?;
        if state > STATE_MAX {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("backing state {state}: expected 0..={STATE_MAX}"),
            ));
        }
        let d = self.dev(inode)?;
        if d.detach.is_some() {
            return Ok(false);
        }
        match self.meta.latest_uuids().get(inode as usize) {
            Some(e) if e.no_superblock() => Ok(true),
            _ => Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("cached device {inode} has a superblock: its state is recorded there"),
            )),
        }
    }
}
