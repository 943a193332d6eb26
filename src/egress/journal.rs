//! The journal of refused connections: every packet of the agent the firewall refuses (read
//! from the kernel's packet log, `nflog`) and every connection or request the name-bound layer
//! refuses, as one record each: when, which uid, which protocol, address and port, which names
//! cordon's DNS had answered with that address, and why.
//!
//! A flood costs bounded memory and CPU: records are kept in a ring of [`Limits::capacity`],
//! and a token bucket ([`Limits::rate`], [`Limits::burst`]) decides which refusals are recorded
//! at all; the rest are only counted, per reason, as dropped. The kernel's own rate limit on
//! the log rules (see `firewall`) bounds what reaches cordon in the first place. `status`,
//! `status --json`, `status why ADDRESS` and the optional JSON-lines file read from here;
//! [`Journal::counts`] is the public API for counters.

use std::collections::VecDeque;
use std::io::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

/// Why a connection was refused. The firewall's reasons are the `--nflog-prefix` of its
/// refusal chains, so the kernel's log says which rule refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// TCP to an address no allowed name resolved to (not in any allow set).
    NotAdmitted,
    /// TCP to an admitted address on a port not allowed for it.
    Port,
    /// Any protocol but TCP (UDP, ICMP, ...) outside loopback and DNS.
    UdpIcmp,
    /// DNS (port 53) anywhere but cordon's listener, or anything to a resolver's address.
    Resolver,
    /// Loopback (the container's own addresses) on a port outside `network.loopback_ports`.
    Loopback,
    /// The name-bound layer: the name sent (SNI, HTTP Host), or its absence, was refused.
    Name,
}

impl Reason {
    pub const ALL: [Reason; 6] =
        [Reason::NotAdmitted, Reason::Port, Reason::UdpIcmp, Reason::Resolver, Reason::Loopback, Reason::Name];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotAdmitted => "not-admitted",
            Reason::Port => "port",
            Reason::UdpIcmp => "udp-icmp",
            Reason::Resolver => "resolver",
            Reason::Loopback => "loopback",
            Reason::Name => "name",
        }
    }

    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// One refused connection, packet or request, as `status --json` and the events file show it
/// (schema in docs/status.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339, milliseconds, UTC.
    pub at: String,
    /// The owner of the agent's socket; null when unknown.
    pub uid: Option<u32>,
    /// "tcp", "udp", "icmp", "icmpv6", or the IP protocol number.
    pub protocol: String,
    pub address: String,
    /// TCP and UDP only.
    pub port: Option<u16>,
    /// The names cordon's DNS answered with this address, still bound (sorted, at most 8);
    /// empty if none.
    pub names: Vec<String>,
    /// One of [`Reason::as_str`].
    pub reason: String,
    /// `name` refusals: the name the client sent (TLS SNI or HTTP Host); null without one.
    #[serde(default)]
    pub sent_name: Option<String>,
    /// `name` refusals: the name-bound layer's words ("name not allowlisted", "no SNI", ...).
    #[serde(default)]
    pub detail: Option<String>,
}

/// A refusal as the reader or the proxy sees it, before it becomes an [`Event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub at: SystemTime,
    pub uid: Option<u32>,
    pub protocol: String,
    pub address: IpAddr,
    pub port: Option<u16>,
    pub reason: Reason,
    pub sent_name: Option<String>,
    pub detail: Option<String>,
}

/// Names kept per record: a CDN address can carry hundreds, and a record's size must stay
/// bounded.
pub const MAX_NAMES: usize = 8;

/// The longest name kept from a client (a DNS name is at most 253 characters; an HTTP Host
/// could be longer).
const MAX_SENT_NAME: usize = 253;

impl Refused {
    /// The record, with at most [`MAX_NAMES`] of `names` (sorted) and the sent name cut to 253
    /// characters.
    pub fn event(self, mut names: Vec<String>) -> Event {
        names.sort();
        names.truncate(MAX_NAMES);
        let sent_name = self.sent_name.map(|n| n.chars().take(MAX_SENT_NAME).collect());
        Event {
            at: humantime::format_rfc3339_millis(self.at).to_string(),
            uid: self.uid,
            protocol: self.protocol,
            address: self.address.to_canonical().to_string(),
            port: self.port,
            names,
            reason: self.reason.as_str().into(),
            sent_name,
            detail: self.detail,
        }
    }
}

