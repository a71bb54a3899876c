//! Fixed-capacity ring of bucket numbers, the shape of bcache's free lists and `free_inc`.

/// A FIFO of bucket indices holding at most `capacity` entries.
#[derive(Clone, Debug)]
pub(crate) struct Fifo {
    buf: Box<[u32]>,
    mask: usize,
    head: usize,
    len: usize,
    cap: usize,
}

impl Fifo {
    pub fn new(cap: usize) -> Fifo {
        // The ring is a power of two so wrapping is a mask; `cap` still bounds the length.
        let size = cap.max(1).next_power_of_two();
        Fifo { buf: vec![0; size].into_boxed_slice(), mask: size - 1, head: 0, len: 0, cap }
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn capacity(&self) -> usize {
        self.cap
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn is_full(&self) -> bool {
        self.len >= self.cap
    }

    #[inline]
    pub fn push(&mut self, v: u32) -> bool {
        if self.is_full() {
            return false;
        }
        self.buf[(self.head + self.len) & self.mask] = v;
        self.len += 1;
        true
    }

    #[inline]
    pub fn pop(&mut self) -> Option<u32> {
        if self.len == 0 {
            return None;
        }
        let v = self.buf[self.head];
        self.head = (self.head + 1) & self.mask;
        self.len -= 1;
        Some(v)
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).map(move |i| self.buf[(self.head + i) & self.mask])
    }
}

#[cfg(test)]
mod tests {
    use super::Fifo;

    #[test]
    fn wraps_and_respects_capacity() {
        let mut f = Fifo::new(3);
        assert!(f.push(1) && f.push(2) && f.push(3));
        assert!(!f.push(4));
        assert_eq!(f.pop(), Some(1));
        assert!(f.push(4));
        assert_eq!(f.iter().collect::<Vec<_>>(), vec![2, 3, 4]);
        assert_eq!((f.pop(), f.pop(), f.pop(), f.pop()), (Some(2), Some(3), Some(4), None));
        assert!(f.is_empty());
    }

    #[test]
    fn zero_capacity_is_always_full() {
        let mut f = Fifo::new(0);
        assert!(f.is_full() && !f.push(1) && f.pop().is_none());
    }
}
