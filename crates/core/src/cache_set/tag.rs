//! What an I/O the cache set issued belongs to, packed into the request's `user_data` so
//! its completion finds its way back without a lookup table.

/// The owner of one I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tag {
    /// Part `part` of user request `req` (a read, write, flush or discard of a cached device).
    Part { req: u32, part: u32 },
    /// Piece `piece` of the cache write of read-miss fill `fill`.
    Fill { fill: u32, piece: u32 },
    /// The journal writer's entry write or the flush around it.
    Journal,
    /// Link `link` of the prio chain being written.
    Prio { link: u32 },
    /// The UUID table being written.
    Uuid,
    /// A bucket of the checkpoint being written.
    Checkpoint,
    /// The cache device's superblock.
    Super,
    /// A bucket discarded on its way to the free lists.
    BucketDiscard { bucket: u32 },
    /// Flush number `n` of cached device `inode`'s backing device.
    BackingFlush { inode: u32, n: u32 },
    /// Writeback I/O `io`: its cache read, or (`write`) its backing write.
    Writeback { io: u32, write: bool },
    /// Moving GC's cache read of move `io`.
    MoveRead { io: u32 },
    /// Piece `piece` of moving GC's cache write of move `io`.
    MoveWrite { io: u32, piece: u32 },
}

const KIND_SHIFT: u32 = 56;
const A_SHIFT: u32 = 24;
const A_MASK: u64 = (1 << 32) - 1;
const B_MASK: u64 = (1 << 24) - 1;

impl Tag {
    /// The `user_data` word.
    pub fn encode(self) -> u64 {
        let (kind, a, b) = match self {
            Tag::Part { req, part } => (1, req, part),
            Tag::Fill { fill, piece } => (2, fill, piece),
            Tag::Journal => (3, 0, 0),
            Tag::Prio { link } => (4, link, 0),
            Tag::Uuid => (5, 0, 0),
            Tag::Checkpoint => (6, 0, 0),
            Tag::Super => (7, 0, 0),
            Tag::BucketDiscard { bucket } => (8, bucket, 0),
            Tag::BackingFlush { inode, n } => (9, inode, n & B_MASK as u32),
            Tag::Writeback { io, write } => (10, io, u32::from(write)),
            Tag::MoveRead { io } => (11, io, 0),
            Tag::MoveWrite { io, piece } => (12, io, piece),
        };
        debug_assert!(u64::from(b) <= B_MASK);
        ((kind as u64) << KIND_SHIFT) | (u64::from(a) << A_SHIFT) | (u64::from(b) & B_MASK)
    }

    /// The tag a `user_data` word carries; None for a word the set never issued.
    pub fn decode(w: u64) -> Option<Tag> {
        let (a, b) = (((w >> A_SHIFT) & A_MASK) as u32, (w & B_MASK) as u32);
        Some(match w >> KIND_SHIFT {
            1 => Tag::Part { req: a, part: b },
            2 => Tag::Fill { fill: a, piece: b },
            3 => Tag::Journal,
            4 => Tag::Prio { link: a },
            5 => Tag::Uuid,
            6 => Tag::Checkpoint,
            7 => Tag::Super,
            8 => Tag::BucketDiscard { bucket: a },
            9 => Tag::BackingFlush { inode: a, n: b },
            10 => Tag::Writeback { io: a, write: b != 0 },
            11 => Tag::MoveRead { io: a },
            12 => Tag::MoveWrite { io: a, piece: b },
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip() {
        for t in [
            Tag::Part { req: u32::MAX, part: B_MASK as u32 },
            Tag::Part { req: 0, part: 0 },
            Tag::Fill { fill: 7, piece: 3 },
            Tag::Journal,
            Tag::Prio { link: 12 },
            Tag::Uuid,
            Tag::Checkpoint,
            Tag::Super,
            Tag::BucketDiscard { bucket: 1 << 31 },
            Tag::BackingFlush { inode: 3, n: 77 },
            Tag::Writeback { io: 9, write: true },
            Tag::Writeback { io: u32::MAX, write: false },
            Tag::MoveRead { io: 5 },
            Tag::MoveWrite { io: u32::MAX, piece: 3 },
        ] {
            assert_eq!(Tag::decode(t.encode()), Some(t));
        }
        assert_eq!(Tag::decode(0), None);
        assert_eq!(Tag::decode(u64::MAX), None);
    }
}