/// The bounds on the journal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Records kept.
    pub capacity: usize,
    /// Records per second, on average, beyond the burst.
    pub rate: f64,
    /// Records that may come at once.
    pub burst: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { capacity: 256, rate: 20.0, burst: 100.0 }
    }
}

/// A token bucket: `burst` tokens, refilled at `rate` per second.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Option<Instant>,
}

impl Bucket {
    fn take(&mut self, limits: &Limits, now: Instant) -> bool {
        let elapsed = self.last.map_or(0.0, |last| now.saturating_duration_since(last).as_secs_f64());
        self.last = Some(now);
        self.tokens = (self.tokens + elapsed * limits.rate).min(limits.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The counters of one reason since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReasonCounts {
    /// Refusals seen (recorded or dropped).
    pub total: u64,
    /// Refusals not recorded because of the rate limit.
    pub dropped: u64,
}

/// Every counter of the journal.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Counts {
    /// In the order of [`Reason::ALL`].
    pub by_reason: Vec<(Reason, ReasonCounts)>,
    /// Times the kernel could not deliver logged packets to cordon (its socket buffer was
    /// full: ENOBUFS); how many packets each time is not known.
    pub overflows: u64,
}

#[derive(Debug)]
struct Inner {
    ring: VecDeque<Event>,
    bucket: Bucket,
    counts: [ReasonCounts; Reason::ALL.len()],
}

/// The journal, shared by the packet-log reader, the proxy and `status`.
#[derive(Debug)]
pub struct Journal {
    limits: Limits,
    inner: Mutex<Inner>,
    overflows: AtomicU64,
    events: OnceLock<Mutex<EventsFile>>,
}

impl Journal {
    pub fn new(limits: Limits) -> Journal {
        Journal {
            inner: Mutex::new(Inner {
                ring: VecDeque::with_capacity(limits.capacity),
                bucket: Bucket { tokens: limits.burst, last: None },
                counts: Default::default(),
            }),
            limits,
            overflows: AtomicU64::new(0),
            events: OnceLock::new(),
        }
    }

    /// Counts a refusal of `reason` and says whether the rate limit lets it be recorded (the
    /// caller then builds it and calls [`Journal::push`]); a refusal it does not let through is
    /// counted as dropped. Cheap: callers ask before any costly lookup.
    pub fn admit(&self, reason: Reason, now: Instant) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let index = Reason::ALL.iter().position(|r| *r == reason).expect("every reason is in ALL");
        inner.counts[index].total += 1;
        let limits = self.limits;
        if inner.bucket.take(&limits, now) {
            true
        } else {
            inner.counts[index].dropped += 1;
            false
        }
    }

    /// Keeps `event` (admitted by [`Journal::admit`]), evicting the oldest at capacity, and
    /// appends it to the events file, if there is one.
    pub fn push(&self, event: Event) {
        if let Some(file) = self.events.get() {
            let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = file.append(&event) {
                file.failed(&e);
            }
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.ring.len() >= self.limits.capacity {
            inner.ring.pop_front();
        }
        inner.ring.push_back(event);
    }

    /// The kernel dropped logged packets on their way to cordon.
    pub fn overflowed(&self) {
        self.overflows.fetch_add(1, Ordering::Relaxed);
    }

    /// The kept records, newest first.
    pub fn recent(&self) -> Vec<Event> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.ring.iter().rev().cloned().collect()
    }

    /// The kept records to `address`, newest first.
    pub fn recent_to(&self, address: IpAddr) -> Vec<Event> {
        let address = address.to_canonical().to_string();
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.ring.iter().rev().filter(|e| e.address == address).cloned().collect()
    }

    pub fn counts(&self) -> Counts {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Counts {
            by_reason: Reason::ALL.into_iter().zip(inner.counts).collect(),
            overflows: self.overflows.load(Ordering::Relaxed),
        }
    }

    /// From now on, every recorded event is also appended to `path` (`[events]`), which is
    /// rotated to `<path>.1` when it would grow past `max_size` bytes.
    pub fn write_events_to(&self, path: &Path, max_size: u64) -> io::Result<()> {
        let file = EventsFile::open(path, max_size)?;
        let _ = self.events.set(Mutex::new(file));
        Ok(())
    }
}

/// The JSON-lines events file: one [`Event`] a line, size-capped by rotation to `<path>.1`
/// (one generation), so that a log shipper following it sees every line once and the disk
/// holds at most twice `max_size`.
///
/// Root writes it, so it is never reached by name from `/` again after boot: its directory is
/// opened once without following a symlink and must be root's and writable by root only (else
/// the agent could plant a FIFO, which would block root's open forever with the events lock
/// held, or a symlink to a file of its choosing, between two rotations); the file is opened
/// and renamed relative to that directory, never through a symlink, and must be a regular file.
#[derive(Debug)]
struct EventsFile {
    path: PathBuf,
    dir: crate::sys::nofollow::Dir,
    name: std::ffi::OsString,
    max_size: u64,
    file: std::fs::File,
    size: u64,
    /// A write failed (disk full, volume gone): said once in the log, retried on each event.
    failing: bool,
}

impl EventsFile {
    fn open(path: &Path, max_size: u64) -> io::Result<EventsFile> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(io::Error::other(format!("{} is not a path to a file", path.display())));
        };
        let dir = crate::sys::nofollow::open_abs(parent)
            .map_err(|e| io::Error::other(format!("opening its directory {}: {e}", parent.display())))?;
        // Root's (cordon's own uid is root's; it is accepted too so that the unit tests run
        // unprivileged).
        let owner = dir.uid == 0 || dir.uid == nix::unistd::geteuid().as_raw();
        if !owner || dir.mode & 0o022 != 0 {
            return Err(io::Error::other(format!(
                "its directory {} is owned by uid {} with mode {:04o}: another user (the agent?) could replace                  the file there with a FIFO or a symlink; put events.path in a directory only root can write,                  e.g. /run/cordon",
                parent.display(),
                dir.uid,
                dir.mode
            )));
        }
        let file = Self::open_file(&dir, name)?;
        let size = file.metadata()?.len();
        Ok(EventsFile { path: path.to_path_buf(), dir, name: name.to_owned(), max_size, file, size, failing: false })
    }

    /// Readable by log shippers of any uid (nothing in it is secret: `status` shows the same
    /// to the agent's group), writable by root only. O_NONBLOCK so that a FIFO found there
    /// cannot hang the open (it is then refused by the fstat); it changes nothing for a
    /// regular file.
    fn open_file(dir: &crate::sys::nofollow::Dir, name: &std::ffi::OsStr) -> io::Result<std::fs::File> {
        use nix::fcntl::OFlag;
        use std::os::fd::AsFd as _;
        let flags = OFlag::O_WRONLY
            | OFlag::O_APPEND
            | OFlag::O_CREAT
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_CLOEXEC
            | OFlag::O_NOCTTY;
        let fd = nix::fcntl::openat(dir.fd.as_fd(), name, flags, nix::sys::stat::Mode::from_bits_truncate(0o644))
            .map_err(|e| match e {
                nix::errno::Errno::ELOOP => io::Error::other(format!("`{}` is a symlink", name.to_string_lossy())),
                // A FIFO with no reader, opened for writing without blocking.
                nix::errno::Errno::ENXIO => io::Error::other(format!("`{}` is a FIFO", name.to_string_lossy())),
                e => io::Error::from(e),
            })?;
        let st = nix::sys::stat::fstat(fd.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io::Error::other(format!("`{}` is not a regular file", name.to_string_lossy())));
        }
        Ok(std::fs::File::from(fd))
    }

    fn append(&mut self, event: &Event) -> io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(io::Error::other)?;
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.max_size {
            use std::os::fd::AsFd as _;
            let mut rotated = self.name.clone();
            rotated.push(".1");
            nix::fcntl::renameat(self.dir.fd.as_fd(), self.name.as_os_str(), self.dir.fd.as_fd(), rotated.as_os_str())?;
            self.file = Self::open_file(&self.dir, &self.name)?;
            self.size = 0;
        }
        self.file.write_all(&line)?;
        self.size += line.len() as u64;
        self.failing = false;
        Ok(())
    }

    fn failed(&mut self, e: &io::Error) {
        if !self.failing {
            tracing::warn!(path = %self.path.display(), "cannot write the events file: {e}");
            self.failing = true;
        }
    }
}

