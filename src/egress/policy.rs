//! The egress policy in force, shared by the DNS server, the name-bound layer, the refresh and
//! `status`. It is one value, swapped whole: a reader holds the `Arc` it took for as long as it
//! decides, so a change made meanwhile (a reload, an `allow`, a `deny`) is never half seen.
//!
//! Beside the allowlist it keeps what the live changes need (`egress::change` makes them): the
//! entries loaded from the file and `network.allow`, the runtime grants, the file entries denied
//! since the last load, a bounded record of every change, and, in observe mode, the names that
//! would have been refused.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Instant, SystemTime};

use crate::config::Mode;
use crate::config::allowlist::{Allowlist, DomainPattern, Entry, Reach};

/// How many changes `status` keeps (the boot log has them all).
pub const CHANGES_KEPT: usize = 64;
/// How many distinct names observe mode records; more are counted, not kept.
pub const OBSERVED_NAMES: usize = 4096;

/// Where `reload` gets the entries from: the allowlist file and `network.allow`, read again.
/// Err: every problem, each naming its file and line.
pub type Source = Box<dyn Fn() -> crate::egress::change::Loaded + Send + Sync>;

/// An entry added at run time by `cordon allow`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub id: u64,
    pub entry: Entry,
    pub at: SystemTime,
    /// When it goes away by itself (`--for`); None: until a deny or the container's end.
    pub until: Option<(Instant, SystemTime)>,
    /// Who asked (`uid 0 pid 42`).
    pub by: String,
}

/// One policy change, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub at: SystemTime,
    /// `uid 0 pid 42`, `SIGHUP`, `timer`.
    pub who: String,
    /// `reload`, `allow x.example.com for 3s`, `deny x.example.com`, `expire x.example.com`.
    pub what: String,
    pub ok: bool,
    /// What it did, or why it was refused.
    pub result: String,
}

/// The mutable half of the policy, changed under one lock so changes are serialised.
#[derive(Debug, Default, Clone)]
pub struct Entries {
    /// From the allowlist file and `network.allow`, as last loaded.
    pub base: Vec<(Entry, String)>,
    pub grants: Vec<Grant>,
    /// Patterns of `base` removed by `deny` until the next reload.
    pub denied: BTreeSet<DomainPattern>,
    pub next_id: u64,
}

impl Entries {
    /// The entries in force: the loaded ones not denied, then the grants.
    pub fn compose(&self) -> Vec<(Entry, String)> {
        let base = self.base.iter().filter(|(e, _)| !self.denied.contains(&e.pattern)).cloned();
        let grants = self.grants.iter().map(|g| {
            let until = match g.until {
                Some((_, wall)) => format!(" until {}", humantime::format_rfc3339_seconds(wall)),
                None => String::new(),
            };
            (g.entry.clone(), format!("cordon allow by {}{until}", g.by))
        });
        base.chain(grants).collect()
    }
}

/// One name observe mode let through that enforce mode would have refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub count: u64,
    pub first: SystemTime,
    pub last: SystemTime,
    /// Where it was seen: `dns`, `tls`, `http`.
    pub via: BTreeSet<&'static str>,
    /// The uids that asked for it, when known (at most [`OBSERVED_UIDS`]).
    pub uids: BTreeSet<u32>,
}

/// How many distinct uids an observed name keeps.
pub const OBSERVED_UIDS: usize = 8;

#[derive(Debug, Default)]
struct Observations {
    names: BTreeMap<String, Observed>,
    /// Would-be refusals of names that did not fit in `names`.
    dropped: u64,
}

pub struct Policy {
    allowlist: RwLock<Arc<Allowlist>>,
    /// Held shared by whoever admits addresses (a DNS answer, serve-stale, the refresh) from
    /// its re-check of the allowlist in force to the end of the admission, and exclusively by
    /// a change from its swap to the end of its revocation: so an answer that was in flight
    /// during a narrowing can never put back what the narrowing took away.
    gate: RwLock<()>,
    mode: Mode,
    entries: Mutex<Entries>,
    changes: Mutex<VecDeque<Change>>,
    observed: Mutex<Observations>,
    source: OnceLock<Source>,
    /// Changes put in force, and attempts refused, since boot (for metrics).
    applied: AtomicU64,
    refused: AtomicU64,
}

