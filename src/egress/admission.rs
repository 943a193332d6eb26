//! Admission: putting an address that an allowed name resolved to into the firewall's allow
//! sets, with a lifetime of max(TTL, min_ttl) + grace, before the DNS answer is released. The
//! kernel sets hold the truth; the table here mirrors them so repeated answers need no kernel
//! call while the entry has plenty of life left, and so `status` can say which name admitted
//! an address and until when.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use compact_str::CompactString;

use crate::config::Cidr;
use crate::config::allowlist::Reach;
use crate::egress::addrs;
use crate::egress::firewall::{self, Family};

/// Where admitted addresses go: the kernel's ipset, or a recorder in tests.
pub trait Sets: Send {
    fn add(&mut self, set: &str, ip: IpAddr, timeout_secs: u32) -> io::Result<()>;
    /// Removes `ip` from `set` (a narrowing policy change). Recorders that never narrow need
    /// not implement it.
    fn del(&mut self, set: &str, ip: IpAddr) -> io::Result<()> {
        let _ = (set, ip);
        Err(io::Error::new(io::ErrorKind::Unsupported, "these sets cannot remove an address"))
    }
}

impl Sets for crate::egress::ipset::Ipset {
    fn add(&mut self, set: &str, ip: IpAddr, timeout_secs: u32) -> io::Result<()> {
        crate::egress::ipset::Ipset::add(self, set, ip, timeout_secs)
    }
    fn del(&mut self, set: &str, ip: IpAddr) -> io::Result<()> {
        match crate::egress::ipset::Ipset::del(self, set, ip) {
            // IPSET_ERR_EXIST (4103, ip_set.h): not in the set, its timeout ran out already.
            Err(e) if e.to_string().contains("ipset error 4103") => Ok(()),
            other => other,
        }
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

/// Which allow set of a family: the default ports', a `name:port` entry's (name-checked), or a
/// `name:port:raw` entry's (address-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SetOf {
    Default,
    Port(u16),
    Raw(u16),
}

impl SetOf {
    fn name(self, family: Family) -> String {
        match self {
            SetOf::Default => firewall::set_name(family, None),
            SetOf::Port(p) => firewall::set_name(family, Some(p)),
            SetOf::Raw(p) => firewall::raw_set_name(family, p),
        }
    }
}

/// One address in one allow set, named by the address's family and [`SetOf`], so the key is
/// plain values: no set name is built or allocated for an answer whose addresses are already
/// admitted, the common case on the DNS path.
type Key = (IpAddr, SetOf);

/// 32 bytes next to its 22-byte key: the table holds one per admitted (address, set), 10,000s
/// of them.
struct Entry {
    /// The name that admitted it, for `status` and a narrowing policy change. Held inline up to
    /// 24 bytes (most names): no heap block of its own (32 bytes per name as a `Box<str>`).
    name: CompactString,
    /// When it ends, in whole seconds since the admitter's `epoch` (rounded down: a covered
    /// admission is judged by at most a second less than it has, never more).
    until: u32,
}

/// `at` as whole seconds since `epoch`, rounded down (saturating: u32 seconds is 136 years).
fn secs_since(epoch: Instant, at: Instant) -> u32 {
    u32::try_from(at.saturating_duration_since(epoch).as_secs()).unwrap_or(u32::MAX)
}

pub struct Admitter {
    /// The kernel; one call at a time (one socket). Never taken while `table` is held.
    sets: Mutex<Box<dyn Sets>>,
    /// What the kernel sets hold and until when. Held only for lookups and inserts, never
    /// across a kernel call, so `status` and repeated answers do not wait on netlink.
    table: Mutex<HashMap<Key, Entry>>,
    /// What `Entry::until` counts from.
    epoch: Instant,
    allow_cidrs: Vec<Cidr>,
    lifetimes: Lifetimes,
    /// Additions the kernel accepted since start (a renewal counts again; a repeated answer
    /// that needed no kernel call does not), for the metrics.
    additions: AtomicU64,
}

impl Admitter {
    pub fn new(sets: Box<dyn Sets>, allow_cidrs: Vec<Cidr>, lifetimes: Lifetimes) -> Admitter {
        Admitter {
            sets: Mutex::new(sets),
            table: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            allow_cidrs,
            lifetimes,
            additions: AtomicU64::new(0),
        }
    }

