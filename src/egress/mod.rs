//! Egress as a whole: the DNS server, the admission table, the refresh, and the shared state
//! `status` reads. Built by the boot's `dns` stage, kept alive by the supervisor.

pub(crate) mod addrs;
pub mod admission;
pub mod change;
pub mod conntrack;
pub(crate) mod dns;
pub mod firewall;
pub mod ipset;
pub mod journal;
pub mod namebound;
pub mod nflog;
pub mod policy;
pub mod probe;
pub mod suggest;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use hickory_resolver::TokioResolver;
use hickory_server::proto::rr::{Name, RecordType};

use self::dns::{DnsStats, Handler, LastGood};
use crate::config::Network;
use crate::config::allowlist::Entry;
use crate::egress::admission::{Admitter, Lifetimes, Sets};
use crate::egress::namebound::bindings::{self, Bindings};
use crate::egress::policy::Policy;
use crate::fix::Problem;
use crate::service::Service;

/// How long the refresh waits for one lookup.
const REFRESH_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How many names the refresh resolves at once. All 1,000 of a large allowlist at once held
/// ~28 MiB of lookups in flight, and the heap kept that size after (`docs/benchmarks.md`); at
/// this bound a refresh against an upstream that never answers still ends within
/// 1,000 / 32 × 5 s, well inside the default interval.
const REFRESH_IN_FLIGHT: usize = 32;

/// How long a refresh's renewal must last: the interval, plus the longest the refresh of `names`
/// names can take (every lookup timing out), after which the next one starts at once.
fn renewal_floor(interval: Duration, names: usize) -> u32 {
    let rounds = names.div_ceil(REFRESH_IN_FLIGHT) as u32;
    let longest = REFRESH_LOOKUP_TIMEOUT.saturating_mul(rounds);
    u32::try_from(interval.saturating_add(longest).as_secs()).unwrap_or(u32::MAX)
}

/// The nameservers of a resolv.conf text, in order.
pub fn parse_nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next()).flatten()
        })
        // A scoped IPv6 address (fe80::1%eth0) keeps its scope out of the parse.
        .filter_map(|w| w.split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// How a resolv.conf cordon wrote remembers the nameservers it replaced, so that a restart of
/// the container on the same file (Docker and Kubernetes keep it across restarts) finds its
/// upstreams again.
const REPLACED: &str = "# cordon replaced: nameserver";

/// The resolvers a resolv.conf names for this container: its nameservers, and those a
/// resolv.conf written by cordon remembers replacing; never `listen` (cordon itself).
pub fn original_nameservers(resolv_conf: &str, listen: SocketAddr) -> Vec<SocketAddr> {
    let remembered: String = resolv_conf
        .lines()
        .filter_map(|l| l.strip_prefix(REPLACED))
        .map(|rest| format!("nameserver {rest}\n"))
        .collect();
    let mut out: Vec<SocketAddr> = Vec::new();
    for ns in parse_nameservers(resolv_conf).into_iter().chain(parse_nameservers(&remembered)) {
        if ns.ip() != listen.ip() && !out.contains(&ns) {
            out.push(ns);
        }
    }
    out
}

/// Docker's embedded resolver. On a user-defined network 127.0.0.11:53 is a NAT redirect to a
/// random high port on the same address, readable in /proc/net/udp, so the address as a whole
/// is a resolver, whatever the configuration says.
pub const DOCKER_RESOLVER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 11));

/// Every address the agent must not reach on any port because a resolver answers there: the
/// nameservers of resolv.conf as found at boot (before cordon rewrites it), the upstreams in
/// force, and Docker's embedded resolver; never cordon's own listener. In order, deduplicated.
pub fn resolver_addresses(original_resolv_conf: &str, upstreams: &[SocketAddr], listen: SocketAddr) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    let found = original_nameservers(original_resolv_conf, listen).into_iter().chain(upstreams.iter().copied());
    for ip in found.map(|a| a.ip()).chain([DOCKER_RESOLVER]) {
        if ip != listen.ip() && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// resolv.conf pointing at cordon's listener only, keeping the original `search`, `domain`
/// and `options` lines (Kubernetes relies on its search list), and remembering the nameservers
/// it replaces in comments (see [`original_nameservers`]).
pub fn render_resolv_conf(listen: SocketAddr, original: &str) -> String {
    let mut out = String::from("# Written by cordon: every lookup goes through its allowlist DNS server.\n");
    for ns in original_nameservers(original, listen) {
        out.push_str(&format!("{REPLACED} {}\n", ns.ip()));
    }
    out.push_str(&format!("nameserver {}\n", listen.ip()));
    for line in original.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if matches!(first, "search" | "domain" | "options") {
            out.push_str(line.trim());
            out.push('\n');
        }
    }
    out
}