impl Policy {
    pub fn new(entries: Vec<(Entry, String)>, mode: Mode) -> Self {
        let entries = Entries { base: entries, ..Entries::default() };
        Self {
            allowlist: RwLock::new(Arc::new(Allowlist::new(entries.compose()))),
            gate: RwLock::new(()),
            mode,
            entries: Mutex::new(entries),
            changes: Mutex::new(VecDeque::new()),
            observed: Mutex::new(Observations::default()),
            source: OnceLock::new(),
            applied: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// The allowlist in force now. The lock is held only to clone the `Arc`, never across a
    /// decision or I/O.
    pub fn allowlist(&self) -> Arc<Allowlist> {
        self.allowlist.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The admission side of the gate: hold it while re-checking the allowlist in force and
    /// admitting (kernel calls only; never across an await or a lookup).
    pub fn admission_gate(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The change side of the gate: no admission runs while it is held.
    pub fn change_gate(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `allowlist` in force for every decision from now on; returns the one it replaced.
    pub fn replace(&self, allowlist: Allowlist) -> Arc<Allowlist> {
        let mut current = self.allowlist.write().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *current, Arc::new(allowlist))
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Sets where `reload` reads from (once, by the boot).
    pub fn set_source(&self, source: Source) {
        let _ = self.source.set(source);
    }

    /// Reads the entries again; Err when there is no source or it has problems.
    pub fn load(&self) -> crate::egress::change::Loaded {
        match self.source.get() {
            Some(source) => source(),
            None => Err(vec!["this cordon has no allowlist source to reload from".into()]),
        }
    }

    /// The entries and grants, locked: a change holds this for its whole length, so changes
    /// never interleave.
    pub fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a change, keeping the last [`CHANGES_KEPT`].
    pub fn record(&self, change: Change) {
        let counter = if change.ok { &self.applied } else { &self.refused };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut changes = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        if changes.len() >= CHANGES_KEPT {
            changes.pop_front();
        }
        changes.push_back(change);
    }

    /// How many changes were put in force, and how many were refused, since boot.
    pub fn change_counts(&self) -> (u64, u64) {
        (self.applied.load(Ordering::Relaxed), self.refused.load(Ordering::Relaxed))
    }

    /// The recorded changes, oldest first.
    pub fn changes(&self) -> Vec<Change> {
        self.changes.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    /// Observe mode's answer for a name the allowlist refuses: in observe mode the name is
    /// recorded (as seen `via` dns, tls or http) and may reach the default ports; in enforce
    /// mode, None (refused).
    /// `uid` says who asked, if it can be known; it is called only when the name is recorded.
    pub fn observe(&self, name: &str, via: &'static str, uid: impl FnOnce() -> Option<u32>) -> Option<Reach> {
        if self.mode != Mode::Observe {
            return None;
        }
        let name = crate::config::allowlist::canonical(name);
        // `.invalid` never resolves (RFC 6761): nothing to allow. The readiness probe's
        // negative lookup is one.
        if name == "invalid" || name.ends_with(".invalid") {
            return Some(Reach { default_ports: true, ..Reach::default() });
        }
        let now = SystemTime::now();
        // Read before the lock: a small file, never under it.
        let uid = uid();
        let mut observed = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        let full = observed.names.len() >= OBSERVED_NAMES;
        match observed.names.get_mut(&name) {
            Some(o) => {
                o.count += 1;
                o.last = now;
                o.via.insert(via);
                if let Some(uid) = uid
                    && o.uids.len() < OBSERVED_UIDS
                {
                    o.uids.insert(uid);
                }
            }
            None if full => observed.dropped += 1,
            None => {
                let uids = uid.into_iter().collect();
                let first = Observed { count: 1, first: now, last: now, via: BTreeSet::from([via]), uids };
                observed.names.insert(name, first);
            }
        }
        Some(Reach { default_ports: true, ..Reach::default() })
    }

    /// [`Policy::observe`] without recording: what observe mode lets a name reach.
    pub fn observe_quiet(&self, _name: &str) -> Option<Reach> {
        (self.mode == Mode::Observe).then(|| Reach { default_ports: true, ..Reach::default() })
    }

    /// The names observe mode let through, by name, and how many did not fit.
    pub fn observed(&self) -> (Vec<(String, Observed)>, u64) {
        let o = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        (o.names.iter().map(|(n, o)| (n.clone(), o.clone())).collect(), o.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(text: &str) -> Vec<(Entry, String)> {
        crate::config::allowlist::parse_file(text, std::path::Path::new("t")).unwrap()
    }

    fn allowlist(text: &str) -> Allowlist {
        Allowlist::new(entries(text))
    }

    #[test]
    fn a_reader_keeps_the_allowlist_it_took_while_a_replacement_takes_effect_for_the_next() {
        let policy = Policy::new(entries("a.example.com\n"), Mode::Enforce);
        let before = policy.allowlist();
        let old = policy.replace(allowlist("b.example.com\n"));
        assert!(before.lookup("a.example.com").is_some());
        assert!(old.lookup("a.example.com").is_some());
        assert!(policy.allowlist().lookup("a.example.com").is_none());
        assert!(policy.allowlist().lookup("b.example.com").is_some());
    }

    #[test]
    fn the_entries_in_force_are_the_loaded_ones_not_denied_then_the_grants() {
        let mut e = Entries { base: entries("a.example.com\nb.example.com:8443\n"), ..Entries::default() };
        e.denied.insert(DomainPattern::parse("b.example.com").unwrap());
        e.grants.push(Grant {
            id: 1,
            entry: Entry::parse("c.example.com").unwrap(),
            at: SystemTime::UNIX_EPOCH,
            until: None,
            by: "uid 0 pid 7".into(),
        });
        let composed: Vec<String> = e.compose().iter().map(|(e, o)| format!("{e} ({o})")).collect();
        assert_eq!(composed, ["a.example.com (t:1)", "c.example.com (cordon allow by uid 0 pid 7)"]);
    }

    #[test]
    fn enforce_mode_refuses_and_records_nothing_observe_mode_admits_default_ports_and_counts() {
        let enforce = Policy::new(vec![], Mode::Enforce);
        assert_eq!(enforce.observe("x.example.com", "dns", || Some(1)), None);
        assert!(enforce.observed().0.is_empty());

        let observe = Policy::new(vec![], Mode::Observe);
        let reach = observe.observe("X.Example.com.", "dns", || Some(4242)).unwrap();
        assert!(reach.default_ports && reach.extra_ports.is_empty() && reach.raw_ports.is_empty());
        observe.observe("x.example.com", "tls", || None);
        observe.observe("cordon-readiness-probe.invalid", "dns", || Some(0));
        let (seen, dropped) = observe.observed();
        assert_eq!(dropped, 0);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, "x.example.com");
        assert_eq!(seen[0].1.count, 2);
        assert_eq!(seen[0].1.via.iter().copied().collect::<Vec<_>>(), ["dns", "tls"]);
        assert_eq!(seen[0].1.uids.iter().copied().collect::<Vec<_>>(), [4242], "who asked, when known");
    }

    #[test]
    fn observations_and_changes_are_bounded() {
        let observe = Policy::new(vec![], Mode::Observe);
        for i in 0..OBSERVED_NAMES + 10 {
            observe.observe(&format!("n{i}.example.com"), "dns", || None);
        }
        let (seen, dropped) = observe.observed();
        assert_eq!((seen.len(), dropped), (OBSERVED_NAMES, 10));
        for i in 0..CHANGES_KEPT + 3 {
            let at = SystemTime::now();
            observe.record(Change { at, who: "t".into(), what: format!("c{i}"), ok: true, result: String::new() });
        }
        let changes = observe.changes();
        assert_eq!(changes.len(), CHANGES_KEPT);
        assert_eq!(changes[0].what, "c3", "the oldest go first");
    }
}