    /// Admits `ip`, which `name` resolved to with `ttl`, to the sets for what `reach` allows.
    /// When it returns Ok(Admitted) the address is in every one of those sets in the kernel.
    /// An error means the kernel refused: the caller must not release the answer.
    pub fn admit(&self, name: &str, ip: IpAddr, ttl: u32, reach: &Reach) -> io::Result<Verdict> {
        if let Some(why) = addrs::refusal(ip, &self.allow_cidrs) {
            return Ok(Verdict::Refused(why));
        }
        let lifetime = self.lifetimes.lifetime(ttl);
        let wanted = reach
            .default_ports
            .then_some(SetOf::Default)
            .into_iter()
            .chain(reach.extra_ports.iter().map(|&p| SetOf::Port(p)))
            .chain(reach.raw_ports.iter().map(|&p| SetOf::Raw(p)));
        // Decide under the table lock alone: a repeated answer ends here, with no kernel call.
        let stale: Vec<SetOf> = {
            let table = self.table();
            let now = Instant::now();
            wanted.filter(|&set| !self.covers(&table, (ip, set), now, lifetime)).collect()
        };
        if stale.is_empty() {
            return Ok(Verdict::Admitted);
        }
        let secs = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        for set in stale {
            let key = (ip, set);
            let now = Instant::now();
            // Checked again now that the kernel is ours: an admission that went first may have
            // covered this set, and adding again with a shorter lifetime would cut the kernel's
            // timeout below what the table (and a client's cached answer) counts on.
            if self.covers(&self.table(), key, now, lifetime) {
                continue;
            }
            sets.add(&set.name(Family::of(ip)), ip, secs)?;
            self.additions.fetch_add(1, Ordering::Relaxed);
            // Recorded only once the kernel has it: the table never claims what a set lacks.
            let until = secs_since(self.epoch, now + lifetime);
            self.table().insert(key, Entry { name: name.into(), until });
        }
        Ok(Verdict::Admitted)
    }

    /// Whether the entry for `key` outlives an admission made `now` for `lifetime` closely
    /// enough to skip the kernel: with at least lifetime - grace/2 left it still outlives any
    /// cached copy of the answer (TTL) by grace/2.
    fn covers(&self, table: &HashMap<Key, Entry>, key: Key, now: Instant, lifetime: Duration) -> bool {
        // Rounded up, so the entry's rounding down can only make it renew a second early.
        let enough = now + lifetime - self.lifetimes.grace / 2 + Duration::from_secs(1);
        let enough = secs_since(self.epoch, enough);
        table.get(&key).is_some_and(|e| e.until >= enough)
    }

    /// How long an address answered with `ttl` stays admitted from now: the name-bound layer
    /// binds the answer's names to it for as long.
    pub fn lifetime(&self, ttl: u32) -> Duration {
        self.lifetimes.lifetime(ttl)
    }