/// The upstreams in force: configured, or else those of resolv.conf, never cordon itself.
pub fn upstreams(config: &Network, resolv_conf: &str) -> Result<Vec<SocketAddr>, String> {
    let found: Vec<SocketAddr> = if config.upstream.is_empty() {
        original_nameservers(resolv_conf, config.listen)
    } else {
        config.upstream.iter().map(|u| u.0).collect()
    };
    let found: Vec<SocketAddr> = found.into_iter().filter(|a| a.ip() != config.listen.ip()).collect();
    if found.is_empty() {
        return Err("no upstream resolver: /etc/resolv.conf names none besides cordon itself".into());
    }
    Ok(found)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshReport {
    pub at: SystemTime,
    pub names: usize,
    pub addresses: usize,
    /// Addresses that appeared or disappeared since the previous lookup of their name.
    pub changed: usize,
    /// Names whose lookup failed upstream; their last known good addresses were renewed.
    pub failed: Vec<String>,
    /// Failed lookups over every refresh since start, this one included (for the metrics).
    pub failed_total: u64,
}

/// Everything egress shares with the supervisor and `status`.
pub struct Egress {
    /// The allowlist in force; reload, allow and deny replace it.
    pub policy: Arc<Policy>,
    pub admitter: Arc<Admitter>,
    pub stats: Arc<DnsStats>,
    pub resolver: TokioResolver,
    pub upstreams: Vec<SocketAddr>,
    pub listen: SocketAddr,
    pub last_good: LastGood,
    pub last_refresh: Mutex<Option<RefreshReport>>,
    /// Admissions made by the refresh last at least this long (until the next refresh).
    pub refresh_interval: Duration,
    /// Which names cordon's DNS answered with which addresses, for the name-bound layer.
    pub bindings: Arc<Bindings>,
    /// `network.ports`: name-checked with name binding, else address-based.
    pub ports: Vec<u16>,
    /// `network.name_binding`.
    pub name_binding: bool,
    /// `network.proxy_port`, when name binding is on.
    pub proxy_port: Option<u16>,
    /// The name-checking proxy, once the firewall stage has started it (name binding only).
    pub proxy: OnceLock<Arc<namebound::proxy::Ctx>>,
    /// Whether its service still serves: false once it stopped or failed (name-checked
    /// connections are then refused, never let through).
    pub proxy_serving: Arc<AtomicBool>,
    /// The firewall's plan in force and its sets' default timeout, once its stage has run: a live
    /// change that needs per-entry ports the plan lacks widens it (see `change`).
    pub firewall: Mutex<Option<(firewall::Plan, u32)>>,
    /// The journal of refused connections: the firewall's refusals (read from the kernel's
    /// packet log once the firewall stage started its reader) and the name-bound layer's.
    pub journal: Arc<journal::Journal>,
    /// Whether the packet-log reader runs (false: the firewall's refusals are rejected and
    /// counted, but not journalled).
    pub journal_reading: AtomicBool,
}

/// Where the resolver configuration lives; the `dns` stage points it at cordon.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The boot's `dns` stage. Before the firewall, which names the listener and the upstreams; and
/// before anything resolves a name (credentials, the clone), so every lookup from then on goes
/// through the allowlist. `resolv_conf` is the file as found at boot: it gives the upstreams
/// when none are configured, and is then rewritten in place to name cordon only.
pub fn start(
    network: &Network,
    entries: Vec<(Entry, String)>,
    resolv_conf: &str,
) -> crate::fix::StageResult<(Arc<Egress>, Service)> {
    let upstreams = upstreams(network, resolv_conf).map_err(|e| {
        Problem::new(e).with_fix("set network.upstream, e.g. [\"1.1.1.1\"], or give the container a resolver")
    })?;
    let sets = crate::egress::ipset::Ipset::open().map_err(|e| {
        Problem::caused_by("cannot open the netlink socket to ipset", &e)
            .with_fix("cordon needs CAP_NET_ADMIN: docker run --cap-add NET_ADMIN")
    })?;
    let sockets = dns::bind(network.listen).map_err(|e| {
        Problem::caused_by(format_args!("cannot bind the DNS server to {}", network.listen), &e)
            .with_fix("another DNS server holds the address; change network.listen")
    })?;
    let (egress, server) = Egress::start(network, entries, upstreams, Box::new(sets), sockets);
    // Already pointing at cordon only (a read-only root started with --dns 127.0.0.53): nothing
    // to write.
    let nameservers = parse_nameservers(resolv_conf);
    let ours = !nameservers.is_empty() && nameservers.iter().all(|ns| ns.ip() == network.listen.ip());
    if !ours {
        write_in_place(Path::new(RESOLV_CONF), &render_resolv_conf(network.listen, resolv_conf)).map_err(|e| {
            Problem::caused_by(format_args!("cannot point {RESOLV_CONF} at cordon's DNS server"), &e).with_fix(format!(
                "with a read-only root, start the container with --dns {} (Kubernetes: dnsPolicy None, \
                 dnsConfig.nameservers) and set network.upstream, or give it a writable {RESOLV_CONF}",
                network.listen.ip()
            ))
        })?;
    }
    let ups: Vec<String> = egress.upstreams.iter().map(ToString::to_string).collect();
    let detail = format!(
        "listening on {}, {} allowlist entries, upstream {}",
        network.listen,
        egress.policy.allowlist().len(),
        ups.join(" ")
    );
    Ok(((egress, server), detail))
}

/// The boot's `firewall` stage with the name-bound layer: the journal's packet-log reader
/// binds its group first, so the first refused packet is already journalled (without it the
/// firewall still refuses, and `warn` says the refusals are not journalled); the name-checking
/// proxy listens next (unless `network.name_binding = false`, which `warn` reports), so the
/// rules that redirect the agent's connections on the name-checked ports to it work the moment
/// they exist; then the rules ([`firewall::stage`]). The services are the caller's.
pub fn lock_down(
    network: &Network,
    egress: &Egress,
    resolv_conf: &str,
    metrics_port: Option<u16>,
    sys: &dyn crate::sys::effects::Effects,
    warn: &mut dyn FnMut(String),
) -> crate::fix::StageResult<Vec<Service>> {
    let mut services = Vec::new();
    match nflog::start(egress.journal.clone(), egress.bindings.clone()) {
        Ok(reader) => {
            egress.journal_reading.store(true, std::sync::atomic::Ordering::Relaxed);
            services.push(reader);
        }
        Err(e) => warn(format!(
            "the journal cannot read the kernel's packet log (NFLOG group {}): {e}; refused packets are rejected \
             and counted but not journalled (the kernel needs nfnetlink_log, and no other process may hold the group)",
            nflog::GROUP
        )),
    }
    let proxy = if network.name_binding {
        Some(namebound::start(network, egress)?)
    } else {
        warn(
            "name binding is OFF (network.name_binding = false): connections to admitted addresses are \
              address-based, any name sharing an address is reachable"
                .into(),
        );
        None
    };
    let ((), detail) =
        firewall::stage(network, egress, resolv_conf, metrics_port, sys).map_err(|e| Problem::from_fix(&e))?;
    services.extend(proxy);
    Ok((services, detail))
}

/// Rewrites a file's content in place (truncate and write), because /etc/resolv.conf is often a
/// bind mount (Docker, Kubernetes) that a rename cannot replace.
fn write_in_place(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).create(true).open(path)?;
    f.write_all(text.as_bytes())
}

