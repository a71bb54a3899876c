//! The 64-bit word a leaf keeps for each extent.
//!
//! For the common key (one pointer, no checksum) the word is the pointer itself, in
//! bcache's `ptr[]` layout, with the dirty flag in bit 63 (which bcache leaves unused).
//! Two device numbers no cache device can have mark the other cases, the way bcache marks
//! its check keys with `PTR_CHECK_DEV`:
//! - device 0xfff: a placeholder for a read miss in flight, bits 0..51 hold its ticket;
//! - device 0xffe: a key with several pointers or a checksum, bits 0..51 index the side
//!   table that holds them.

use super::key::{Ptr, PTR_DEV_MASK, PTR_DEV_SHIFT};

pub(crate) const DIRTY: u64 = 1 << 63;
const DEV_PLACEHOLDER: u64 = 0xfff;
const DEV_INDIRECT: u64 = 0xffe;
const PAYLOAD_MASK: u64 = (1 << PTR_DEV_SHIFT) - 1;
/// Tickets are 51-bit counters.
pub(crate) const TICKET_MASK: u64 = PAYLOAD_MASK;

/// What a word describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Word {
    Direct(Ptr),
    Placeholder(u64),
    Indirect(u32),
}

#[inline(always)]
pub(crate) fn decode(w: u64) -> Word {
    match (w >> PTR_DEV_SHIFT) & PTR_DEV_MASK {
        DEV_PLACEHOLDER => Word::Placeholder(w & PAYLOAD_MASK),
        DEV_INDIRECT => Word::Indirect((w & PAYLOAD_MASK) as u32),
        // A direct word is a pointer (device < 256) plus the dirty bit.
        _ => Word::Direct(Ptr::from_bits(w & !DIRTY)),
    }
}

#[inline(always)]
pub(crate) fn is_dirty(w: u64) -> bool {
    w & DIRTY != 0
}

#[inline(always)]
pub(crate) fn direct(ptr: Ptr, dirty: bool) -> u64 {
    ptr.raw() | if dirty { DIRTY } else { 0 }
}

#[inline(always)]
pub(crate) fn placeholder(ticket: u64) -> u64 {
    (DEV_PLACEHOLDER << PTR_DEV_SHIFT) | (ticket & TICKET_MASK)
}

#[inline(always)]
pub(crate) fn indirect(slot: u32, dirty: bool) -> u64 {
    (DEV_INDIRECT << PTR_DEV_SHIFT) | slot as u64 | if dirty { DIRTY } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_decode_to_what_was_encoded() {
        let p = Ptr::new(255, (1 << 43) - 1, 255).unwrap();
        assert_eq!(decode(direct(p, false)), Word::Direct(p));
        assert_eq!(decode(direct(p, true)), Word::Direct(p));
        assert!(is_dirty(direct(p, true)) && !is_dirty(direct(p, false)));
        assert_eq!(decode(placeholder(TICKET_MASK)), Word::Placeholder(TICKET_MASK));
        assert!(!is_dirty(placeholder(TICKET_MASK)));
        assert_eq!(decode(indirect(u32::MAX, true)), Word::Indirect(u32::MAX));
        assert!(is_dirty(indirect(7, true)));
    }
}