    /// How long after admitting an address answered with `ttl` a cached copy of that answer
    /// (its TTL decremented by age) may still be handed out without admitting again: until
    /// then the admission outlives the copy by at least the full grace.
    pub fn renewal_due(&self, ttl: u32) -> Duration {
        self.lifetimes.lifetime(ttl) - self.lifetimes.grace
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many additions to the kernel's sets succeeded since start.
    pub fn additions(&self) -> u64 {
        self.additions.load(Ordering::Relaxed)
    }

    /// Forgets entries whose lifetime is over (the kernel has dropped them by itself).
    pub fn prune(&self) {
        let now = secs_since(self.epoch, Instant::now());
        self.table().retain(|_, e| e.until > now);
    }

    /// Removes from the kernel's sets and the table every admission `keep` says no name in
    /// force justifies any more (a narrowing policy change); returns the addresses that left
    /// every set they were in, whose connections are then to be killed. `keep` is called
    /// with the table unlocked. An error leaves the rest in place: the caller reports it.
    pub fn revoke(&self, keep: impl Fn(IpAddr, &str, SetOf) -> bool) -> io::Result<Vec<IpAddr>> {
        let now = secs_since(self.epoch, Instant::now());
        let held: Vec<(Key, String)> =
            self.table().iter().filter(|(_, e)| e.until > now).map(|(k, e)| (*k, e.name.to_string())).collect();
        let gone: Vec<Key> = held.iter().filter(|((ip, set), name)| !keep(*ip, name, *set)).map(|(k, _)| *k).collect();
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        for &(ip, set) in &gone {
            sets.del(&set.name(Family::of(ip)), ip)?;
            self.table().remove(&(ip, set));
        }
        let table = self.table();
        let mut ips: Vec<IpAddr> =
            gone.iter().map(|(ip, _)| *ip).filter(|ip| !table.keys().any(|(k, _)| k == ip)).collect();
        ips.sort();
        ips.dedup();
        Ok(ips)
    }

    /// Every admitted address, for `status`.
    pub fn admitted(&self) -> Vec<AdmittedAddr> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let now_secs = secs_since(self.epoch, now);
        let mut out: Vec<AdmittedAddr> = self
            .table()
            .iter()
            .filter(|(_, e)| e.until > now_secs)
            .map(|(&(ip, set), e)| AdmittedAddr {
                ip,
                name: e.name.to_string(),
                set: set.name(Family::of(ip)),
                until: wall + (self.epoch + Duration::from_secs(u64::from(e.until))).saturating_duration_since(now),
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
    fn a_table_slot_stays_at_56_bytes_with_its_name() {
        // 10,000 admitted addresses take a table of 16,384 slots: 8 bytes more each is 128 KiB.
        // The name inline costs 8 bytes a slot and saves a 32-byte block per short name.
        assert!(std::mem::size_of::<(Key, Entry)>() <= 56, "{}", std::mem::size_of::<(Key, Entry)>());
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

    #[test]
    fn a_shorter_ttl_never_shortens_an_admitted_entry() {
        let rec = Recorder::default();
        let a = admitter(&rec);
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        a.admit("n", ip, 3600, &default_reach()).unwrap();
        a.admit("n", ip, 30, &default_reach()).unwrap();
        assert_eq!(
            *rec.0.lock().unwrap(),
            [("cordon4".to_string(), ip, 3900)],
            "the second add would cut 3900 s to 360 s"
        );
    }

    /// Fails every add.
    struct Refusing;

    impl Sets for Refusing {
        fn add(&mut self, _: &str, _: IpAddr, _: u32) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::PermissionDenied))
        }
    }

    #[test]
    fn an_address_the_kernel_refused_is_not_recorded_as_admitted() {
        let a = Admitter::new(
            Box::new(Refusing),
            vec![],
            Lifetimes { min_ttl: Duration::from_secs(60), grace: Duration::from_secs(300) },
        );
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        assert!(a.admit("n", ip, 30, &default_reach()).is_err());
        assert!(a.admitted().is_empty());
        // Not recorded, so the next answer tries the kernel again rather than being released.
        assert!(a.admit("n", ip, 30, &default_reach()).is_err());
    }

    /// Holds every add until the test lets it go, saying when one has started.
    struct Stalling {
        started: std::sync::mpsc::Sender<()>,
        release: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
    }

    impl Sets for Stalling {
        fn add(&mut self, _: &str, _: IpAddr, _: u32) -> io::Result<()> {
            self.started.send(()).unwrap();
            let _ = self.release.lock().unwrap().recv_timeout(Duration::from_secs(10));
            Ok(())
        }
    }

    #[test]
    fn status_and_repeated_answers_do_not_wait_for_a_kernel_call_in_progress() {
        let (started_tx, started) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        let a = Arc::new(Admitter::new(
            Box::new(Stalling { started: started_tx, release: Arc::new(Mutex::new(release_rx)) }),
            vec![],
            Lifetimes { min_ttl: Duration::from_secs(60), grace: Duration::from_secs(300) },
        ));
        let known: IpAddr = "192.0.2.10".parse().unwrap();
        release.send(()).unwrap();
        a.admit("known", known, 30, &default_reach()).unwrap();
        started.recv().unwrap();

        // A new address: its add stalls in the "kernel".
        let slow = std::thread::spawn({
            let a = a.clone();
            move || a.admit("new", "192.0.2.20".parse().unwrap(), 30, &default_reach())
        });
        started.recv_timeout(Duration::from_secs(5)).expect("the new address reaches the kernel");

        // Meanwhile the table answers: status lists the known address, and a repeated answer
        // for it is admitted without a kernel call.
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::spawn({
            let a = a.clone();
            move || {
                let listed = a.admitted().len();
                let again = a.admit("known", known, 30, &default_reach()).unwrap();
                done_tx.send((listed, again)).unwrap();
            }
        });
        let answered = done.recv_timeout(Duration::from_secs(5));
        release.send(()).unwrap();
        assert_eq!(answered.expect("the table lock was held across the kernel call"), (1, Verdict::Admitted));
        assert_eq!(slow.join().unwrap().unwrap(), Verdict::Admitted);
        assert_eq!(a.admitted().len(), 2);
    }
}