impl Egress {
    /// Starts the DNS server on `sockets` (bound by the caller), admitting into `sets`; must
    /// run inside the runtime. The server is the returned service's.
    pub fn start(
        network: &Network,
        entries: Vec<(Entry, String)>,
        upstreams: Vec<SocketAddr>,
        sets: Box<dyn Sets>,
        sockets: dns::Sockets,
    ) -> (Arc<Egress>, Service) {
        let policy = Arc::new(Policy::new(entries, network.mode));
        let lifetimes = Lifetimes { min_ttl: network.min_ttl.0, grace: network.grace.0 };
        let admitter = Arc::new(Admitter::new(sets, network.allow_cidrs.clone(), lifetimes));
        let stats = Arc::new(DnsStats::default());
        let resolver = dns::upstream_resolver(&upstreams);
        let last_good = Arc::new(Mutex::new(BTreeMap::new()));
        let bindings = Arc::new(Bindings::new(bindings::DEFAULT_CAPACITY));
        let handler = Handler {
            bindings: bindings.clone(),
            policy: policy.clone(),
            resolver: resolver.clone(),
            admitter: admitter.clone(),
            stats: stats.clone(),
            last_good: last_good.clone(),
            cache: dns::answer_cache(),
            lookups: dns::lookup_permits(),
        };
        let listen = sockets.local_addr().unwrap_or(network.listen);
        let server = Service::spawn("dns", move |stop| dns::serve(sockets, handler, stop));
        let egress = Arc::new(Egress {
            policy,
            admitter,
            stats,
            resolver,
            upstreams,
            listen,
            last_good,
            last_refresh: Mutex::new(None),
            refresh_interval: network.refresh_interval.0,
            bindings,
            ports: network.ports.clone(),
            name_binding: network.name_binding,
            proxy_port: network.name_binding.then_some(network.proxy_port),
            proxy: OnceLock::new(),
            proxy_serving: Arc::new(AtomicBool::new(false)),
            firewall: Mutex::new(None),
            journal: Arc::new(journal::Journal::new(journal::Limits::default())),
            journal_reading: AtomicBool::new(false),
        });
        (egress, server)
    }

