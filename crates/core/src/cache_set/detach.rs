//! Detaching a cached device for good (bcache's `cached_dev_detach`): its dirty data is
//! written back, then what the cache holds of it is dropped and its slot in the UUID table
//! freed, so that nothing of it is read again, after a restart either.
//!
//! While it detaches, every request of the device bypasses the cache (as bcache's
//! `BCACHE_DEV_DETACHING`), so no new dirty data arrives, and writeback runs at full speed
//! even if paused, with no wait between passes. Once nothing is dirty, no writeback is on
//! its way and no write or fill of the device is in flight, the ranges it has cached are
//! dropped (recorded in the journal like a discard's) and the UUID table is written without
//! it; the caller's tag comes back from `take_events` when that table is durable. The
//! device then stays attached as a pass-through until the caller lets go of it
//! ([`super::CacheEngine::detach`]). A detach may be cancelled until its data is dropped.

use std::time::Instant;

use super::device::CachedDev;
use super::{CacheSet, SetState};
use crate::error::{Error, ErrorKind, Result};
use crate::index::{ScanFilter, ScanPos};

/// Keys a scan for the device's cached ranges hands out at a time.
const SCAN_BATCH: usize = 256;

/// Where a detach stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Detach {
    /// Writing dirty data back; `tag` comes back when it is done.
    WritingBack { tag: u64 },
    /// The data is dropped and the UUID table without the device is on its way.
    Recording,
    /// Detached: requests go straight to the backing device.
    Done,
}

impl CacheSet {
    /// Begins detaching cached device `inode`; `tag` comes back from
    /// [`CacheSet::take_events`] once it is detached (or with the error that stopped it).
    pub fn detach_begin(&mut self, tag: u64, inode: u32) -> Result<()> {
        if self.state != SetState::Running {
            return Err(Error::new(ErrorKind::Closed, format!("cache set is {:?}: cannot detach", self.state)));
        }
        let d = self.dev_mut(inode)?;
        if d.flash {
            return Err(super::volume::flash_refuses(inode, "detach"));
        }
        if d.detach.is_some() {
            return Err(Error::new(ErrorKind::Busy, format!("cached device {inode} is already detaching")));
        }
        d.detach = Some(Detach::WritingBack { tag });
        d.wb.reschedule();
        self.detach_progress();
        Ok(())
    }

    /// Stops a detach still writing back: writeback goes back to its tunables, requests use
    /// the cache again, and the detach's tag comes back with `Closed`. `Busy` once its data
    /// was dropped.
    pub fn detach_cancel(&mut self, inode: u32) -> Result<()> {
        let d = self.dev_mut(inode)?;
        match d.detach {
            Some(Detach::WritingBack { tag }) => {
                d.detach = None;
                d.wb.reschedule();
                let e = Error::new(ErrorKind::Closed, format!("detach of cached device {inode} cancelled"));
                self.events.push((tag, Err(e)));
                Ok(())
            }
            Some(_) => Err(Error::new(ErrorKind::Busy, format!("cached device {inode} is detached already"))),
            None => Err(Error::new(ErrorKind::InvalidArgument, format!("cached device {inode} is not detaching"))),
        }
    }

    /// The tag of `d`'s detach if it can finish now: nothing dirty, no writeback on its way,
    /// no write or fill in flight (either could still add keys).
    fn detach_finishing(&self, d: &CachedDev) -> Option<u64> {
        match d.detach {
            Some(Detach::WritingBack { tag })
                if self.index.dirty_sectors(d.inode) == 0 && d.wb.idle() && !self.reqs.writes_or_fills_for(d.inode) =>
            {
                Some(tag)
            }
            _ => None,
        }
    }

    /// Finishes the detaches that may finish.
    pub(crate) fn detach_progress(&mut self) {
        if self.state != SetState::Running {
            return;
        }
        let ready: Vec<(u32, u64)> =
            self.devs.iter().flatten().filter_map(|d| Some((d.inode, self.detach_finishing(d)?))).collect();
        for (inode, tag) in ready {
            self.detach_finish(inode, tag);
        }
    }

    /// Drops what the cache holds of `inode` and frees its UUID slot.
    fn detach_finish(&mut self, inode: u32, tag: u64) {
        // The runs the device has cached, then each dropped and recorded.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut keys = Vec::new();
        let mut pos = Some(ScanPos { inode, offset: 0 });
        while let Some(p) = pos.filter(|p| p.inode == inode) {
            pos = self.index.scan(p, ScanFilter::All, SCAN_BATCH, &self.alloc, &mut keys);
            for k in keys.drain(..).filter(|k| k.inode == inode) {
                match runs.last_mut() {
                    Some((s, l)) if *s + *l == k.start => *l += k.size,
                    _ => runs.push((k.start, k.size)),
                }
            }
        }
        for (s, l) in runs {
            self.invalidate_range(inode, s, l);
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as u32);
        let mut table = self.meta.latest_uuids().to_vec();
        if let Some(e) = table.get_mut(inode as usize) {
            *e = crate::uuids::UuidEntry { invalidated: now, ..Default::default() };
        }
        if let Ok(d) = self.dev_mut(inode) {
            d.detach = Some(Detach::Recording);
        }
        self.uuid_write(table, Some((tag, inode)));
    }

    /// The UUID table without `inode` is durable: the detach is done.
    pub(crate) fn detach_recorded(&mut self, inode: u32) {
        if let Ok(d) = self.dev_mut(inode) {
            if d.detach == Some(Detach::Recording) {
                d.detach = Some(Detach::Done);
            }
        }
    }

    /// The set closes or fails: detaches still writing back end with `e`.
    pub(crate) fn detach_abort_all(&mut self, e: &Error) {
        for d in self.devs.iter_mut().flatten() {
            if let Some(Detach::WritingBack { tag }) = d.detach {
                d.detach = None;
                self.events.push((tag, Err(e.clone())));
            }
        }
    }

    /// When a detach can finish (None: none can yet).
    pub(crate) fn detach_deadline(&self) -> Option<Instant> {
        let ready = self.devs.iter().flatten().any(|d| self.detach_finishing(d).is_some());
        (self.state == SetState::Running && ready).then(Instant::now)
    }
}
