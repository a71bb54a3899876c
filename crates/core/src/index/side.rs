//! Side table for the rare keys a leaf word cannot hold: several pointers (replicas on
//! several cache devices) or a data checksum. Each such extent owns one slot; cutting an
//! extent in two gives the second piece a copy.

use super::key::{Ptr, KEY_PTRS_MAX};

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SideEntry {
    nptrs: u8,
    ptrs: [Ptr; KEY_PTRS_MAX],
    pub crc: Option<u64>,
}

impl SideEntry {
    pub fn new(ptrs: &[Ptr], crc: Option<u64>) -> SideEntry {
        let mut e = SideEntry { nptrs: ptrs.len() as u8, ptrs: [ptrs[0]; KEY_PTRS_MAX], crc };
        e.ptrs[..ptrs.len()].copy_from_slice(ptrs);
        e
    }

    #[inline]
    pub fn ptrs(&self) -> &[Ptr] {
        &self.ptrs[..self.nptrs as usize]
    }

    /// Moves every pointer `sectors` further into its extent.
    pub fn advance(&mut self, sectors: u64) {
        for p in &mut self.ptrs[..self.nptrs as usize] {
            *p = p.advance(sectors);
        }
    }

    /// Drops the pointers `stale` says are dead; returns how many are left.
    pub fn retain_live(&mut self, mut stale: impl FnMut(Ptr) -> bool) -> usize {
        let mut n = 0;
        for i in 0..self.nptrs as usize {
            if !stale(self.ptrs[i]) {
                self.ptrs[n] = self.ptrs[i];
                n += 1;
            }
        }
        self.nptrs = n as u8;
        n
    }
}

#[derive(Default)]
pub(crate) struct SideTable {
    slots: Vec<Option<SideEntry>>,
    free: Vec<u32>,
    /// Checksums dropped because the extent they covered was cut.
    pub crcs_dropped: u64,
}

impl SideTable {
    pub fn alloc(&mut self, e: SideEntry) -> u32 {
        if let Some(slot) = self.free.pop() {
            self.slots[slot as usize] = Some(e);
            return slot;
        }
        let slot = u32::try_from(self.slots.len()).expect("extent index: side table full");
        self.slots.push(Some(e));
        slot
    }

    pub fn free(&mut self, slot: u32) {
        debug_assert!(self.slots[slot as usize].is_some());
        self.slots[slot as usize] = None;
        self.free.push(slot);
    }

    #[inline]
    pub fn get(&self, slot: u32) -> &SideEntry {
        self.slots[slot as usize].as_ref().expect("extent index: side slot in use")
    }

    #[inline]
    pub fn get_mut(&mut self, slot: u32) -> &mut SideEntry {
        self.slots[slot as usize].as_mut().expect("extent index: side slot in use")
    }

    /// Slots in use.
    pub fn live(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    pub fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Option<SideEntry>>() + self.free.capacity() * 4
    }
}