    /// Renews and re-resolves the exact allowlist names. First every known address is renewed
    /// until the next refresh, at once, so nothing lapses however long the lookups take; then
    /// every name is re-resolved, [`REFRESH_IN_FLIGHT`] at a time. A name whose lookup fails
    /// keeps its known addresses: new names fail closed, known ones keep working.
    pub async fn refresh(self: &Arc<Self>) -> RefreshReport {
        // Under the admission gate, with the allowlist in force under it: a change cannot
        // narrow the policy between the check and the renewal.
        let gate = self.policy.admission_gate();
        let allowlist = self.policy.allowlist();
        let names: Vec<String> = allowlist.exact_names().map(String::from).collect();
        // A name refreshed now must stay admitted until the next refresh has renewed it, whatever
        // its TTL: that starts an interval from now, or when this one ends if it takes longer.
        let floor = renewal_floor(self.refresh_interval, names.len());
        let known: Vec<(String, Vec<(IpAddr, u32)>)> = {
            let last = self.last_good.lock().unwrap_or_else(|e| e.into_inner());
            names.iter().filter_map(|n| last.get(n).map(|a| (n.clone(), a.clone()))).collect()
        };
        for (name, addresses) in &known {
            let Some(reach) = allowlist.lookup(name) else { continue };
            for &(ip, ttl) in addresses {
                match self.admitter.admit(name, ip, ttl.max(floor), &reach) {
                    Ok(admission::Verdict::Admitted) => {
                        let now = Instant::now();
                        self.bindings.bind(name, ip, now + self.admitter.lifetime(ttl.max(floor)), now);
                    }
                    Ok(admission::Verdict::Refused(_)) => {}
                    Err(e) => tracing::error!(name, %ip, "refresh cannot renew an admission: {e}"),
                }
            }
        }
        drop(gate);

        let mut waiting = names.iter().cloned();
        let mut lookups = tokio::task::JoinSet::new();
        // Each lookup's name by its task, so a lookup that panicked is reported failed too.
        let mut in_flight = std::collections::HashMap::new();
        let mut addresses = 0;
        let mut changed = 0;
        let mut failed = Vec::new();
        loop {
            while lookups.len() < REFRESH_IN_FLIGHT
                && let Some(name) = waiting.next()
            {
                let egress = self.clone();
                let task = name.clone();
                let id = lookups.spawn(async move { egress.resolve(&task, floor).await }).id();
                in_flight.insert(id, name);
            }
            let Some(joined) = lookups.join_next_with_id().await else { break };
            let (id, result) = match joined {
                Ok((id, result)) => (id, result),
                Err(e) => {
                    if let Some(name) = in_flight.get(&e.id()) {
                        tracing::error!(name, "the refresh's lookup ended without an answer: {e}");
                    }
                    (e.id(), Err(()))
                }
            };
            let Some(name) = in_flight.remove(&id) else { continue };
            let mut last = self.last_good.lock().unwrap_or_else(|e| e.into_inner());
            match result {
                Ok(fresh) => {
                    let before: std::collections::BTreeSet<IpAddr> =
                        last.get(&name).into_iter().flatten().map(|(ip, _)| *ip).collect();
                    let after: std::collections::BTreeSet<IpAddr> = fresh.iter().map(|(ip, _)| *ip).collect();
                    changed += before.symmetric_difference(&after).count();
                    addresses += fresh.len();
                    if fresh.is_empty() {
                        last.remove(&name);
                    } else {
                        last.insert(name, fresh);
                    }
                }
                Err(()) => {
                    addresses += last.get(&name).map_or(0, Vec::len);
                    failed.push(name);
                }
            }
        }
        failed.sort();
        self.admitter.prune();
        let mut last_refresh = self.last_refresh.lock().unwrap_or_else(|e| e.into_inner());
        let failed_total = last_refresh.as_ref().map_or(0, |r| r.failed_total) + failed.len() as u64;
        let report =
            RefreshReport { at: SystemTime::now(), names: names.len(), addresses, changed, failed, failed_total };
        *last_refresh = Some(report.clone());
        report
    }