/// The owner uid of the TCP socket `local` -> `remote` in this network namespace, from
/// /proc/net/tcp or tcp6 (proc(5)): how the name-bound layer learns which uid opened a
/// connection the kernel redirected to it (the accepted socket's peer is the agent socket's
/// local address; its remote is the original destination). One read of a small file, done
/// only for a refusal the rate limit lets through.
pub fn tcp_owner(local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    let file = if local.is_ipv4() { "/proc/net/tcp" } else { "/proc/net/tcp6" };
    tcp_owner_in(&std::fs::read_to_string(file).ok()?, local, remote)
}

/// [`tcp_owner`] on the text of /proc/net/tcp(6): columns `sl local_address rem_address st
/// tx:rx tr:when retrnsmt uid ...`, addresses as the kernel's in-memory words in hex.
pub fn tcp_owner_in(table: &str, local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    let (local, remote) = (proc_addr(local), proc_addr(remote));
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        (cols.len() > 7 && cols[1].eq_ignore_ascii_case(&local) && cols[2].eq_ignore_ascii_case(&remote))
            .then(|| cols[7].parse().ok())
            .flatten()
    })
}

/// The owner uid of the client socket bound to `local` (UDP, or TCP when `tcp`) in this
/// network namespace, from /proc/net/{udp,tcp}{,6} (proc(5)): how observe mode learns which
/// uid asked cordon's DNS a name (the query's source is the client socket's local address,
/// and the socket stays open while it waits for the answer). Read only in observe mode.
pub fn client_owner(local: SocketAddr, tcp: bool) -> Option<u32> {
    let file = match (tcp, local.is_ipv4()) {
        (false, true) => "/proc/net/udp",
        (false, false) => "/proc/net/udp6",
        (true, true) => "/proc/net/tcp",
        (true, false) => "/proc/net/tcp6",
    };
    local_owner_in(&std::fs::read_to_string(file).ok()?, local)
}

