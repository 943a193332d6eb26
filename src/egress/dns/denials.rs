//! The recent denials `status` shows: a fixed number of slots, reused in place. A repeated
//! denial finds its slot through a hash index; a new one takes the slot the clock hand points to
//! (second chance: a slot denied again since the hand last passed is skipped once), so eviction
//! is O(1) amortized and a flood of unique names allocates nothing once the table is full (each
//! slot's name buffer is reused; it grows only for a name longer than any it held).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::time::SystemTime;

struct Slot {
    name: String,
    qtype: u16,
    count: u64,
    last: SystemTime,
    /// Denied again since the clock hand last passed: spared once.
    referenced: bool,
}

pub(crate) struct Denials {
    slots: Vec<Slot>,
    /// Hash of (name, type) to slot. A hash shared by two pairs points to one of them; the
    /// other's slot is then found by no one and ages out.
    index: HashMap<u64, usize>,
    hand: usize,
    capacity: usize,
    hasher: std::collections::hash_map::RandomState,
}

impl Denials {
    pub(crate) fn new(capacity: usize) -> Denials {
        let capacity = capacity.max(1);
        Denials {
            slots: Vec::with_capacity(capacity),
            index: HashMap::with_capacity(capacity),
            hand: 0,
            capacity,
            hasher: Default::default(),
        }
    }

    fn key(&self, name: &str, qtype: u16) -> u64 {
        self.hasher.hash_one((name, qtype))
    }

    /// Counts a denial of `name` for `qtype` at `now`; returns its count so far.
    pub(crate) fn deny(&mut self, name: &str, qtype: u16, now: SystemTime) -> u64 {
        let key = self.key(name, qtype);
        if let Some(&i) = self.index.get(&key) {
            let slot = &mut self.slots[i];
            if slot.qtype == qtype && slot.name == name {
                slot.count += 1;
                slot.last = now;
                slot.referenced = true;
                return slot.count;
            }
        }
        let i = if self.slots.len() < self.capacity {
            self.slots.push(Slot { name: String::new(), qtype, count: 0, last: now, referenced: false });
            self.slots.len() - 1
        } else {
            // Second chance: at most one full turn clears every mark, so this ends.
            while std::mem::take(&mut self.slots[self.hand].referenced) {
                self.hand = (self.hand + 1) % self.capacity;
            }
            let i = self.hand;
            self.hand = (self.hand + 1) % self.capacity;
            let old = self.key(&self.slots[i].name, self.slots[i].qtype);
            if self.index.get(&old) == Some(&i) {
                self.index.remove(&old);
            }
            i
        };
        let slot = &mut self.slots[i];
        slot.name.clear();
        slot.name.push_str(name);
        slot.qtype = qtype;
        slot.count = 1;
        slot.last = now;
        slot.referenced = false;
        self.index.insert(key, i);
        1
    }

    /// Every slot in use: (name, type, count, last).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, u16, u64, SystemTime)> {
        self.slots.iter().map(|s| (s.name.as_str(), s.qtype, s.count, s.last))
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_repeated_denial_counts_in_its_own_slot() {
        let mut d = Denials::new(4);
        let t = SystemTime::UNIX_EPOCH;
        assert_eq!(d.deny("a.test.", 1, t), 1);
        assert_eq!(d.deny("a.test.", 1, t), 2);
        assert_eq!(d.deny("a.test.", 28, t), 1, "another type is another denial");
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn a_full_table_evicts_the_oldest_unrepeated_denial_and_keeps_its_size() {
        let mut d = Denials::new(3);
        let t = SystemTime::UNIX_EPOCH;
        for n in ["a.", "b.", "c."] {
            d.deny(n, 1, t);
        }
        d.deny("a.", 1, t + Duration::from_secs(1)); // a is spared once
        d.deny("d.", 1, t);
        let names: Vec<&str> = d.iter().map(|(n, ..)| n).collect();
        assert_eq!(names, ["a.", "d.", "c."], "b, the oldest not denied again, made room");
        for i in 0..10_000 {
            d.deny(&format!("f{i}.flood."), 1, t);
        }
        assert_eq!(d.len(), 3);
        assert_eq!(d.index.len(), 3);
        assert_eq!(d.deny("f9999.flood.", 1, t), 2, "the newest is still counted");
    }
}