    /// Resolves `name` (A and AAAA) and admits what it finds for at least `floor` seconds.
    /// Err when upstream failed (as opposed to answering that there is nothing).
    async fn resolve(&self, name: &str, floor: u32) -> Result<Vec<(IpAddr, u32)>, ()> {
        let allowlist = self.policy.allowlist();
        let Some(reach) = allowlist.lookup(name) else { return Ok(vec![]) };
        let Ok(qname) = Name::from_ascii(format!("{name}.")) else { return Ok(vec![]) };
        // Bounded, so that a refresh against a dead upstream still finishes and reports.
        let bounded = |qtype| tokio::time::timeout(REFRESH_LOOKUP_TIMEOUT, self.resolver.lookup(qname.clone(), qtype));
        let (a, aaaa) = tokio::join!(bounded(RecordType::A), bounded(RecordType::AAAA));
        let mut fresh = Vec::new();
        for (qtype, result) in [(RecordType::A, a), (RecordType::AAAA, aaaa)] {
            let Ok(result) = result else {
                tracing::warn!(name, %qtype, "refresh lookup timed out");
                self.stats
                    .upstream_failed(format!("refresh {name} {qtype}: no answer within {REFRESH_LOOKUP_TIMEOUT:?}"));
                return Err(());
            };
            match result {
                Ok(lookup) => {
                    let records: Vec<_> = lookup
                        .answers()
                        .iter()
                        .cloned()
                        .map(|mut r| {
                            r.ttl = r.ttl.max(floor);
                            r
                        })
                        .collect();
                    let (policy, admitter, bindings, stats) =
                        (&self.policy, &self.admitter, &self.bindings, &self.stats);
                    match dns::admit_in_force(policy, admitter, bindings, stats, &allowlist, name, &reach, &records) {
                        Ok(Some(filtered)) => fresh.extend(filtered.addresses),
                        // A change took the name away during the lookup: nothing to keep.
                        Ok(None) => return Ok(vec![]),
                        Err(e) => {
                            tracing::error!(name, "refresh cannot admit addresses: {e}");
                            return Err(());
                        }
                    }
                }
                Err(e) if e.is_nx_domain() || e.is_no_records_found() => {}
                Err(e) => {
                    tracing::warn!(name, %qtype, "refresh lookup failed: {e}");
                    self.stats.upstream_failed(format!("refresh {name} {qtype}: {e}"));
                    return Err(());
                }
            }
        }
        Ok(fresh)
    }