/// [`client_owner`] on the text of one of those tables (the columns of /proc/net/tcp). A UDP
/// client may or may not have connected its socket, so the remote column is not compared;
/// a client's ephemeral local address is its own.
pub fn local_owner_in(table: &str, local: SocketAddr) -> Option<u32> {
    let local = proc_addr(local);
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        (cols.len() > 7 && cols[1].eq_ignore_ascii_case(&local)).then(|| cols[7].parse().ok()).flatten()
    })
}

/// An address as /proc/net/tcp(6) prints it: each 32-bit word of the address as the host
/// reads it from memory (so little-endian hosts reverse each word's bytes), then the port.
fn proc_addr(addr: SocketAddr) -> String {
    let octets: Vec<u8> = match addr.ip() {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let words: String =
        octets.chunks(4).map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]]))).collect();
    format!("{words}:{:04X}", addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn refused(i: u32, reason: Reason) -> Event {
        Refused {
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(i)),
            uid: Some(1000),
            protocol: "tcp".into(),
            address: IpAddr::from([192, 0, 2, (i % 250) as u8]),
            port: Some(443),
            reason,
            sent_name: None,
            detail: None,
        }
        .event(vec![])
    }

    #[test]
    fn the_ring_keeps_the_newest_records_up_to_its_capacity() {
        let j = Journal::new(Limits { capacity: 4, rate: 0.0, burst: 100.0 });
        let now = Instant::now();
        for i in 0..10 {
            assert!(j.admit(Reason::NotAdmitted, now));
            j.push(refused(i, Reason::NotAdmitted));
        }
        let recent = j.recent();
        assert_eq!(recent.len(), 4);
        assert_eq!(recent[0].address, "192.0.2.9", "newest first");
        assert_eq!(recent[3].address, "192.0.2.6");
        assert_eq!(j.recent_to("192.0.2.7".parse().unwrap()).len(), 1);
        assert_eq!(j.recent_to("::ffff:192.0.2.7".parse().unwrap()).len(), 1, "a mapped address is the IPv4 one");
    }

    #[test]
    fn a_flood_past_the_burst_is_counted_as_dropped_per_reason_and_refills_with_time() {
        let j = Journal::new(Limits { capacity: 256, rate: 10.0, burst: 5.0 });
        let t0 = Instant::now();
        let kept = (0..5000).filter(|_| j.admit(Reason::UdpIcmp, t0)).count();
        assert_eq!(kept, 5, "the burst, then nothing at the same instant");
        assert!(!j.admit(Reason::Port, t0));
        // Half a second later: five more tokens.
        let later = t0 + Duration::from_millis(500);
        assert_eq!((0..100).filter(|_| j.admit(Reason::Resolver, later)).count(), 5);
        let counts = j.counts();
        let of = |r| counts.by_reason.iter().find(|(x, _)| *x == r).unwrap().1;
        assert_eq!(of(Reason::UdpIcmp), ReasonCounts { total: 5000, dropped: 4995 });
        assert_eq!(of(Reason::Port), ReasonCounts { total: 1, dropped: 1 });
        assert_eq!(of(Reason::Resolver), ReasonCounts { total: 100, dropped: 95 });
        assert_eq!(of(Reason::Name), ReasonCounts::default());
        assert_eq!(counts.by_reason.len(), Reason::ALL.len());
    }

    #[test]
    fn a_record_keeps_at_most_eight_names_and_a_bounded_sent_name() {
        let mut r = Refused {
            at: SystemTime::UNIX_EPOCH,
            uid: None,
            protocol: "tcp".into(),
            address: "192.0.2.1".parse().unwrap(),
            port: Some(443),
            reason: Reason::Name,
            sent_name: Some("x".repeat(5000)),
            detail: None,
        };
        let names: Vec<String> = (0..100).rev().map(|i| format!("n{i:03}.example")).collect();
        let e = r.clone().event(names);
        assert_eq!(e.names, (0..8).map(|i| format!("n{i:03}.example")).collect::<Vec<_>>());
        assert_eq!(e.sent_name.unwrap().len(), 253);
        r.sent_name = None;
        assert_eq!(r.event(vec![]).sent_name, None);
    }

    #[test]
    fn every_reason_reads_back_from_its_name() {
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
        }
        assert_eq!(Reason::parse("accept"), None);
    }

    #[test]
    fn an_event_is_one_json_object_with_the_documented_fields() {
        let e = Refused {
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            uid: Some(1000),
            protocol: "tcp".into(),
            address: "2001:db8::10".parse().unwrap(),
            port: Some(443),
            reason: Reason::Name,
            sent_name: Some("exfil.example.net".into()),
            detail: Some("name not allowlisted".into()),
        }
        .event(vec!["api.example.com".into()]);
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"at":"2023-11-14T22:13:20.123Z","uid":1000,"protocol":"tcp","address":"2001:db8::10","port":443,"names":["api.example.com"],"reason":"name","sent_name":"exfil.example.net","detail":"name not allowlisted"}"#
        );
    }

    #[test]
    fn the_events_file_rotates_to_dot_1_before_it_passes_its_size() {
        let dir = events_dir("rotate");
        let path = dir.join("events.jsonl");
        let j = Journal::new(Limits { capacity: 8, rate: 0.0, burst: 1000.0 });
        j.write_events_to(&path, 1000).unwrap();
        let line = serde_json::to_string(&refused(1, Reason::Port)).unwrap().len() as u64 + 1;
        let n = 1000 / line + 3;
        for i in 0..n {
            j.push(refused(i as u32, Reason::Port));
        }
        let current = std::fs::read_to_string(&path).unwrap();
        let rotated = std::fs::read_to_string(dir.join("events.jsonl.1")).unwrap();
        assert!(current.len() as u64 <= 1000 && rotated.len() as u64 <= 1000);
        assert_eq!(current.lines().count() + rotated.lines().count(), n as usize, "every line once");
        for l in current.lines().chain(rotated.lines()) {
            let e: Event = serde_json::from_str(l).unwrap();
            assert_eq!(e.reason, "port");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A fresh directory under the temp dir, this test's uid's (root's, as cordon's) and 0755
    /// like the state directory (the temp dir itself is 1777, which the events file refuses).
    fn events_dir(tag: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("cordon-events-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    #[test]
    fn a_fifo_planted_at_the_events_path_is_refused_without_blocking() {
        let dir = events_dir("fifo");
        let path = dir.join("events.jsonl");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
        let j = Journal::new(Limits { capacity: 8, rate: 0.0, burst: 1000.0 });
        // A blocking open of a FIFO with no reader would never return: bound the wait.
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || tx.send(j.write_events_to(&p, 1000).map_err(|e| e.to_string())).unwrap());
        let e = rx.recv_timeout(Duration::from_secs(5)).expect("the open returned").unwrap_err();
        assert!(e.contains("FIFO"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_symlink_at_the_events_path_is_refused_and_its_target_untouched() {
        let dir = events_dir("symlink");
        let target = dir.join("chosen-by-the-agent");
        std::os::unix::fs::symlink(&target, dir.join("events.jsonl")).unwrap();
        let j = Journal::new(Limits { capacity: 8, rate: 0.0, burst: 1000.0 });
        let e = j.write_events_to(&dir.join("events.jsonl"), 1000).unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");
        assert!(!target.exists(), "root created the symlink's target");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotation_stays_in_the_directory_opened_at_boot_even_if_its_path_is_repointed() {
        let dir = events_dir("rotation");
        let elsewhere = events_dir("elsewhere");
        std::fs::write(elsewhere.join("events.jsonl"), "not cordon's\n").unwrap();
        let j = Journal::new(Limits { capacity: 8, rate: 0.0, burst: 1000.0 });
        j.write_events_to(&dir.join("events.jsonl"), 4096).unwrap();
        // The directory's name now leads somewhere else: rotation renames and reopens in the
        // directory it opened, by descriptor, never by the name.
        let moved = dir.with_extension("moved");
        let _ = std::fs::remove_dir_all(&moved);
        std::fs::rename(&dir, &moved).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
        for i in 0..100 {
            j.push(refused(i, Reason::Port));
        }
        assert!(moved.join("events.jsonl.1").exists() && moved.join("events.jsonl").exists());
        assert!(!elsewhere.join("events.jsonl.1").exists(), "rotated by name, through the symlink");
        assert_eq!(std::fs::read_to_string(elsewhere.join("events.jsonl")).unwrap(), "not cordon's\n");
        std::fs::remove_file(&dir).unwrap();
        std::fs::remove_dir_all(&moved).unwrap();
        std::fs::remove_dir_all(&elsewhere).unwrap();
    }

    #[test]
    fn an_events_file_in_a_directory_others_can_write_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = events_dir("writable");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let j = Journal::new(Limits { capacity: 8, rate: 0.0, burst: 1000.0 });
        let e = j.write_events_to(&dir.join("events.jsonl"), 1000).unwrap_err().to_string();
        assert!(e.contains("mode 0777") && e.contains("only root can write"), "{e}");
        assert!(!dir.join("events.jsonl").exists());
        // Owned by another uid, 0755: refused too (giving it away takes root).
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&dir, Some(1000), Some(1000)).unwrap();
            let e = j.write_events_to(&dir.join("events.jsonl"), 1000).unwrap_err().to_string();
            assert!(e.contains("uid 1000"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_owner_of_a_dns_clients_udp_socket_is_found_by_its_local_address() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        assert_eq!(client_owner(socket.local_addr().unwrap(), false), Some(uid));
        let v6 = std::net::UdpSocket::bind("[::1]:0");
        if let Ok(v6) = v6 {
            assert_eq!(client_owner(v6.local_addr().unwrap(), false), Some(uid));
        }
        let free = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert_eq!(client_owner(free, false), None, "a closed socket has no owner");
    }

    #[test]
    fn the_owner_of_a_tcp_socket_is_read_from_proc_net_tcp() {
        let local: SocketAddr = "198.51.100.2:45678".parse().unwrap();
        let remote: SocketAddr = "192.0.2.11:443".parse().unwrap();
        let row = format!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: {} {} 01 00000000:00000000 00:00000000 00000000  1000        0 12345 1\n",
            proc_addr(local),
            proc_addr(remote)
        );
        assert_eq!(tcp_owner_in(&row, local, remote), Some(1000));
        assert_eq!(tcp_owner_in(&row, remote, local), None);
        if cfg!(target_endian = "little") {
            assert_eq!(proc_addr(local), "026433C6:B26E");
        }
        // A real socket of this process, found in this namespace's table.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        assert_eq!(tcp_owner(client.local_addr().unwrap(), client.peer_addr().unwrap()), Some(uid));
    }
}
