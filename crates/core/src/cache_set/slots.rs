//! Things in flight by number: a slot's number is what an I/O's tag carries, so a
//! completion finds its owner without a lookup; freed numbers are reused first.

pub(crate) struct Slots<T> {
    slots: Vec<Option<T>>,
    free: Vec<u32>,
    live: usize,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Slots { slots: Vec::new(), free: Vec::new(), live: 0 }
    }
}

impl<T> Slots<T> {
    /// Takes a slot for `v`; returns its number.
    pub fn insert(&mut self, v: T) -> u32 {
        self.live += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(v);
                i
            }
            None => {
                self.slots.push(Some(v));
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// Frees slot `i`, returning what it held (which must be there).
    pub fn remove(&mut self, i: u32) -> T {
        let v = self.slots[i as usize].take().expect("a live slot");
        self.live -= 1;
        self.free.push(i);
        v
    }

    /// What slot `i` holds, if it is live.
    pub fn get(&self, i: u32) -> Option<&T> {
        self.slots.get(i as usize).and_then(Option::as_ref)
    }

    /// What slot `i` holds, if it is live.
    pub fn get_mut(&mut self, i: u32) -> Option<&mut T> {
        self.slots.get_mut(i as usize).and_then(Option::as_mut)
    }

    /// Live slots.
    pub fn len(&self) -> usize {
        self.live
    }

    /// What the live slots hold.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().flatten()
    }
}
