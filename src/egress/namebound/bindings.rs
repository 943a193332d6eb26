//! Which names cordon's DNS answered with which addresses, and until when: the evidence that a
//! connection's name (SNI or HTTP host) belongs with its destination address.
//!
//! The DNS answer path calls [`Bindings::bind`] for the query name and every name of its CNAME
//! chain, with each answered address and the admission's end; the proxy calls
//! [`Bindings::is_bound`]. Memory is bounded: at `capacity` bindings the oldest-refreshed one is
//! evicted first (expired ones too, as they are met). Lookups are a hash of the name plus a
//! short scan of that name's few addresses.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use compact_str::CompactString;

/// Far more (name, address) pairs than an agent's allowlisted names resolve to in an admission
/// lifetime; about 90 bytes each (a 56-byte table slot with the name, a 32-byte eviction queue
/// entry) and the tables' spare room.
pub const DEFAULT_CAPACITY: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Slot {
    ip: IpAddr,
    /// When it ends, in whole seconds since the table's `epoch`, rounded down (and `now` too,
    /// when compared): a binding may end up to a second early, never late.
    until: u32,
    /// The eviction queue entry that stands for this slot; older entries for it are stale. A
    /// u32 cannot wrap onto a live stale entry: the queue is compacted every `capacity` pushes.
    seq: u32,
}

/// A name's addresses. Most names have one, held inline in the table: no allocation per name
/// beyond the name itself (a `Vec` would reserve four slots on the first push).
#[derive(Debug, Clone)]
enum Slots {
    One(Slot),
    Many(Vec<Slot>),
}

