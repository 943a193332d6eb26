//! Egress as a whole: the DNS server, the admission table, the refresh, and the shared state
//! `status` reads. Built by the boot's `dns` stage, kept alive by the supervisor.

pub mod addrs;
pub mod admission;
pub mod dns;
pub mod firewall;
pub mod ipset;
pub mod namebound;
pub mod probe;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use hickory_resolver::TokioResolver;
use hickory_server::proto::rr::{Name, RecordType};

use self::dns::{DnsStats, Handler, LastGood};
use crate::config::Network;
use crate::config::allowlist::{Allowlist, Entry};
use crate::egress::admission::{Admitter, Lifetimes};
use crate::egress::namebound::bindings::{self, Bindings};

/// How long the refresh waits for one lookup.
const REFRESH_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Docker's embedded resolver. On a user-defined network 127.0.0.11:53 is a NAT redirect to a
/// random high port on the same address, readable in /proc/net/udp, so the address as a whole
/// is a resolver, whatever the configuration says.
pub const DOCKER_RESOLVER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 11));

/// Every address the agent must not reach on any port because a resolver answers there: the
/// nameservers of resolv.conf as found at boot (before cordon rewrites it), the upstreams in
/// force, and Docker's embedded resolver; never cordon's own listener. In order, deduplicated.
pub fn resolver_addresses(original_resolv_conf: &str, upstreams: &[SocketAddr], listen: SocketAddr) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    let found = parse_nameservers(original_resolv_conf).into_iter().chain(upstreams.iter().copied());
    for ip in found.map(|a| a.ip()).chain([DOCKER_RESOLVER]) {
        if ip != listen.ip() && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// resolv.conf pointing at cordon's listener only, keeping the original `search`, `domain`
/// and `options` lines (Kubernetes relies on its search list).
pub fn render_resolv_conf(listen: SocketAddr, original: &str) -> String {
    let mut out = String::from("# Written by cordon: every lookup goes through its allowlist DNS server.\n");
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
        parse_nameservers(resolv_conf)
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
}

/// Everything egress shares with the supervisor and `status`.
pub struct Egress {
    pub allowlist: Arc<Allowlist>,
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
    /// Its task: finished means the layer stopped (name-checked connections are then refused).
    pub proxy_task: OnceLock<tokio::task::JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("cannot open the netlink socket to ipset")]
    Ipset(#[source] std::io::Error),
    #[error("cannot bind the DNS server to {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl Egress {
    /// Binds the DNS server on `listen` and starts serving; must run inside the runtime.
    pub fn start(
        network: &Network,
        entries: Vec<(Entry, String)>,
        upstreams: Vec<SocketAddr>,
    ) -> Result<Arc<Egress>, EgressError> {
        let sets = crate::egress::ipset::Ipset::open().map_err(EgressError::Ipset)?;
        let allowlist = Arc::new(Allowlist::new(entries));
        let lifetimes = Lifetimes { min_ttl: network.min_ttl.0, grace: network.grace.0 };
        let admitter = Arc::new(Admitter::new(Box::new(sets), network.allow_cidrs.clone(), lifetimes));
        let stats = Arc::new(DnsStats::default());
        let resolver = dns::upstream_resolver(&upstreams);
        let last_good = Arc::new(Mutex::new(BTreeMap::new()));
        let bindings = Arc::new(Bindings::new(bindings::DEFAULT_CAPACITY));
        let handler = Handler {
            bindings: bindings.clone(),
            allowlist: allowlist.clone(),
            resolver: resolver.clone(),
            admitter: admitter.clone(),
            stats: stats.clone(),
            last_good: last_good.clone(),
        };
        let mut server =
            dns::serve(network.listen, handler).map_err(|source| EgressError::Bind { addr: network.listen, source })?;
        tokio::spawn(async move {
            if let Err(e) = server.block_until_done().await {
                tracing::error!("the DNS server stopped: {e}");
            }
        });
        Ok(Arc::new(Egress {
            allowlist,
            admitter,
            stats,
            resolver,
            upstreams,
            listen: network.listen,
            last_good,
            last_refresh: Mutex::new(None),
            refresh_interval: network.refresh_interval.0,
            bindings,
            ports: network.ports.clone(),
            name_binding: network.name_binding,
            proxy_port: network.name_binding.then_some(network.proxy_port),
            proxy: OnceLock::new(),
            proxy_task: OnceLock::new(),
        }))
    }

    /// Renews and re-resolves the exact allowlist names. First every known address is renewed
    /// until the next refresh, at once, so nothing lapses however long the lookups take; then
    /// every name is re-resolved, concurrently. A name whose lookup fails keeps its known
    /// addresses: new names fail closed, known ones keep working.
    pub async fn refresh(self: &Arc<Self>) -> RefreshReport {
        // A name refreshed now must stay admitted until the next refresh, whatever its TTL.
        let floor = u32::try_from(self.refresh_interval.as_secs()).unwrap_or(u32::MAX);
        let names: Vec<String> = self.allowlist.exact_names().map(String::from).collect();
        let known: Vec<(String, Vec<(IpAddr, u32)>)> = {
            let last = self.last_good.lock().unwrap_or_else(|e| e.into_inner());
            names.iter().filter_map(|n| last.get(n).map(|a| (n.clone(), a.clone()))).collect()
        };
        for (name, addresses) in &known {
            let Some(reach) = self.allowlist.lookup(name) else { continue };
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

        let mut lookups = tokio::task::JoinSet::new();
        for name in names.iter().cloned() {
            let egress = self.clone();
            lookups.spawn(async move {
                let result = egress.resolve(&name, floor).await;
                (name, result)
            });
        }
        let mut addresses = 0;
        let mut changed = 0;
        let mut failed = Vec::new();
        while let Some(joined) = lookups.join_next().await {
            let Ok((name, result)) = joined else { continue };
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
        let report = RefreshReport { at: SystemTime::now(), names: names.len(), addresses, changed, failed };
        *self.last_refresh.lock().unwrap_or_else(|e| e.into_inner()) = Some(report.clone());
        report
    }

    /// Resolves `name` (A and AAAA) and admits what it finds for at least `floor` seconds.
    /// Err when upstream failed (as opposed to answering that there is nothing).
    async fn resolve(&self, name: &str, floor: u32) -> Result<Vec<(IpAddr, u32)>, ()> {
        let Some(reach) = self.allowlist.lookup(name) else { return Ok(vec![]) };
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
                    match dns::admit_answer(&self.admitter, &self.bindings, &self.stats, name, &reach, &records) {
                        Ok(filtered) => fresh.extend(filtered.addresses),
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

    /// Runs the refresh every `interval` until the runtime stops.
    pub fn spawn_refresh(self: &Arc<Self>, interval: Duration) {
        let egress = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
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
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
             nameserver 127.0.0.53\nsearch corp.example\noptions ndots:0\n"
        );
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
