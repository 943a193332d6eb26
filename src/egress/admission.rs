//! Admission: putting an address that an allowed name resolved to into the firewall's allow
//! sets, with a lifetime of max(TTL, min_ttl) + grace, before the DNS answer is released. The
//! kernel sets hold the truth; the table here mirrors them so repeated answers need no kernel
//! call while the entry has plenty of life left, and so `status` can say which name admitted
//! an address and until when.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::config::Cidr;
use crate::config::allowlist::Reach;
use crate::egress::addrs;
use crate::egress::firewall::{self, Family};

/// Where admitted addresses go: the kernel's ipset, or a recorder in tests.
pub trait Sets: Send {
    fn add(&mut self, set: &str, ip: IpAddr, timeout_secs: u32) -> io::Result<()>;
}

impl Sets for crate::egress::ipset::Ipset {
    fn add(&mut self, set: &str, ip: IpAddr, timeout_secs: u32) -> io::Result<()> {
        crate::egress::ipset::Ipset::add(self, set, ip, timeout_secs)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    pub min_ttl: Duration,
    pub grace: Duration,
}

impl Lifetimes {
    /// max(TTL, min_ttl) + grace: the client may cache the answer for TTL, and the grace covers
    /// a connection attempt made just before that ends.
    pub fn lifetime(&self, ttl: u32) -> Duration {
        Duration::from_secs(u64::from(ttl)).max(self.min_ttl) + self.grace
    }
}

/// The outcome for one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admitted,
    /// Never admitted for a public name (rebinding protection): why.
    Refused(&'static str),
}

#[derive(Debug, Clone)]
pub struct AdmittedAddr {
    pub ip: IpAddr,
    pub name: String,
    pub set: String,
    pub until: SystemTime,
}

struct Entry {
    name: String,
    until: Instant,
}

pub struct Admitter {
    sets: Mutex<Box<dyn Sets>>,
    table: Mutex<HashMap<(IpAddr, String), Entry>>,
    allow_cidrs: Vec<Cidr>,
    lifetimes: Lifetimes,
}

impl Admitter {
    pub fn new(sets: Box<dyn Sets>, allow_cidrs: Vec<Cidr>, lifetimes: Lifetimes) -> Admitter {
        Admitter { sets: Mutex::new(sets), table: Mutex::new(HashMap::new()), allow_cidrs, lifetimes }
    }

    /// Admits `ip`, which `name` resolved to with `ttl`, to the sets for what `reach` allows.
    /// An error means the kernel refused: the caller must not release the answer.
    pub fn admit(&self, name: &str, ip: IpAddr, ttl: u32, reach: &Reach) -> io::Result<Verdict> {
        if let Some(why) = addrs::refusal(ip, &self.allow_cidrs) {
            return Ok(Verdict::Refused(why));
        }
        let family = Family::of(ip);
        let lifetime = self.lifetimes.lifetime(ttl);
        let now = Instant::now();
        // An entry with at least lifetime - grace/2 left still outlives any cached copy of this
        // answer (TTL) by grace/2, so the kernel need not hear about it again yet.
        let enough = now + lifetime - self.lifetimes.grace / 2;
        let wanted = reach
            .default_ports
            .then(|| firewall::set_name(family, None))
            .into_iter()
            .chain(reach.extra_ports.iter().map(|&p| firewall::set_name(family, Some(p))))
            .chain(reach.raw_ports.iter().map(|&p| firewall::raw_set_name(family, p)));
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        for set in wanted {
            let key = (ip, set);
            if table.get(&key).is_some_and(|e| e.until >= enough) {
                continue;
            }
            let secs = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
            self.sets.lock().unwrap_or_else(|e| e.into_inner()).add(&key.1, ip, secs)?;
            table.insert(key, Entry { name: name.to_string(), until: now + lifetime });
        }
        Ok(Verdict::Admitted)
    }

    /// How long an address answered with `ttl` stays admitted from now: the name-bound layer
    /// binds the answer's names to it for as long.
    pub fn lifetime(&self, ttl: u32) -> Duration {
        self.lifetimes.lifetime(ttl)
    }