impl Slots {
    fn as_slice(&self) -> &[Slot] {
        match self {
            Slots::One(slot) => std::slice::from_ref(slot),
            Slots::Many(slots) => slots,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [Slot] {
        match self {
            Slots::One(slot) => std::slice::from_mut(slot),
            Slots::Many(slots) => slots,
        }
    }

    fn push(&mut self, slot: Slot) {
        match self {
            Slots::One(first) => *self = Slots::Many(vec![*first, slot]),
            Slots::Many(slots) => slots.push(slot),
        }
    }

    /// Removes the slot at `at`; true when none is left.
    fn remove(&mut self, at: usize) -> bool {
        match self {
            Slots::One(_) => true,
            Slots::Many(slots) => {
                slots.swap_remove(at);
                if let [only] = slots[..] {
                    *self = Slots::One(only);
                }
                slots_empty(self)
            }
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }
}

fn slots_empty(slots: &Slots) -> bool {
    matches!(slots, Slots::Many(v) if v.is_empty())
}

#[derive(Debug, Default)]
struct Inner {
    /// A name up to 24 bytes (most) is held inline, in its table slot and its queue entries: no
    /// heap block per name (48 bytes as an `Arc<str>`). A longer one is allocated per copy.
    by_name: HashMap<CompactString, Slots>,
    /// Oldest first: (name, seq); the seq alone tells the name's slot. Entries whose seq no
    /// longer matches a slot are stale and skipped; the queue is compacted when stale entries
    /// pile up.
    queue: VecDeque<(CompactString, u32)>,
    len: usize,
    next_seq: u32,
}

/// Name to address bindings from cordon's DNS answers. Shared between the DNS server and the
/// proxy: cheap to clone through an `Arc`, internally locked.
#[derive(Debug)]
pub struct Bindings {
    inner: Mutex<Inner>,
    capacity: usize,
    /// What `Slot::until` counts from.
    epoch: Instant,
}

impl Bindings {
    pub fn new(capacity: usize) -> Self {
        Bindings { inner: Mutex::new(Inner::default()), capacity: capacity.max(1), epoch: Instant::now() }
    }

    /// `at` as whole seconds since the epoch, rounded down (saturating: u32 seconds is 136 years).
    fn secs(&self, at: Instant) -> u32 {
        u32::try_from(at.saturating_duration_since(self.epoch).as_secs()).unwrap_or(u32::MAX)
    }

    /// Records that cordon's DNS answered `name` with `ip`, valid until `until`. Already bound
    /// until later (or nearly as late): nothing changes and nothing is allocated. Refreshing an
    /// existing binding extends it in place and, when it was in the older half of its lifetime,
    /// moves it to the young end of the eviction order.
    pub fn bind(&self, name: &str, ip: IpAddr, until: Instant, now: Instant) {
        let canonical;
        let name = if is_canonical(name) {
            name
        } else {
            canonical = canonicalize(name);
            &canonical
        };
        let (until, now) = (self.secs(until), self.secs(now));
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *inner;
        if let Some(slots) = inner.by_name.get_mut(name)
            && let Some(slot) = slots.as_mut_slice().iter_mut().find(|slot| slot.ip == ip)
        {
            if until <= slot.until {
                return;
            }
            let remaining = slot.until.saturating_sub(now);
            let extension = until.saturating_sub(now);
            slot.until = until;
            if remaining < extension / 2 {
                inner.next_seq = inner.next_seq.wrapping_add(1);
                slot.seq = inner.next_seq;
                let key =
                    inner.by_name.get_key_value(name).map(|(key, _)| key.clone()).expect("the name was just found");
                inner.queue.push_back((key, inner.next_seq));
                self.compact(inner);
            }
            return;
        }
        while inner.len >= self.capacity {
            if !evict_oldest(inner) {
                break;
            }
        }
        inner.next_seq = inner.next_seq.wrapping_add(1);
        let slot = Slot { ip, until, seq: inner.next_seq };
        let key = match inner.by_name.get_mut(name) {
            Some(slots) => {
                slots.push(slot);
                inner.by_name.get_key_value(name).map(|(key, _)| key.clone()).expect("the name was just found")
            }
            None => {
                let key = CompactString::from(name);
                inner.by_name.insert(key.clone(), Slots::One(slot));
                key
            }
        };
        inner.queue.push_back((key, slot.seq));
        inner.len += 1;
        self.compact(inner);
    }

    /// Whether cordon's DNS answered `name` (canonical: lowercase, no trailing dot) with `ip`
    /// and that answer is still within its admission lifetime at `now`.
    pub fn is_bound(&self, name: &str, ip: IpAddr, now: Instant) -> bool {
        let now = self.secs(now);
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .by_name
            .get(name)
            .is_some_and(|slots| slots.as_slice().iter().any(|slot| slot.ip == ip && now < slot.until))
    }

    /// The addresses bound to `name` at `now`, in the order they were first answered.
    pub fn addresses_for(&self, name: &str, now: Instant) -> Vec<IpAddr> {
        let now = self.secs(now);
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .by_name
            .get(name)
            .map_or_else(Vec::new, |slots| slots.as_slice().iter().filter(|s| now < s.until).map(|s| s.ip).collect())
    }

    /// The names bound to `ip` at `now`, sorted (for `status why ADDRESS`). A scan of every
    /// binding: for a person's question, never on a connection's path.
    pub fn names_for(&self, ip: IpAddr, now: Instant) -> Vec<String> {
        let now = self.secs(now);
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<String> = inner
            .by_name
            .iter()
            .filter(|(_, slots)| slots.as_slice().iter().any(|s| s.ip == ip && now < s.until))
            .map(|(name, _)| name.to_string())
            .collect();
        names.sort();
        names
    }

    /// Forgets every binding of the names `keep` refuses (names a narrowing policy change
    /// removed), so the proxy refuses them at once. The eviction queue's entries for them
    /// become stale and are skipped.
    pub fn forget(&self, keep: impl Fn(&str) -> bool) -> usize {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<CompactString> = inner.by_name.keys().filter(|n| !keep(n)).cloned().collect();
        let mut forgotten = 0;
        for name in gone {
            if let Some(slots) = inner.by_name.remove(&name) {
                forgotten += slots.len();
            }
        }
        inner.len -= forgotten;
        forgotten
    }

    /// How many (name, address) bindings are held, expired ones not yet evicted included.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops stale queue entries once they outnumber live ones, so the queue stays O(capacity).
    fn compact(&self, inner: &mut Inner) {
        if inner.queue.len() <= 2 * self.capacity + 16 {
            return;
        }
        let by_name = &inner.by_name;
        inner.queue.retain(|(name, seq)| {
            by_name.get(name).is_some_and(|slots| slots.as_slice().iter().any(|s| s.seq == *seq))
        });
    }
}

/// Removes the binding at the old end of the queue. False when nothing is left to evict.
fn evict_oldest(inner: &mut Inner) -> bool {
    while let Some((name, seq)) = inner.queue.pop_front() {
        let Some(slots) = inner.by_name.get_mut(&name) else {
            continue;
        };
        let Some(at) = slots.as_slice().iter().position(|s| s.seq == seq) else {
            continue;
        };
        if slots.remove(at) {
            inner.by_name.remove(&name);
        }
        inner.len -= 1;
        return true;
    }
    false
}

fn is_canonical(name: &str) -> bool {
    !name.ends_with('.') && !name.bytes().any(|b| b.is_ascii_uppercase())
}

fn canonicalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_bound_name_matches_only_its_addresses_until_it_expires() {
        let bindings = Bindings::new(16);
        let now = Instant::now();
        let until = now + Duration::from_secs(60);
        bindings.bind("GitHub.com.", ip("192.0.2.1"), until, now);
        bindings.bind("github.com", ip("2001:db8::1"), until, now);
        assert!(bindings.is_bound("github.com", ip("192.0.2.1"), now));
        assert!(bindings.is_bound("github.com", ip("2001:db8::1"), now));
        assert!(!bindings.is_bound("github.com", ip("192.0.2.2"), now));
        assert!(!bindings.is_bound("gitlab.com", ip("192.0.2.1"), now));
        assert!(!bindings.is_bound("github.com", ip("192.0.2.1"), until));
        assert_eq!(bindings.len(), 2);
    }

    #[test]
    fn forgotten_names_are_no_longer_bound_and_the_rest_still_are() {
        let bindings = Bindings::new(4);
        let now = Instant::now();
        let until = now + Duration::from_secs(60);
        bindings.bind("gone.example", ip("192.0.2.1"), until, now);
        bindings.bind("gone.example", ip("192.0.2.2"), until, now);
        bindings.bind("kept.example", ip("192.0.2.1"), until, now);
        assert_eq!(bindings.forget(|n| n != "gone.example"), 2);
        assert!(!bindings.is_bound("gone.example", ip("192.0.2.1"), now));
        assert!(bindings.is_bound("kept.example", ip("192.0.2.1"), now));
        assert_eq!(bindings.len(), 1);
        // Capacity is counted right afterwards: stale queue entries are skipped on eviction.
        for i in 0..6 {
            bindings.bind(&format!("n{i}.example"), ip("192.0.2.9"), until, now);
        }
        assert_eq!(bindings.len(), 4);
    }

    #[test]
    fn names_for_an_address_are_the_live_bindings_only() {
        let bindings = Bindings::new(16);
        let now = Instant::now();
        let a = ip("192.0.2.1");
        bindings.bind("b.example", a, now + Duration::from_secs(60), now);
        bindings.bind("a.example", a, now + Duration::from_secs(60), now);
        bindings.bind("old.example", a, now + Duration::from_secs(1), now);
        bindings.bind("c.example", ip("192.0.2.2"), now + Duration::from_secs(60), now);
        assert_eq!(bindings.names_for(a, now + Duration::from_secs(2)), ["a.example", "b.example"]);
        assert!(bindings.names_for(ip("192.0.2.9"), now).is_empty());
    }

    #[test]
    fn a_binding_may_end_a_second_early_never_late() {
        let bindings = Bindings::new(4);
        let now = Instant::now();
        let a = ip("192.0.2.1");
        let until = now + Duration::from_millis(2500);
        bindings.bind("a.example", a, until, now);
        assert!(bindings.is_bound("a.example", a, now + Duration::from_millis(1000)));
        assert!(!bindings.is_bound("a.example", a, until));
        assert!(!bindings.is_bound("a.example", a, until + Duration::from_millis(1)));
        assert!(bindings.addresses_for("a.example", until).is_empty());
    }

    #[test]
    fn rebinding_extends_and_never_shortens() {
        let bindings = Bindings::new(16);
        let now = Instant::now();
        let a = ip("192.0.2.1");
        bindings.bind("a.example.com", a, now + Duration::from_secs(60), now);
        bindings.bind("a.example.com", a, now + Duration::from_secs(10), now);
        assert!(bindings.is_bound("a.example.com", a, now + Duration::from_secs(30)));
        bindings.bind("a.example.com", a, now + Duration::from_secs(600), now);
        assert!(bindings.is_bound("a.example.com", a, now + Duration::from_secs(300)));
        assert_eq!(bindings.len(), 1);
    }

    #[test]
    fn at_capacity_the_oldest_refreshed_binding_goes_first() {
        let bindings = Bindings::new(3);
        let now = Instant::now();
        let until = now + Duration::from_secs(60);
        bindings.bind("one.example", ip("192.0.2.1"), until, now);
        bindings.bind("two.example", ip("192.0.2.2"), until, now);
        bindings.bind("three.example", ip("192.0.2.3"), until, now);
        // "one" is refreshed late in its life: it becomes the youngest.
        let later = now + Duration::from_secs(50);
        bindings.bind("one.example", ip("192.0.2.1"), later + Duration::from_secs(60), later);
        bindings.bind("four.example", ip("192.0.2.4"), later + Duration::from_secs(60), later);
        assert_eq!(bindings.len(), 3);
        assert!(!bindings.is_bound("two.example", ip("192.0.2.2"), later));
        assert!(bindings.is_bound("one.example", ip("192.0.2.1"), later));
        assert!(bindings.is_bound("three.example", ip("192.0.2.3"), later));
        assert!(bindings.is_bound("four.example", ip("192.0.2.4"), later));
    }

    #[test]
    fn a_short_name_with_one_address_costs_a_table_slot_and_nothing_else() {
        let size = std::mem::size_of::<(CompactString, Slots)>();
        assert!(size <= 56, "{size}");
        let queued = std::mem::size_of::<(CompactString, u32)>();
        assert!(queued <= 32, "{queued}");
        assert!(!CompactString::from("files.pythonhosted.org").is_heap_allocated());
        assert!(CompactString::from("a123456789.b123456789.com").is_heap_allocated(), "25 bytes are not inline");
    }

    #[test]
    fn evicting_one_address_of_a_name_keeps_its_others() {
        let bindings = Bindings::new(3);
        let now = Instant::now();
        let until = now + Duration::from_secs(60);
        for last in 1..=3 {
            bindings.bind("multi.example", ip(&format!("192.0.2.{last}")), until, now);
        }
        bindings.bind("other.example", ip("198.51.100.1"), until, now);
        bindings.bind("third.example", ip("198.51.100.2"), until, now);
        assert_eq!(bindings.len(), 3);
        assert_eq!(bindings.addresses_for("multi.example", now), [ip("192.0.2.3")]);
        bindings.bind("fourth.example", ip("198.51.100.3"), until, now);
        assert!(!bindings.is_bound("multi.example", ip("192.0.2.3"), now));
        assert!(bindings.is_bound("third.example", ip("198.51.100.2"), now));
        assert!(bindings.is_bound("fourth.example", ip("198.51.100.3"), now));
    }

    #[test]
    fn memory_stays_bounded_under_endless_refreshes_and_new_names() {
        let bindings = Bindings::new(100);
        let mut now = Instant::now();
        for i in 0..10_000u32 {
            now += Duration::from_secs(1);
            let name = format!("n{}.example", i % 300);
            bindings.bind(&name, ip("192.0.2.1"), now + Duration::from_secs(2), now);
        }
        let inner = bindings.inner.lock().unwrap();
        assert_eq!(inner.len, 100);
        assert!(inner.queue.len() <= 2 * 100 + 16 + 1);
        assert_eq!(inner.by_name.values().map(Slots::len).sum::<usize>(), 100);
    }
}
