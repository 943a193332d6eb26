//! The egress policy in force, shared by the DNS server, the name-bound layer, the refresh and
//! `status`. It is one value, swapped whole: a reader holds the `Arc` it took for as long as it
//! decides, so a change made meanwhile (a reload, an `allow`, a `deny`) is never half seen.

use std::sync::{Arc, RwLock};

use crate::config::allowlist::Allowlist;

pub struct Policy {
    allowlist: RwLock<Arc<Allowlist>>,
}

impl Policy {
    pub fn new(allowlist: Allowlist) -> Self {
        Self { allowlist: RwLock::new(Arc::new(allowlist)) }
    }

    /// The allowlist in force now. The lock is held only to clone the `Arc`, never across a
    /// decision or I/O.
    pub fn allowlist(&self) -> Arc<Allowlist> {
        self.allowlist.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `allowlist` in force for every decision from now on; returns the one it replaced.
    pub fn replace(&self, allowlist: Allowlist) -> Arc<Allowlist> {
        let mut current = self.allowlist.write().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *current, Arc::new(allowlist))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowlist(text: &str) -> Allowlist {
        Allowlist::new(crate::config::allowlist::parse_file(text, std::path::Path::new("t")).unwrap())
    }

    #[test]
    fn a_reader_keeps_the_allowlist_it_took_while_a_replacement_takes_effect_for_the_next() {
        let policy = Policy::new(allowlist("a.example.com\n"));
        let before = policy.allowlist();
        let old = policy.replace(allowlist("b.example.com\n"));
        assert!(before.lookup("a.example.com").is_some());
        assert!(old.lookup("a.example.com").is_some());
        assert!(policy.allowlist().lookup("a.example.com").is_none());
        assert!(policy.allowlist().lookup("b.example.com").is_some());
    }
}