    /// Forgets entries whose lifetime is over (the kernel has dropped them by itself).
    pub fn prune(&self) {
        let now = Instant::now();
        self.table.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, e| e.until > now);
    }

    /// Every admitted address, for `status`.
    pub fn admitted(&self) -> Vec<AdmittedAddr> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<AdmittedAddr> = table
            .iter()
            .filter(|(_, e)| e.until > now)
            .map(|((ip, set), e)| AdmittedAddr {
                ip: *ip,
                name: e.name.clone(),
                set: set.clone(),
                until: wall + (e.until - now),
            })
            .collect();
        out.sort_by(|a, b| (a.ip, &a.set).cmp(&(b.ip, &b.set)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<(String, IpAddr, u32)>>>);

    impl Sets for Recorder {
        fn add(&mut self, set: &str, ip: IpAddr, timeout_secs: u32) -> io::Result<()> {
            self.0.lock().unwrap().push((set.into(), ip, timeout_secs));
            Ok(())
        }
    }

    fn admitter(rec: &Recorder) -> Admitter {
        Admitter::new(
            Box::new(rec.clone()),
            vec!["10.0.0.0/8".parse().unwrap()],
            Lifetimes { min_ttl: Duration::from_secs(60), grace: Duration::from_secs(300) },
        )
    }

    fn default_reach() -> Reach {
        Reach { default_ports: true, ..Reach::default() }
    }

    #[test]
    fn lifetime_is_max_of_ttl_and_floor_plus_grace() {
        let l = Lifetimes { min_ttl: Duration::from_secs(60), grace: Duration::from_secs(300) };
        assert_eq!(l.lifetime(5), Duration::from_secs(360));
        assert_eq!(l.lifetime(3600), Duration::from_secs(3900));
    }

    #[test]
    fn addresses_go_to_the_family_and_port_sets_of_the_matching_entries() {
        let rec = Recorder::default();
        let a = admitter(&rec);
        let mut reach = default_reach();
        reach.extra_ports.insert(8443);
        assert_eq!(a.admit("x.example.com", "192.0.2.10".parse().unwrap(), 30, &reach).unwrap(), Verdict::Admitted);
        assert_eq!(
            a.admit("x.example.com", "2001:db8::10".parse().unwrap(), 30, &default_reach()).unwrap(),
            Verdict::Admitted
        );
        let calls = rec.0.lock().unwrap().clone();
        let sets: Vec<&str> = calls.iter().map(|(s, _, _)| s.as_str()).collect();
        assert_eq!(sets, ["cordon4", "cordon4-p8443", "cordon6"]);
        assert!(calls.iter().all(|(_, _, t)| *t == 360));
    }

    #[test]
    fn private_and_metadata_answers_are_refused_unless_listed() {
        let rec = Recorder::default();
        let a = admitter(&rec);
        let r = default_reach();
        assert_eq!(
            a.admit("n", "169.254.169.254".parse().unwrap(), 60, &r).unwrap(),
            Verdict::Refused("link-local (metadata service)")
        );
        assert_eq!(a.admit("n", "192.168.1.1".parse().unwrap(), 60, &r).unwrap(), Verdict::Refused("private"));
        assert_eq!(a.admit("n", "10.1.1.1".parse().unwrap(), 60, &r).unwrap(), Verdict::Admitted);
        assert_eq!(rec.0.lock().unwrap().len(), 1, "refused addresses never reach the kernel");
    }

    #[test]
    fn repeated_answers_skip_the_kernel_while_the_entry_has_life_left() {
        let rec = Recorder::default();
        let a = admitter(&rec);
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        a.admit("n", ip, 30, &default_reach()).unwrap();
        a.admit("n", ip, 30, &default_reach()).unwrap();
        assert_eq!(rec.0.lock().unwrap().len(), 1);
        // A longer TTL than the entry covers must renew it.
        a.admit("n", ip, 3600, &default_reach()).unwrap();
        assert_eq!(rec.0.lock().unwrap().len(), 2);
        let listed = a.admitted();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].name, "n");
    }
}