    /// The refresh, every `interval`, as a service.
    pub fn refresh_service(self: &Arc<Self>, interval: Duration) -> Service {
        let egress = self.clone();
        Service::spawn("refresh", move |mut stop| async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = stop.requested() => return,
                }
                let r = egress.refresh().await;
                if r.failed.is_empty() {
                    tracing::info!(names = r.names, addresses = r.addresses, changed = r.changed, "egress refreshed");
                } else {
                    tracing::warn!(
                        names = r.names,
                        addresses = r.addresses,
                        failed = r.failed.len(),
                        "egress refreshed; upstream failed for some names, their last known addresses were kept"
                    );
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Records what would go into the kernel's sets.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<(String, IpAddr)>>>);

    impl Sets for Recorder {
        fn add(&mut self, set: &str, ip: IpAddr, _timeout: u32) -> std::io::Result<()> {
            self.0.lock().unwrap().push((set.to_string(), ip));
            Ok(())
        }
    }

    /// An upstream on 127.0.0.1:0 that answers every A query with 192.0.2.7 and records the
    /// names it was asked.
    fn fake_upstream() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
        use hickory_server::proto::op::Message;
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let seen = asked.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
                let Some(q) = query.queries.first() else { continue };
                seen.lock().unwrap().push(q.name().to_ascii());
                let _ = sock.send_to(&fake_answer(&query), from);
            }
        });
        (addr, asked)
    }

    /// The fake upstreams' answer to `query` (it has a question): A 192.0.2.7, no AAAA.
    fn fake_answer(query: &hickory_server::proto::op::Message) -> Vec<u8> {
        use hickory_server::proto::op::{Message, MessageType};
        use hickory_server::proto::rr::rdata::A;
        use hickory_server::proto::rr::{RData, Record};
        let q = query.queries[0].clone();
        let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
        reply.metadata.message_type = MessageType::Response;
        reply.metadata.recursion_available = true;
        if q.query_type() == RecordType::A {
            reply.add_answer(Record::from_rdata(q.name().clone(), 60, RData::A(A::new(192, 0, 2, 7))));
        }
        reply.add_query(q);
        reply.to_vec().unwrap()
    }

    /// One A query to `server`; the response.
    async fn ask(server: SocketAddr, name: &str) -> hickory_server::proto::op::Message {
        use hickory_server::proto::op::{Message, Query};
        let mut query = Message::query();
        query.metadata.id = 4242;
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.send_to(&query.to_vec().unwrap(), server).await.unwrap();
        let mut buf = [0u8; 1500];
        let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf)).await.expect("an answer").unwrap();
        Message::from_vec(&buf[..n]).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_dns_handler_runs_in_process_on_port_0_without_root() {
        use hickory_server::proto::op::ResponseCode;
        let (upstream, asked) = fake_upstream();
        let entries = crate::config::allowlist::parse_file("api.example.com\n", Path::new("t")).unwrap();
        let sets = Recorder::default();
        let network = Network::default();
        let sockets = dns::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let server = sockets.local_addr().unwrap();
        let (egress, service) = Egress::start(&network, entries, vec![upstream], Box::new(sets.clone()), sockets);
        assert_eq!(egress.listen, server);

        let denied = ask(server, "exfil.example.net.").await;
        assert_eq!(denied.metadata.response_code, ResponseCode::NXDomain);
        let allowed = ask(server, "api.example.com.").await;
        assert_eq!(allowed.metadata.response_code, ResponseCode::NoError);
        assert_eq!(allowed.metadata.id, 4242);
        assert!(allowed.answers.iter().any(|r| r.data.to_string() == "192.0.2.7"), "{allowed:?}");
        assert_eq!(*sets.0.lock().unwrap(), [("cordon4".to_string(), "192.0.2.7".parse().unwrap())]);
        assert_eq!(*asked.lock().unwrap(), ["api.example.com."], "the denied name never went upstream");

        assert!(service.stop(Duration::from_secs(2)).await, "the server stops when asked");
    }

    /// The counters of one thread of this process: (user + system ticks, voluntary context
    /// switches), from /proc. Not `supervise::idle::cpu_ms`, which adds the children's time:
    /// other tests reap children in this process meanwhile.
    fn thread_counters(tid: &str) -> (u64, u64) {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        let switches = status.lines().find_map(|l| l.strip_prefix("voluntary_ctxt_switches:")).unwrap();
        (ticks, switches.trim().parse().unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_udp_loop_sleeps_when_idle_wakes_for_a_query_and_ends_with_the_server() {
        use hickory_server::proto::op::ResponseCode;
        let entries = crate::config::allowlist::parse_file("api.example.com\n", Path::new("t")).unwrap();
        let sockets = dns::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let server = sockets.local_addr().unwrap();
        let (upstream, _) = fake_upstream();
        let (_, service) =
            Egress::start(&Network::default(), entries, vec![upstream], Box::new(Recorder::default()), sockets);
        // The loop's thread, by its name (other tests' servers run in this process too).
        let name = format!("dns-udp-{}", server.port());
        let find = || {
            std::fs::read_dir("/proc/self/task").unwrap().flatten().find_map(|task| {
                let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
                (comm.trim_end() == name).then(|| task.file_name().into_string().unwrap())
            })
        };
        // The server starts in a task of its own: give it a moment.
        let mut tid = None;
        for _ in 0..200 {
            tid = find();
            if tid.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let tid = tid.expect("the UDP loop runs on a thread named by its port");

        // A burst, so the loop finds a queue and naps: sent at once, answered all.
        let burst = 64;
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for id in 0..burst {
            let mut query = hickory_server::proto::op::Message::query();
            query.metadata.id = id;
            let name = Name::from_ascii(format!("n{id}.exfil.example.net.")).unwrap();
            query.add_query(hickory_server::proto::op::Query::query(name, RecordType::A));
            client.send_to(&query.to_vec().unwrap(), server).await.unwrap();
        }
        let mut buf = [0u8; 1500];
        for _ in 0..burst {
            tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf)).await.expect("an answer").unwrap();
            assert_eq!(buf[3] & 0x0f, 3, "NXDOMAIN");
        }
        // The queue gone, the loop waits in poll(2): a second later it has not run. Napping
        // on, it would have switched tens of thousands of times.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (ticks, switches) = thread_counters(&tid);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (ticks_after, switches_after) = thread_counters(&tid);
        assert!(switches_after - switches <= 2, "idle, the loop woke {} times", switches_after - switches);
        assert!(ticks_after - ticks <= 1, "idle, the loop ran {} ticks", ticks_after - ticks);

        // A query wakes it at once.
        assert_eq!(ask(server, "exfil.example.net.").await.metadata.response_code, ResponseCode::NXDomain);

        assert!(service.stop(Duration::from_secs(2)).await);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while find().is_some() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(find(), None, "the loop's thread ends with the server");
    }

    /// An upstream on 127.0.0.1:0 that holds every query until it holds `hold` (or `release` is
    /// set) and none has come for 30 ms, then answers them all (A: 192.0.2.7, AAAA: none);
    /// records the most it held at once.
    fn holding_upstream(hold: usize) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicBool>) {
        use hickory_server::proto::op::Message;
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(30))).unwrap();
        let addr = sock.local_addr().unwrap();
        let most = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(AtomicBool::new(false));
        let (seen, released) = (most.clone(), release.clone());
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let mut held: Vec<(Message, SocketAddr)> = Vec::new();
            let mut buf = [0u8; 1500];
            while std::time::Instant::now() < deadline {
                match sock.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        if let Ok(query) = Message::from_vec(&buf[..n])
                            && !query.queries.is_empty()
                        {
                            held.push((query, from));
                            seen.fetch_max(held.len(), Ordering::Relaxed);
                        }
                    }
                    Err(_) if held.len() < hold && !released.load(Ordering::Relaxed) => {}
                    Err(_) => {
                        for (query, from) in held.drain(..) {
                            let _ = sock.send_to(&fake_answer(&query), from);
                        }
                    }
                }
            }
        });
        (addr, most, release)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refresh_resolves_a_bounded_number_of_names_at_once() {
        // Each name is asked A and AAAA: the upstream answers once it holds a full window.
        let (upstream, most, _) = holding_upstream(2 * REFRESH_IN_FLIGHT);
        let names = 3 * REFRESH_IN_FLIGHT;
        let text: String = (0..names).map(|i| format!("n{i}.example.com\n")).collect();
        let entries = crate::config::allowlist::parse_file(&text, Path::new("t")).unwrap();
        let sets = Recorder::default();
        let sockets = dns::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (egress, service) =
            Egress::start(&Network::default(), entries, vec![upstream], Box::new(sets.clone()), sockets);

        let report = egress.refresh().await;
        assert_eq!((report.names, report.addresses), (names, names), "every name resolved: {report:?}");
        assert!(report.failed.is_empty(), "{report:?}");
        // Three full windows, never more (unbounded, it held all 192 queries at once).
        assert_eq!(most.load(Ordering::Relaxed), 2 * REFRESH_IN_FLIGHT, "queries held at once");
        assert!(service.stop(Duration::from_secs(2)).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_query_beyond_the_lookups_in_flight_is_answered_at_once_stale_or_servfail_saying_why() {
        use hickory_server::proto::op::{Edns, Message, Query, ResponseCode};
        let query = |id: u16, name: &str, edns: bool| {
            let mut m = Message::query();
            m.metadata.id = id;
            m.metadata.recursion_desired = true;
            m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
            if edns {
                m.set_edns(Edns::new());
            }
            m.to_vec().unwrap()
        };
        // The EDNS option as sent: EDE (15), its length, the code, the text.
        let ede = |code: u16, text: &str| {
            let mut o = vec![0, 15];
            o.extend_from_slice(&(2 + text.len() as u16).to_be_bytes());
            o.extend_from_slice(&code.to_be_bytes());
            o.extend_from_slice(text.as_bytes());
            o
        };
        let extra = 8;
        // Answers when told to (`release`), else holds every query: the extra ones find no
        // permit free.
        let (upstream, most, release) = holding_upstream(usize::MAX);
        let entries = crate::config::allowlist::parse_file("*.example.com\n", Path::new("t")).unwrap();
        let sockets = dns::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (egress, service) =
            Egress::start(&Network::default(), entries, vec![upstream], Box::new(Recorder::default()), sockets);
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = [0u8; 1500];
        let mut receive = async || {
            let n =
                tokio::time::timeout(Duration::from_secs(10), client.recv(&mut buf)).await.expect("an answer").unwrap();
            buf[..n].to_vec()
        };

        // A name with last good addresses, asked without EDNS: its cached answer does not
        // serve the EDNS query below, which takes the full path.
        release.store(true, Ordering::Relaxed);
        client.send_to(&query(1, "known.example.com.", false), egress.listen).await.unwrap();
        assert_eq!(receive().await[3] & 0x0f, 0, "answered while upstream answers");
        release.store(false, Ordering::Relaxed);

        let total = dns::LOOKUPS_IN_FLIGHT + extra;
        for i in 0..total {
            client.send_to(&query(100 + i as u16, &format!("n{i}.example.com."), true), egress.listen).await.unwrap();
        }
        let servfail = ede(0, "cordon: too many lookups waiting on upstream, try again");
        for _ in 0..extra {
            let r = receive().await;
            assert_eq!(r[3] & 0x0f, 2, "only the queries beyond the bound are answered now: {r:?}");
            assert!(r.windows(servfail.len()).any(|w| w == servfail), "EDE 0 with the reason: {r:?}");
        }
        // Every permit is held: the known name is answered at once from its last good
        // addresses, saying so.
        client.send_to(&query(2, "known.example.com.", true), egress.listen).await.unwrap();
        let stale = Message::from_vec(&receive().await).unwrap();
        assert_eq!((stale.metadata.id, stale.metadata.response_code), (2, ResponseCode::NoError));
        let answers: Vec<(String, u32)> = stale.answers.iter().map(|r| (r.data.to_string(), r.ttl)).collect();
        assert_eq!(answers, [("192.0.2.7".to_string(), 30)], "the last good address, with the stale TTL");
        let stale_ede = ede(3, "cordon: too many lookups waiting on upstream; answered from the last good addresses");
        let bytes = stale.to_vec().unwrap();
        assert!(bytes.windows(stale_ede.len()).any(|w| w == stale_ede), "EDE 3 with the reason: {stale:?}");

        release.store(true, Ordering::Relaxed);
        for _ in 0..dns::LOOKUPS_IN_FLIGHT {
            assert_eq!(receive().await[3] & 0x0f, 0, "the held queries are answered once upstream does");
        }
        assert_eq!(most.load(Ordering::Relaxed), dns::LOOKUPS_IN_FLIGHT, "upstream never held more than the bound");
        let stats = &egress.stats;
        let counts = [&stats.busy, &stats.failed, &stats.stale].map(|c| c.load(Ordering::Relaxed));
        assert_eq!(counts, [extra as u64 + 1, extra as u64, 1], "busy, failed, stale");
        assert!(service.stop(Duration::from_secs(2)).await);
    }

    #[test]
    fn a_renewal_outlasts_the_longest_refresh_after_the_interval() {
        let interval = Duration::from_secs(300);
        assert_eq!(renewal_floor(interval, 0), 300);
        assert_eq!(renewal_floor(interval, 1), 305, "one round of lookups that all time out");
        assert_eq!(renewal_floor(interval, REFRESH_IN_FLIGHT), 305);
        assert_eq!(renewal_floor(interval, REFRESH_IN_FLIGHT + 1), 310);
        assert_eq!(renewal_floor(interval, 1000), 300 + 5 * 32, "1,000 names: 32 rounds");
        assert_eq!(renewal_floor(Duration::MAX, 1), u32::MAX);
    }

    const DOCKER: &str = "# Generated by Docker Engine.\nnameserver 127.0.0.11\nsearch corp.example\noptions ndots:0\n";

    #[test]
    fn nameservers_come_from_resolv_conf_in_order() {
        let text = "nameserver 10.0.0.2\n# nameserver 9.9.9.9\nnameserver fe80::1%eth0\nnameserver bogus\n";
        let got: Vec<String> = parse_nameservers(text).iter().map(ToString::to_string).collect();
        assert_eq!(got, ["10.0.0.2:53", "[fe80::1]:53"]);
    }

    #[test]
    fn resolv_conf_points_at_cordon_and_keeps_search_and_options() {
        let out = render_resolv_conf("127.0.0.53:53".parse().unwrap(), DOCKER);
        assert_eq!(
            out,
            "# Written by cordon: every lookup goes through its allowlist DNS server.\n\
             # cordon replaced: nameserver 127.0.0.11\n\
             nameserver 127.0.0.53\nsearch corp.example\noptions ndots:0\n"
        );
    }

    #[test]
    fn a_restart_on_the_resolv_conf_cordon_wrote_finds_the_same_upstreams() {
        let listen: SocketAddr = "127.0.0.53:53".parse().unwrap();
        let first = render_resolv_conf(listen, DOCKER);
        let second = render_resolv_conf(listen, &first);
        assert_eq!(second, first, "rewriting is idempotent");
        let net = Network::default();
        assert_eq!(upstreams(&net, &second).unwrap(), ["127.0.0.11:53".parse().unwrap()]);
        assert_eq!(resolver_addresses(&second, &[], listen), ["127.0.0.11".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn resolver_addresses_are_resolv_conf_upstreams_and_docker_but_never_cordon() {
        let listen: SocketAddr = "127.0.0.53:53".parse().unwrap();
        let original = "nameserver 10.96.0.10\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\n";
        let ups = ["192.0.2.1:5353".parse().unwrap(), "10.96.0.10:53".parse().unwrap()];
        let ips: Vec<String> = resolver_addresses(original, &ups, listen).iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["10.96.0.10", "fe80::1", "192.0.2.1", "127.0.0.11"]);
        let ips = resolver_addresses(DOCKER, &[], listen);
        assert_eq!(ips, [DOCKER_RESOLVER], "Docker's resolver once");
    }

    #[test]
    fn upstreams_default_to_resolv_conf_and_never_include_cordon() {
        let mut net = Network::default();
        assert_eq!(upstreams(&net, DOCKER).unwrap(), ["127.0.0.11:53".parse().unwrap()]);
        assert!(upstreams(&net, "nameserver 127.0.0.53\n").unwrap_err().contains("no upstream"));
        net.upstream = vec!["192.0.2.1:5353".parse().unwrap()];
        assert_eq!(upstreams(&net, DOCKER).unwrap(), ["192.0.2.1:5353".parse().unwrap()]);
    }
}
