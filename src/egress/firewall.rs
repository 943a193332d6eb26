//! The egress firewall: default-deny for every uid but root, IPv4 and IPv6 alike.
//!
//! The ruleset is static after boot and rendered from a plan (pure, snapshot-tested); what
//! changes at run time is only the content of the ipset allow sets, which the DNS server fills
//! as it answers (see `admission`). The rules are applied with `iptables-restore --noflush`,
//! one transaction per family, rather than with the `iptables` crate: one exec instead of one
//! per rule, all-or-nothing, and it leaves the runtime's own chains (Docker's DNS NAT) alone.
//!
//! `OUTPUT` has one jump, to `CORDON_OUTPUT`, which every locally generated packet enters:
//!   1. Multicast membership reports (IGMP; MLD but the system's own solicited-node ones):
//!      drop. The kernel sends them from no socket, so the owner match below never sees them,
//!      and a group address can carry data.
//!   2. Packets from a socket owned by uid 1..=4294967294 go on to `CORDON_AGENT` (root-owned
//!      sockets, such as cordon's own and the platform's SSH daemon, never do).
//!
//! `CORDON_AGENT`:
//!   1. Established/related in the reply direction (the agent's listening sockets answering
//!      connections others opened), and established/related connections carrying cordon's
//!      connmark bit (the agent's own allowed connections): accept. Conntrack state alone is
//!      not enough: the agent could send on a flow root opened.
//!   2. DNS to cordon's listener: accept.
//!   3. Anything to a resolver (resolv.conf's, the upstreams, Docker's 127.0.0.11), and DNS
//!      (port 53, before NAT) anywhere else: refuse (`resolver`).
//!   4. Loopback (also the container's own addresses): refuse cordon's metrics port
//!      (`[metrics] listen`), accept on `network.loopback_ports`, refuse the rest (`loopback`).
//!   5. New TCP to an admitted address on an allowed port: mark the connection, accept.
//!   6. Everything else: refuse at once, counted: TCP to an address of an allow set (`port`),
//!      other TCP (`not-admitted`), any other protocol (`udp-icmp`).
//!
//! To refuse is to jump to that reason's chain (`CORDON_REFUSE_*`), which logs the packet to
//! the kernel's packet log for the journal (NFLOG, rate-limited, see `egress::journal`; only
//! when cordon reads the log, [`Plan::log`]), then rejects it: TCP with a reset, DNS over UDP as an unreachable port, the rest as
//! administratively prohibited.
//!
//! With name binding (`network.name_binding`, the default), the name-checked ports change
//! hands. In the nat table, `OUTPUT` has one jump, to `CORDON_NAT`, where new TCP of the agent's
//! uids to an admitted address on a name-checked port (`network.ports`, and each `name:port`
//! not marked `:raw`) is redirected to cordon's proxy on loopback (127.0.0.1 or [::1],
//! `network.proxy_port`); the proxy reads the name and connects as root, or resets. In
//! `CORDON_AGENT`, before the loopback rules (step 4), a connection to the proxy port is accepted (and
//! marked) only when the kernel redirected it (`--ctstate DNAT`): the agent connecting to the
//! proxy port itself meets the loopback reject. Step 5 then accepts only the `:raw` ports,
//! which stay address-based; a name-checked port reached without the redirect is rejected.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::config::PortRange;
use crate::sys::effects::Effects;

pub const CHAIN: &str = "CORDON_AGENT";
/// Entered by every locally generated packet, from the one jump in `OUTPUT`.
pub const OUTPUT_CHAIN: &str = "CORDON_OUTPUT";
/// Marks a new connection as the agent's own allowed one, then accepts it.
pub const ALLOW_CHAIN: &str = "CORDON_ALLOW";
/// Lets MLDv2 reports of solicited-node groups through, drops every other (IPv6; declared,
/// empty, for IPv4 too, so both families have the same chains).
pub const MLD_CHAIN: &str = "CORDON_MLD";
/// The refusal chains, one per reason of the journal (`egress::journal::Reason`): each logs
/// the packet to the kernel's packet log (NFLOG, group `nflog::GROUP`, the reason as prefix,
/// rate-limited), then rejects it. Every refusal of `CORDON_AGENT` is a jump to one of them.
pub const REFUSE_RESOLVER: &str = "CORDON_REFUSE_RESOLVER";
pub const REFUSE_LOOPBACK: &str = "CORDON_REFUSE_LOOPBACK";
pub const REFUSE_PORT: &str = "CORDON_REFUSE_PORT";
pub const REFUSE_ADDR: &str = "CORDON_REFUSE_ADDR";
pub const REFUSE_PROTO: &str = "CORDON_REFUSE_PROTO";
/// Each refusal chain and the journal reason it logs.
pub const REFUSALS: [(&str, crate::egress::journal::Reason); 5] = {
    use crate::egress::journal::Reason;
    [
        (REFUSE_RESOLVER, Reason::Resolver),
        (REFUSE_LOOPBACK, Reason::Loopback),
        (REFUSE_PORT, Reason::Port),
        (REFUSE_ADDR, Reason::NotAdmitted),
        (REFUSE_PROTO, Reason::UdpIcmp),
    ]
};
const CHAINS: [&str; 9] = [
    OUTPUT_CHAIN,
    MLD_CHAIN,
    CHAIN,
    ALLOW_CHAIN,
    REFUSE_RESOLVER,
    REFUSE_LOOPBACK,
    REFUSE_PORT,
    REFUSE_ADDR,
    REFUSE_PROTO,
];

/// The kernel's own rate limit on logging, per refusal chain (xt_limit: a token bucket of
/// `--limit-burst` packets refilled at `--limit`): a flood of refused packets is still refused
/// in full, but only this many a second per chain cost a log message to cordon. Packets over
/// it are refused unlogged; the chains' packet counters (`status`: rejected) still count them.
const LOG_LIMIT: &str = "-m limit --limit 50/sec --limit-burst 100";
/// In the nat table: redirects the agent's name-checked connections to the proxy. Declared
/// (empty) without name binding too, so a restart with it turned off replaces a previous run's.
pub const NAT_CHAIN: &str = "CORDON_NAT";

/// The connmark bit of connections the agent was allowed to open. One bit, always set and
/// matched under its own mask, clear of the bits Docker, kube-proxy (0x4000, 0x8000), Calico
/// (0xffff0000 is its packet-mark default, but it never sets connmarks there) and Cilium
/// (0x0f00, 0x0200) use.
pub const CONNMARK: u32 = 0x0010_0000;

/// The agent's uids: every socket owner but root. Sockets without an owner (kernel packets)
/// and root's (cordon's own, the proxy's upstream connections) never match.
const OWNER_MATCH: &str = "-m owner --uid-owner 1-4294967294";
/// The jump that sends the agent's packets to its chain.
const OWNER_JUMP: &str = "-m owner --uid-owner 1-4294967294 -j CORDON_AGENT";

/// The largest MLDv2 report let out: the kernel bundles pending changes, so bringing up an
/// interface with a link-local and two global addresses reports up to three solicited-node
/// groups at once.
const MLD2_MAX_RECORDS: usize = 4;

/// The `-m u32` matches for an MLDv2 report (RFC 3810 5.2) of exactly `records` records, each
/// with no sources and a solicited-node group ff02::1:ffXX:XXXX (RFC 4291 2.7.1), as the kernel
/// builds it: IPv6 header (40 bytes), a hop-by-hop header with Router Alert (8 bytes, next
/// header ICMPv6), the report (8 bytes), then 20 bytes per record. Offsets are from the IPv6
/// header; a report with any other group, or of another shape, matches none of them.
fn mld2_solicited_node_only(records: usize) -> String {
    let mut tests = vec![
        "0x4&0xff00=0x0".to_string(),             // next header: hop-by-hop
        "0x28&0xffff0000=0x3a000000".to_string(), // hop-by-hop: next ICMPv6, 8 bytes long
        "0x30&0xff000000=0x8f000000".to_string(), // type 143
        format!("0x34&0xffff={records:#x}"),      // number of records
    ];
    for i in 0..records {
        let at = 0x38 + 20 * i;
        tests.push(format!("{at:#x}&0xffffff=0x0")); // no aux data, no sources
        tests.push(format!("{:#x}=0xff020000", at + 4));
        tests.push(format!("{:#x}=0x0", at + 8));
        tests.push(format!("{:#x}=0x1", at + 12));
        tests.push(format!("{:#x}&0xff000000=0xff000000", at + 16));
    }
    // A u32 match holds at most 10 tests (XT_U32_MAXSIZE).
    tests.chunks(10).map(|c| format!("-m u32 --u32 \"{}\"", c.join("&&"))).collect::<Vec<_>>().join(" ")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn ipset_family(self) -> &'static str {
        match self {
            Family::V4 => "inet",
            Family::V6 => "inet6",
        }
    }

    fn loopback(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::from([127, 0, 0, 1]),
            Family::V6 => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        }
    }

    fn prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

/// The name of the allow set for a family and, for a per-entry port, that port.
pub fn set_name(family: Family, port: Option<u16>) -> String {
    let f = match family {
        Family::V4 => "4",
        Family::V6 => "6",
    };
    match port {
        None => format!("cordon{f}"),
        Some(p) => format!("cordon{f}-p{p}"),
    }
}

/// The allow set of an address-based `name:port:raw` entry's port.
pub fn raw_set_name(family: Family, port: u16) -> String {
    let f = match family {
        Family::V4 => "4",
        Family::V6 => "6",
    };
    format!("cordon{f}-r{port}")
}

/// The suffix of a set's temporary twin, created fresh at boot and swapped in.
const NEW_SUFFIX: &str = ".new";

/// Whether a set name is one cordon makes (an allow set or its temporary twin).
fn is_cordon_set(name: &str) -> bool {
    let name = name.strip_suffix(NEW_SUFFIX).unwrap_or(name);
    let Some(rest) = name.strip_prefix("cordon4").or_else(|| name.strip_prefix("cordon6")) else { return false };
    let port = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    rest.is_empty() || rest.strip_prefix("-p").is_some_and(port) || rest.strip_prefix("-r").is_some_and(port)
}

/// What the rules are made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub listen: SocketAddr,
    /// Addresses where a resolver answers: refused to the agent on every port and protocol.
    pub resolvers: Vec<IpAddr>,
    /// Ports open on addresses admitted for entries without a port.
    pub ports: Vec<u16>,
    /// Ports of `name:port` entries, each with its own set.
    pub extra_ports: Vec<u16>,
    /// Ports of `name:port:raw` entries, each with its own set: address-based, never redirected.
    pub raw_ports: Vec<u16>,
    /// Ports the agent may reach on loopback besides the DNS listener.
    pub loopback_ports: Vec<PortRange>,
    /// Name binding: the proxy's loopback port, where `ports` and `extra_ports` are redirected.
    /// None: those ports are address-based like `raw_ports` (`network.name_binding = false`).
    pub proxy_port: Option<u16>,
    /// The refusal chains log to the kernel's packet log for the journal: only when cordon
    /// reads it (`nflog::start` bound the group). A kernel without the packet log then gets the
    /// same refusals, unlogged, rather than a ruleset it cannot load.
    pub log: bool,
    /// `metrics.listen`'s port: refused to the agent on every local address, whatever
    /// address the listener is bound to (loopback, or every address for a platform's scraper).
    pub metrics_port: Option<u16>,
}

impl Plan {
    /// Every set the rules reference.
    pub fn sets(&self) -> Vec<(Family, String)> {
        let mut sets = Vec::new();
        for family in [Family::V4, Family::V6] {
            sets.push((family, set_name(family, None)));
            for &p in &self.extra_ports {
                sets.push((family, set_name(family, Some(p))));
            }
            for &p in &self.raw_ports {
                sets.push((family, raw_set_name(family, p)));
            }
        }
        sets
    }
}

/// The chains for one family, as `iptables-restore --noflush` input without the `*filter` and
/// `COMMIT` lines. Declaring a chain flushes it, so applying it again replaces the rules whole.
pub fn render_chains(plan: &Plan, family: Family) -> String {
    let (reject, proto_unreach) = match family {
        Family::V4 => ("icmp-admin-prohibited", "icmp-port-unreachable"),
        Family::V6 => ("icmp6-adm-prohibited", "icmp6-port-unreachable"),
    };
    let mut r = String::new();
    for chain in CHAINS {
        let _ = writeln!(r, ":{chain} - [0:0]");
    }
    let mut add = |chain: &str, s: &str| {
        let _ = writeln!(r, "-A {chain} {s}");
    };
    match family {
        // Every IGMP packet: the system needs none (ARP, not IGMP, finds IPv4 neighbours).
        Family::V4 => add(OUTPUT_CHAIN, "-p igmp -j DROP"),
        Family::V6 => {
            // MLDv1 report: its destination is the group. Done (132): a router learns a
            // departure from the next query anyway.
            add(OUTPUT_CHAIN, "! -d ff02::1:ff00:0/104 -p ipv6-icmp -m icmp6 --icmpv6-type 131 -j DROP");
            add(OUTPUT_CHAIN, "-p ipv6-icmp -m icmp6 --icmpv6-type 132 -j DROP");
            add(OUTPUT_CHAIN, &format!("-p ipv6-icmp -m icmp6 --icmpv6-type 143 -j {MLD_CHAIN}"));
            for records in 1..=MLD2_MAX_RECORDS {
                add(MLD_CHAIN, &format!("{} -j RETURN", mld2_solicited_node_only(records)));
            }
            add(MLD_CHAIN, "-j DROP");
        }
    }
    add(OUTPUT_CHAIN, OWNER_JUMP);

    let mut rule = |s: &str| add(CHAIN, s);
    rule("-m conntrack --ctstate RELATED,ESTABLISHED --ctdir REPLY -j ACCEPT");
    rule(&format!(
        "-m connmark --mark {CONNMARK:#x}/{CONNMARK:#x} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    ));
    if Family::of(plan.listen.ip()) == family {
        for proto in ["udp", "tcp"] {
            rule(&format!(
                "-d {}/{} -p {proto} -m {proto} --dport {} -j ACCEPT",
                plan.listen.ip(),
                family.prefix(),
                plan.listen.port()
            ));
        }
    }
    for ip in plan.resolvers.iter().filter(|ip| Family::of(**ip) == family) {
        rule(&format!("-d {ip}/{} -j {REFUSE_RESOLVER}", family.prefix()));
    }
    // The original destination port, before any NAT: a resolver DNATed elsewhere (Docker's
    // 127.0.0.11:53 to a random port) would escape a plain --dport 53.
    rule(&format!("-p udp -m conntrack --ctproto 17 --ctorigdstport 53 -j {REFUSE_RESOLVER}"));
    rule(&format!("-p tcp -m conntrack --ctproto 6 --ctorigdstport 53 -j {REFUSE_RESOLVER}"));
    // The proxy's port, but only for what the kernel redirected there (the nat chain): the
    // agent's own connection to the proxy port is not DNAT and meets the loopback reject.
    if let Some(port) = plan.proxy_port {
        rule(&format!(
            "-d {}/{} -p tcp -m tcp --dport {port} -m conntrack --ctstate DNAT -j {ALLOW_CHAIN}",
            family.loopback(),
            family.prefix()
        ));
    }
    // The metrics listener, before any loopback accept: the config keeps its port out of
    // loopback_ports, and this keeps it closed should that ever change. `-o lo` is every
    // local address (a packet to the container's own address leaves through lo too).
    if let Some(port) = plan.metrics_port {
        rule(&format!("-o lo -p tcp -m tcp --dport {port} -j {REFUSE_LOOPBACK}"));
    }
    // Loopback by port: the owner match cannot see who owns the destination socket, so a
    // root-owned service on 127.0.0.1 and the agent's own test server look alike.
    for range in &plan.loopback_ports {
        let ports =
            if range.first == range.last { range.first.to_string() } else { format!("{}:{}", range.first, range.last) };
        for proto in ["tcp", "udp"] {
            rule(&format!("-o lo -p {proto} -m {proto} --dport {ports} -j ACCEPT"));
        }
    }
    rule(&format!("-o lo -j {REFUSE_LOOPBACK}"));
    // With name binding these ports are redirected before they get here (nat OUTPUT comes
    // before filter OUTPUT); one that was not is rejected below, never let through unchecked.
    if plan.proxy_port.is_none() {
        rule(&format!(
            "-p tcp -m multiport --dports {} -m set --match-set {} dst -j {ALLOW_CHAIN}",
            join_ports(&plan.ports),
            set_name(family, None)
        ));
        for &p in &plan.extra_ports {
            rule(&format!(
                "-p tcp -m tcp --dport {p} -m set --match-set {} dst -j {ALLOW_CHAIN}",
                set_name(family, Some(p))
            ));
        }
    }
    for &p in &plan.raw_ports {
        rule(&format!("-p tcp -m tcp --dport {p} -m set --match-set {} dst -j {ALLOW_CHAIN}", raw_set_name(family, p)));
    }
    // TCP to an address of an allow set reaching here came on a port not allowed for it (or,
    // with name binding, on a name-checked port without the redirect); to any other address,
    // it was never admitted. Any protocol but TCP is refused outright.
    for (set_family, set) in plan.sets() {
        if set_family == family {
            rule(&format!("-p tcp -m set --match-set {set} dst -j {REFUSE_PORT}"));
        }
    }
    rule(&format!("-p tcp -j {REFUSE_ADDR}"));
    rule(&format!("-j {REFUSE_PROTO}"));

    add(ALLOW_CHAIN, &format!("-j CONNMARK --set-xmark {CONNMARK:#x}/{CONNMARK:#x}"));
    add(ALLOW_CHAIN, "-j ACCEPT");

    // Log, then reject: TCP with a reset, DNS over UDP as an unreachable port (a stub
    // resolver gives up at once), anything else as administratively prohibited.
    for (chain, reason) in REFUSALS {
        if !plan.log {
            add(chain, "-p tcp -j REJECT --reject-with tcp-reset");
            if chain == REFUSE_RESOLVER {
                add(chain, &format!("-p udp -j REJECT --reject-with {proto_unreach}"));
            }
            add(chain, &format!("-j REJECT --reject-with {reject}"));
            continue;
        }
        add(
            chain,
            &format!(
                "{LOG_LIMIT} -j NFLOG --nflog-prefix {} --nflog-group {} --nflog-size {}",
                reason.as_str(),
                crate::egress::nflog::GROUP,
                crate::egress::nflog::COPY_RANGE
            ),
        );
        add(chain, "-p tcp -j REJECT --reject-with tcp-reset");
        if chain == REFUSE_RESOLVER {
            add(chain, &format!("-p udp -j REJECT --reject-with {proto_unreach}"));
        }
        add(chain, &format!("-j REJECT --reject-with {reject}"));
    }
    r
}

fn join_ports(ports: &[u16]) -> String {
    ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}

/// The nat chain for one family, without the `*nat` and `COMMIT` lines: the agent's new TCP to
/// an admitted address on a name-checked port goes to the proxy. nat `OUTPUT` sees only a
/// connection's first packet; the rest follow its conntrack entry. REDIRECT from `OUTPUT` maps
/// to 127.0.0.1 or ::1 and reroutes through `lo`, so `route_localnet` is not involved (it is
/// for packets arriving from outside).
pub fn render_nat_chain(plan: &Plan, family: Family) -> String {
    let mut r = format!(":{NAT_CHAIN} - [0:0]\n");
    let Some(proxy) = plan.proxy_port else { return r };
    let mut redirect = |ports: &str, set: String| {
        let _ = writeln!(
            r,
            "-A {NAT_CHAIN} -p tcp {OWNER_MATCH} {ports} -m set --match-set {set} dst -j REDIRECT --to-ports {proxy}"
        );
    };
    redirect(&format!("-m multiport --dports {}", join_ports(&plan.ports)), set_name(family, None));
    for &p in &plan.extra_ports {
        redirect(&format!("-m tcp --dport {p}"), set_name(family, Some(p)));
    }
    r
}

/// The lines that leave exactly one jump to `chain` at the top of `OUTPUT`, given `iptables -S
/// OUTPUT` of its table: every existing jump to one of cordon's chains is deleted (the old
/// single owner jump of earlier versions, duplicates), then the one jump is inserted.
fn render_jump(output_listing: &str, chain: &str) -> String {
    let mut r = String::new();
    for line in output_listing.lines() {
        let Some(spec) = line.strip_prefix("-A OUTPUT ") else { continue };
        if CHAINS.iter().chain(&[NAT_CHAIN]).any(|c| spec.ends_with(&format!("-j {c}"))) {
            let _ = writeln!(r, "-D OUTPUT {spec}");
        }
    }
    let _ = writeln!(r, "-I OUTPUT 1 -j {chain}");
    r
}

/// The filter table's jump to `CORDON_OUTPUT` (see [`render_jump`]).
pub fn render_output_jump(output_listing: &str) -> String {
    render_jump(output_listing, OUTPUT_CHAIN)
}

/// The whole `iptables-restore --noflush` input for one family, in one transaction: the nat
/// chain and its jump, then the filter chains and theirs. `nat_listing` and `output_listing`
/// are `iptables -t nat -S OUTPUT` and `iptables -S OUTPUT`.
pub fn render_rules(plan: &Plan, family: Family, nat_listing: &str, output_listing: &str) -> String {
    format!(
        "*nat\n{}{}COMMIT\n{}",
        render_nat_chain(plan, family),
        render_jump(nat_listing, NAT_CHAIN),
        render_filter(plan, family, output_listing)
    )
}

/// The filter half of [`render_rules`] alone, for a family whose kernel has no nat table.
pub fn render_filter(plan: &Plan, family: Family, output_listing: &str) -> String {
    format!("*filter\n{}{}COMMIT\n", render_chains(plan, family), render_output_jump(output_listing))
}

/// The `ipset restore` input that gives every set of the plan fresh, with the plan's timeout,
/// whatever sets of the same names a previous run in this network namespace left (other
/// timeouts, old entries): each is created under a temporary name, then swapped with the
/// existing set (atomic for the rules that reference it) or renamed into place, and the old
/// content, now under the temporary name, destroyed. `existing` is `ipset list -n`.
pub fn render_sets(plan: &Plan, default_timeout: u32, existing: &[String]) -> String {
    let mut s = String::new();
    // Temporaries a crashed boot left behind.
    for name in existing.iter().filter(|n| n.ends_with(NEW_SUFFIX) && is_cordon_set(n)) {
        let _ = writeln!(s, "destroy {name}");
    }
    for (family, name) in plan.sets() {
        let tmp = format!("{name}{NEW_SUFFIX}");
        let _ = writeln!(
            s,
            "create {tmp} hash:ip family {} timeout {default_timeout} maxelem 1048576",
            family.ipset_family()
        );
        if existing.contains(&name) {
            let _ = writeln!(s, "swap {tmp} {name}");
            let _ = writeln!(s, "destroy {tmp}");
        } else {
            let _ = writeln!(s, "rename {tmp} {name}");
        }
    }
    s
}

/// cordon's sets that the plan no longer references (a `name:port` entry removed since the
/// last run in this namespace): destroyed once the new rules are in.
pub fn stale_sets(plan: &Plan, existing: &[String]) -> Vec<String> {
    let wanted: Vec<String> = plan.sets().into_iter().map(|(_, n)| n).collect();
    existing.iter().filter(|n| is_cordon_set(n) && !wanted.contains(n)).cloned().collect()
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("cannot run {program}")]
    Spawn {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed: {stderr}")]
    Failed { program: &'static str, stderr: String },
    #[error("{program} failed: this runtime or kernel does not provide the netfilter support cordon needs: {stderr}")]
    NoNetfilter { program: &'static str, stderr: String },
    #[error("the {family:?} chain {chain} has {found} rules after applying, expected {expected}")]
    Verify { family: Family, chain: &'static str, found: usize, expected: usize },
    #[error("the {family:?} OUTPUT chain has {found} jumps to {chain} after applying, expected 1")]
    VerifyJump { family: Family, chain: &'static str, found: usize },
    /// Timed out, or stopped because cordon is stopping.
    #[error(transparent)]
    Command(crate::sys::command::CommandError),
}

/// What a failed command's stderr says about the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// No CAP_NET_ADMIN.
    Capability,
    /// The runtime or kernel has no netfilter, or lacks a table, target, match or set type
    /// (gVisor, some rootless runtimes, a kernel without the modules).
    NoNetfilter,
    Other,
}

/// Classifies the stderr of iptables, ip6tables, their restore forms and ipset.
pub fn classify(stderr: &str) -> Cause {
    const CAPABILITY: [&str; 3] = ["ermission denied", "Operation not permitted", "you must be root"];
    const NO_NETFILTER: [&str; 12] = [
        "Protocol not supported",
        "Address family not supported",
        "Table does not exist",
        "does not exist (do you need to insmod",
        "Couldn't load target",
        "Couldn't load match",
        "Couldn't find target",
        "Couldn't find match",
        "unable to initialize table",
        "Failed to initialize nft",
        "missing kernel module",
        "Cannot open session to kernel",
    ];
    if CAPABILITY.iter().any(|p| stderr.contains(p)) {
        Cause::Capability
    } else if NO_NETFILTER.iter().any(|p| stderr.contains(p))
        || stderr.contains("Kernel error received: set type not supported")
    {
        Cause::NoNetfilter
    } else {
        Cause::Other
    }
}

impl crate::fix::Fix for FirewallError {
    fn fix(&self) -> Option<String> {
        Some(self.hint())
    }
}

impl FirewallError {
    pub fn hint(&self) -> String {
        match self {
            FirewallError::Spawn { program, source } if source.kind() == std::io::ErrorKind::NotFound => format!(
                "{program} is not installed: add iptables and ipset to the image (apt-get install iptables ipset)"
            ),
            FirewallError::Spawn { program, .. } => format!("{program} could not be started: see the error above"),
            FirewallError::Failed { stderr, .. } if classify(stderr) == Cause::Capability => {
                "cordon needs CAP_NET_ADMIN to set up the firewall: docker run --cap-add NET_ADMIN, or in Kubernetes \
                 securityContext.capabilities.add: [\"NET_ADMIN\"]; Fly machines have it"
                    .into()
            }
            FirewallError::NoNetfilter { .. } => {
                "the container runtime lacks netfilter (iptables tables, targets and matches, ipset): gVisor (runsc) and \
                 some rootless runtimes do not provide it. Run the container under runc or crun on a kernel with \
                 netfilter; cordon cannot enforce egress without it"
                    .into()
            }
            FirewallError::Failed { .. } => {
                "the kernel may lack a netfilter module (xt_owner, xt_conntrack, xt_connmark, xt_u32, xt_set, \
                 ip_set_hash_ip, xt_REJECT, xt_multiport, xt_limit, xt_NFLOG, nfnetlink_log): check the host \
                 kernel"
                    .into()
            }
            FirewallError::Verify { .. } | FirewallError::VerifyJump { .. } => {
                "another process changed the firewall during boot".into()
            }
            FirewallError::Command(_) => {
                "another process holds the xtables lock, or the kernel is not answering: see the boot log".into()
            }
        }
    }
}

/// How long one iptables, ip6tables or ipset command may take (they wait up to 10 s for the
/// xtables lock themselves).
const COMMAND_DEADLINE: Duration = Duration::from_secs(30);

fn run(sys: &dyn Effects, program: &'static str, args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
    use crate::sys::command::CommandError;
    let out = sys.run(program, args, stdin.map(str::as_bytes), COMMAND_DEADLINE).map_err(|e| match e {
        CommandError::Spawn { source, .. } => FirewallError::Spawn { program, source },
        other => FirewallError::Command(other),
    })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    // One line: the stage error is shown as one.
    let stderr: Vec<&str> = std::str::from_utf8(&out.stderr)
        .unwrap_or("(not UTF-8)")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let stderr = stderr.join("; ");
    Err(match classify(&stderr) {
        Cause::NoNetfilter => FirewallError::NoNetfilter { program, stderr },
        _ => FirewallError::Failed { program, stderr },
    })
}

fn list_sets(sys: &dyn Effects) -> Result<Vec<String>, FirewallError> {
    Ok(run(sys, "ipset", &["list", "-n"], None)?.lines().map(str::to_string).collect())
}

/// The boot's `firewall` stage: default-deny for every uid but root, IPv4 and IPv6, before the
/// agent or anything it influences can open a socket. `resolv_conf` is the file as found at
/// boot: its nameservers are refused to the agent, with the upstreams and 127.0.0.11.
pub fn stage(
    network: &crate::config::Network,
    egress: &crate::egress::Egress,
    resolv_conf: &str,
    metrics_port: Option<u16>,
    sys: &dyn Effects,
) -> crate::fix::StageResult<(), FirewallError> {
    let plan = Plan {
        listen: network.listen,
        resolvers: crate::egress::resolver_addresses(resolv_conf, &egress.upstreams, network.listen),
        ports: network.ports.clone(),
        extra_ports: egress.policy.allowlist().extra_ports().into_iter().collect(),
        raw_ports: egress.policy.allowlist().raw_ports().into_iter().collect(),
        loopback_ports: network.loopback_ports.clone(),
        proxy_port: network.name_binding.then_some(network.proxy_port),
        log: egress.journal_reading.load(std::sync::atomic::Ordering::Relaxed),
        metrics_port,
    };
    let default_timeout = u32::try_from((network.min_ttl.0 + network.grace.0).as_secs()).unwrap_or(u32::MAX);
    let applied = apply(&plan, default_timeout, sys)?;
    *egress.firewall.lock().unwrap_or_else(|e| e.into_inner()) = Some((plan.clone(), default_timeout));
    let join = |items: Vec<String>| if items.is_empty() { "none".to_string() } else { items.join(",") };
    let ports = plan.ports.iter().chain(&plan.extra_ports).map(u16::to_string).collect();
    let checked = match plan.proxy_port {
        Some(p) if applied.without_nat.contains(&Family::V6) => format!(
            " name-checked by the proxy on port {p} (IPv4 only: the kernel has no IPv6 nat table, so the agent's \
             IPv6 connections on them are refused)"
        ),
        Some(p) => format!(" name-checked by the proxy on port {p}"),
        None => String::new(),
    };
    let raw: Vec<String> = plan.raw_ports.iter().map(u16::to_string).collect();
    let raw = if raw.is_empty() { String::new() } else { format!(", {} address-based", raw.join(",")) };
    let loopback = plan.loopback_ports.iter().map(ToString::to_string).collect();
    let metrics = plan.metrics_port.map(|p| format!("; metrics port {p} refused")).unwrap_or_default();
    Ok((
        (),
        format!(
            "IPv4 and IPv6 default-deny for uids 1-4294967294; TCP {}{checked}{raw} to admitted addresses; \
             {} resolver addresses refused; loopback ports: {}{metrics}",
            join(ports),
            plan.resolvers.len(),
            join(loopback)
        ),
    ))
}

/// Installs the firewall, replacing whatever a previous run in this network namespace left
/// (its sets, chains and jumps, whatever their parameters), or, if any step fails, removes
/// every cordon set, chain and jump so that no partial policy is left, and returns the error.
pub fn apply(plan: &Plan, default_timeout: u32, sys: &dyn Effects) -> Result<Applied, FirewallError> {
    let result = apply_steps(plan, default_timeout, sys);
    if result.is_err() {
        for problem in remove(sys) {
            tracing::error!("rolling back the firewall: {problem}");
        }
    }
    result
}

/// The sets first, because the rules reference them; then per family the chains and the jump
/// in one transaction, read back; then the sets the new rules no longer reference go.
fn apply_steps(plan: &Plan, default_timeout: u32, sys: &dyn Effects) -> Result<Applied, FirewallError> {
    let existing = list_sets(sys)?;
    run(sys, "ipset", &["restore"], Some(&render_sets(plan, default_timeout, &existing)))?;
    apply_rules(plan, sys)
}

/// A live policy change that needs per-entry ports the rules lack (`egress::change`): the sets
/// missing are created, the existing ones and the addresses in them kept; then the rules of
/// each family are replaced in one transaction and read back, as at boot. No rollback: a family
/// whose transaction failed keeps its previous rules, which are narrower, never wider.
pub fn widen(plan: &Plan, default_timeout: u32, sys: &dyn Effects) -> Result<Applied, FirewallError> {
    let missing = render_missing_sets(plan, default_timeout, &list_sets(sys)?);
    if !missing.is_empty() {
        run(sys, "ipset", &["restore"], Some(&missing))?;
    }
    apply_rules(plan, sys)
}

/// The `ipset restore` input that creates the sets of the plan not in `existing` (`ipset list
/// -n`), leaving every existing set and its content alone.
pub fn render_missing_sets(plan: &Plan, default_timeout: u32, existing: &[String]) -> String {
    let mut s = String::new();
    for (family, name) in plan.sets().into_iter().filter(|(_, n)| !existing.contains(n)) {
        let _ = writeln!(
            s,
            "create {name} hash:ip family {} timeout {default_timeout} maxelem 1048576",
            family.ipset_family()
        );
    }
    s
}

/// Per family the chains and the jump in one transaction, read back; then the sets the new
/// rules no longer reference go.
fn apply_rules(plan: &Plan, sys: &dyn Effects) -> Result<Applied, FirewallError> {
    let mut applied = Applied::default();
    for family in [Family::V4, Family::V6] {
        let nat = match run(sys, family.iptables(), &["-w", "10", "-t", "nat", "-S", "OUTPUT"], None) {
            Ok(listing) => Some(listing),
            // A host that never loaded ip6table_nat (an IPv4-only node), which a container
            // cannot load itself: without the table nothing of the agent's IPv6 is redirected
            // to the proxy, and the filter chain, which accepts the name-checked ports only as
            // redirected connections, refuses them. Fail closed for that family only.
            Err(FirewallError::NoNetfilter { .. }) if family == Family::V6 => None,
            Err(e) => return Err(e),
        };
        let output = run(sys, family.iptables(), &["-w", "10", "-S", "OUTPUT"], None)?;
        let rules = match &nat {
            Some(nat) => render_rules(plan, family, nat, &output),
            None => render_filter(plan, family, &output),
        };
        run(sys, family.restore(), &["--noflush", "--wait", "10"], Some(&rules))?;
        verify(&rules, family, nat.is_some(), sys)?;
        if nat.is_none() {
            applied.without_nat.push(family);
        }
    }
    for name in stale_sets(plan, &list_sets(sys)?) {
        run(sys, "ipset", &["destroy", &name], None)?;
    }
    Ok(applied)
}

/// What [`apply`] could not do and worked around, failing closed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Families whose kernel has no nat table: none of their connections is redirected to the
    /// name-checking proxy, so the agent's connections on the name-checked ports are refused.
    pub without_nat: Vec<Family>,
}

/// Reads the chains and both `OUTPUT`s back: every chain has as many rules as written, and
/// each jump is there once.
fn verify(rules: &str, family: Family, with_nat: bool, sys: &dyn Effects) -> Result<(), FirewallError> {
    if with_nat {
        verify_nat(rules, family, sys)?;
    }
    for chain in CHAINS {
        let listed = run(sys, family.iptables(), &["-w", "10", "-S", chain], None)?;
        let prefix = format!("-A {chain} ");
        let found = listed.lines().filter(|l| l.starts_with(&prefix)).count();
        let expected = rules.lines().filter(|l| l.starts_with(&prefix)).count();
        if found != expected {
            return Err(FirewallError::Verify { family, chain, found, expected });
        }
    }
    let output = run(sys, family.iptables(), &["-w", "10", "-S", "OUTPUT"], None)?;
    let found = output.lines().filter(|l| *l == format!("-A OUTPUT -j {OUTPUT_CHAIN}")).count();
    if found != 1 {
        return Err(FirewallError::VerifyJump { family, chain: OUTPUT_CHAIN, found });
    }
    Ok(())
}

/// The nat half of [`verify`]: `CORDON_NAT` as written, and its jump there once.
fn verify_nat(rules: &str, family: Family, sys: &dyn Effects) -> Result<(), FirewallError> {
    let nat = run(sys, family.iptables(), &["-w", "10", "-t", "nat", "-S", NAT_CHAIN], None)?;
    let prefix = format!("-A {NAT_CHAIN} ");
    let found = nat.lines().filter(|l| l.starts_with(&prefix)).count();
    let expected = rules.lines().filter(|l| l.starts_with(&prefix)).count();
    if found != expected {
        return Err(FirewallError::Verify { family, chain: NAT_CHAIN, found, expected });
    }
    let nat_output = run(sys, family.iptables(), &["-w", "10", "-t", "nat", "-S", "OUTPUT"], None)?;
    let found = nat_output.lines().filter(|l| *l == format!("-A OUTPUT -j {NAT_CHAIN}")).count();
    if found != 1 {
        return Err(FirewallError::VerifyJump { family, chain: NAT_CHAIN, found });
    }
    Ok(())
}

/// Removes every jump to cordon's chains, the chains and cordon's sets, both families, each
/// step on its own so one failure does not stop the rest. Returns what could not be removed
/// (nothing of a kind that does not exist counts).
pub fn remove(sys: &dyn Effects) -> Vec<String> {
    let mut problems = Vec::new();
    for family in [Family::V4, Family::V6] {
        remove_nat(family, &mut problems, sys);
        let Ok(output) = run(sys, family.iptables(), &["-w", "10", "-S", "OUTPUT"], None) else { continue };
        let tool = family.iptables();
        for line in render_output_jump(&output).lines().filter(|l| l.starts_with("-D ")) {
            let args: Vec<&str> = ["-w", "10"].into_iter().chain(split_spec(line)).collect();
            if let Err(e) = run(sys, tool, &args, None) {
                problems.push(format!("{tool} {line}: {e}"));
            }
        }
        let chains = run(sys, tool, &["-w", "10", "-S"], None).unwrap_or_default();
        let present: Vec<&str> =
            CHAINS.into_iter().filter(|c| chains.lines().any(|l| l == format!("-N {c}"))).collect();
        for flag in ["-F", "-X"] {
            for chain in &present {
                if let Err(e) = run(sys, tool, &["-w", "10", flag, chain], None) {
                    problems.push(format!("{tool} {flag} {chain}: {e}"));
                }
            }
        }
    }
    if let Ok(sets) = list_sets(sys) {
        for name in sets.iter().filter(|n| is_cordon_set(n)) {
            if let Err(e) = run(sys, "ipset", &["destroy", name], None) {
                problems.push(format!("ipset destroy {name}: {e}"));
            }
        }
    }
    problems
}

/// The nat half of [`remove`]: the jumps to `CORDON_NAT`, then the chain. A kernel without the
/// nat table has nothing to remove.
fn remove_nat(family: Family, problems: &mut Vec<String>, sys: &dyn Effects) {
    let tool = family.iptables();
    let Ok(output) = run(sys, tool, &["-w", "10", "-t", "nat", "-S", "OUTPUT"], None) else { return };
    for line in render_jump(&output, NAT_CHAIN).lines().filter(|l| l.starts_with("-D ")) {
        let args: Vec<&str> = ["-w", "10", "-t", "nat"].into_iter().chain(split_spec(line)).collect();
        if let Err(e) = run(sys, tool, &args, None) {
            problems.push(format!("{tool} -t nat {line}: {e}"));
        }
    }
    let chains = run(sys, tool, &["-w", "10", "-t", "nat", "-S"], None).unwrap_or_default();
    if chains.lines().any(|l| l == format!("-N {NAT_CHAIN}")) {
        for flag in ["-F", "-X"] {
            if let Err(e) = run(sys, tool, &["-w", "10", "-t", "nat", flag, NAT_CHAIN], None) {
                problems.push(format!("{tool} -t nat {flag} {NAT_CHAIN}: {e}"));
            }
        }
    }
}

/// Splits an `iptables -S` rule into arguments: words, with a double-quoted word (a u32
/// expression, a comment) kept whole and unquoted.
fn split_spec(line: &str) -> Vec<&str> {
    let mut args = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        if let Some(quoted) = rest.strip_prefix('"') {
            let end = quoted.find('"').unwrap_or(quoted.len());
            args.push(&quoted[..end]);
            rest = quoted.get(end + 1..).unwrap_or("").trim_start();
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            args.push(&rest[..end]);
            rest = rest[end..].trim_start();
        }
    }
    args
}

/// Per-rule packet counters of the chain, in rule order (for `status`).
pub fn counters(family: Family, sys: &dyn Effects) -> Result<Vec<(u64, String)>, FirewallError> {
    let out = run(sys, family.iptables(), &["-w", "10", "-L", CHAIN, "-n", "-v", "-x"], None)?;
    Ok(out
        .lines()
        .skip(2)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let packets = f.next()?.parse().ok()?;
            let _bytes = f.next()?;
            Some((packets, f.collect::<Vec<_>>().join(" ")))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            listen: "127.0.0.53:53".parse().unwrap(),
            resolvers: vec!["127.0.0.11".parse().unwrap(), "2001:db8::53".parse().unwrap()],
            ports: vec![80, 443],
            extra_ports: vec![8443],
            raw_ports: vec![22],
            loopback_ports: vec![PortRange { first: 3000, last: 3000 }, PortRange { first: 8000, last: 8099 }],
            proxy_port: Some(15443),
            log: true,
            metrics_port: Some(9464),
        }
    }

    #[test]
    fn ipv4_rules_snapshot() {
        let expected = "\
*nat
:CORDON_NAT - [0:0]
-A CORDON_NAT -p tcp -m owner --uid-owner 1-4294967294 -m multiport --dports 80,443 -m set --match-set cordon4 dst -j REDIRECT --to-ports 15443
-A CORDON_NAT -p tcp -m owner --uid-owner 1-4294967294 -m tcp --dport 8443 -m set --match-set cordon4-p8443 dst -j REDIRECT --to-ports 15443
-I OUTPUT 1 -j CORDON_NAT
COMMIT
*filter
:CORDON_OUTPUT - [0:0]
:CORDON_MLD - [0:0]
:CORDON_AGENT - [0:0]
:CORDON_ALLOW - [0:0]
:CORDON_REFUSE_RESOLVER - [0:0]
:CORDON_REFUSE_LOOPBACK - [0:0]
:CORDON_REFUSE_PORT - [0:0]
:CORDON_REFUSE_ADDR - [0:0]
:CORDON_REFUSE_PROTO - [0:0]
-A CORDON_OUTPUT -p igmp -j DROP
-A CORDON_OUTPUT -m owner --uid-owner 1-4294967294 -j CORDON_AGENT
-A CORDON_AGENT -m conntrack --ctstate RELATED,ESTABLISHED --ctdir REPLY -j ACCEPT
-A CORDON_AGENT -m connmark --mark 0x100000/0x100000 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A CORDON_AGENT -d 127.0.0.53/32 -p udp -m udp --dport 53 -j ACCEPT
-A CORDON_AGENT -d 127.0.0.53/32 -p tcp -m tcp --dport 53 -j ACCEPT
-A CORDON_AGENT -d 127.0.0.11/32 -j CORDON_REFUSE_RESOLVER
-A CORDON_AGENT -p udp -m conntrack --ctproto 17 --ctorigdstport 53 -j CORDON_REFUSE_RESOLVER
-A CORDON_AGENT -p tcp -m conntrack --ctproto 6 --ctorigdstport 53 -j CORDON_REFUSE_RESOLVER
-A CORDON_AGENT -d 127.0.0.1/32 -p tcp -m tcp --dport 15443 -m conntrack --ctstate DNAT -j CORDON_ALLOW
-A CORDON_AGENT -o lo -p tcp -m tcp --dport 9464 -j CORDON_REFUSE_LOOPBACK
-A CORDON_AGENT -o lo -p tcp -m tcp --dport 3000 -j ACCEPT
-A CORDON_AGENT -o lo -p udp -m udp --dport 3000 -j ACCEPT
-A CORDON_AGENT -o lo -p tcp -m tcp --dport 8000:8099 -j ACCEPT
-A CORDON_AGENT -o lo -p udp -m udp --dport 8000:8099 -j ACCEPT
-A CORDON_AGENT -o lo -j CORDON_REFUSE_LOOPBACK
-A CORDON_AGENT -p tcp -m tcp --dport 22 -m set --match-set cordon4-r22 dst -j CORDON_ALLOW
-A CORDON_AGENT -p tcp -m set --match-set cordon4 dst -j CORDON_REFUSE_PORT
-A CORDON_AGENT -p tcp -m set --match-set cordon4-p8443 dst -j CORDON_REFUSE_PORT
-A CORDON_AGENT -p tcp -m set --match-set cordon4-r22 dst -j CORDON_REFUSE_PORT
-A CORDON_AGENT -p tcp -j CORDON_REFUSE_ADDR
-A CORDON_AGENT -j CORDON_REFUSE_PROTO
-A CORDON_ALLOW -j CONNMARK --set-xmark 0x100000/0x100000
-A CORDON_ALLOW -j ACCEPT
-A CORDON_REFUSE_RESOLVER -m limit --limit 50/sec --limit-burst 100 -j NFLOG --nflog-prefix resolver --nflog-group 7710 --nflog-size 128
-A CORDON_REFUSE_RESOLVER -p tcp -j REJECT --reject-with tcp-reset
-A CORDON_REFUSE_RESOLVER -p udp -j REJECT --reject-with icmp-port-unreachable
-A CORDON_REFUSE_RESOLVER -j REJECT --reject-with icmp-admin-prohibited
-A CORDON_REFUSE_LOOPBACK -m limit --limit 50/sec --limit-burst 100 -j NFLOG --nflog-prefix loopback --nflog-group 7710 --nflog-size 128
-A CORDON_REFUSE_LOOPBACK -p tcp -j REJECT --reject-with tcp-reset
-A CORDON_REFUSE_LOOPBACK -j REJECT --reject-with icmp-admin-prohibited
-A CORDON_REFUSE_PORT -m limit --limit 50/sec --limit-burst 100 -j NFLOG --nflog-prefix port --nflog-group 7710 --nflog-size 128
-A CORDON_REFUSE_PORT -p tcp -j REJECT --reject-with tcp-reset
-A CORDON_REFUSE_PORT -j REJECT --reject-with icmp-admin-prohibited
-A CORDON_REFUSE_ADDR -m limit --limit 50/sec --limit-burst 100 -j NFLOG --nflog-prefix not-admitted --nflog-group 7710 --nflog-size 128
-A CORDON_REFUSE_ADDR -p tcp -j REJECT --reject-with tcp-reset
-A CORDON_REFUSE_ADDR -j REJECT --reject-with icmp-admin-prohibited
-A CORDON_REFUSE_PROTO -m limit --limit 50/sec --limit-burst 100 -j NFLOG --nflog-prefix udp-icmp --nflog-group 7710 --nflog-size 128
-A CORDON_REFUSE_PROTO -p tcp -j REJECT --reject-with tcp-reset
-A CORDON_REFUSE_PROTO -j REJECT --reject-with icmp-admin-prohibited
-I OUTPUT 1 -j CORDON_OUTPUT
COMMIT
";
        assert_eq!(render_rules(&plan(), Family::V4, "-P OUTPUT ACCEPT\n", "-P OUTPUT ACCEPT\n"), expected);
    }

    #[test]
    fn ipv6_gets_the_same_policy_without_the_ipv4_listener() {
        let expected = "\
*nat
:CORDON_NAT - [0:0]
-A CORDON_NAT -p tcp -m owner --uid-owner 1-4294967294 -m multiport --dports 80,443 -m set --match-set cordon6 dst -j REDIRECT --to-ports 15443
-A CORDON_NAT -p tcp -m owner --uid-owner 1-4294967294 -m tcp --dport 8443 -m set --match-set cordon6-p8443 dst -j REDIRECT --to-ports 15443
-I OUTPUT 1 -j CORDON_NAT
COMMIT
*filter
:CORDON_OUTPUT - [0:0]
:CORDON_MLD - [0:0]
:CORDON_AGENT - [0:0]
:CORDON_ALLOW - [0:0]
:CORDON_REFUSE_RESOLVER - [0:0]
:CORDON_REFUSE_LOOPBACK - [0:0]
:CORDON_REFUSE_PORT - [0:0]
:CORDON_REFUSE_ADDR - [0:0]
:CORDON_REFUSE_PROTO - [0:0]
-A CORDON_OUTPUT ! -d ff02::1:ff00:0/104 -p ipv6-icmp -m icmp6 --icmpv6-type 131 -j DROP
-A CORDON_OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type 132 -j DROP
-A CORDON_OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type 143 -j CORDON_MLD
-A CORDON_MLD -m u32 --u32 \"0x4&0xff00=0x0&&0x28&0xffff0000=0x3a000000&&0x30&0xff000000=0x8f000000&&0x34&0xffff=0x1&&0x38&0xffffff=0x0&&0x3c=0xff020000&&0x40=0x0&&0x44=0x1&&0x48&0xff000000=0xff000000\" -j RETURN
-A CORDON_MLD -m u32 --u32 \"0x4&0xff00=0x0&&0x28&0xffff0000=0x3a000000&&0x30&0xff000000=0x8f000000&&0x34&0xffff=0x2&&0x38&0xffffff=0x0&&0x3c=0xff020000&&0x40=0x0&&0x44=0x1&&0x48&0xff000000=0xff000000&&0x4c&0xffffff=0x0\" -m u32 --u32 \"0x50=0xff020000&&0x54=0x0&&0x58=0x1&&0x5c&0xff000000=0xff000000\" -j RETURN
-A CORDON_MLD -m u32 --u32 \"0x4&0xff00=0x0&&0x28&0xffff0000=0x3a000000&&0x30&0xff000000=0x8f000000&&0x34&0xffff=0x3&&0x38&0xffffff=0x0&&0x3c=0xff020000&&0x40=0x0&&0x44=0x1&&0x48&0xff000000=0xff000000&&0x4c&0xffffff=0x0\" -m u32 --u32 \"0x50=0xff020000&&0x54=0x0&&0x58=0x1&&0x5c&0xff000000=0xff000000&&0x60&0xffffff=0x0&&0x64=0xff020000&&0x68=0x0&&0x6c=0x1&&0x70&0xff000000=0xff000000\" -j RETURN
-A CORDON_MLD -m u32 --u32 \"0x4&0xff00=0x0&&0x28&0xffff0000=0x3a000000&&0x30&0xff000000=0x8f000000&&0x34&0xffff=0x4&&0x38&0xffffff=0x0&&0x3c=0xff020000&&0x40=0x0&&0x44=0x1&&0x48&0xff000000=0xff000000&&0x4c&0xffffff=0x0\" -m u32 --u32 \"0x50=0xff020000&&0x54=0x0&&0x58=0x1&&0x5c&0xff000000=0xff000000&&0x60&0xffffff=0x0&&0x64=0xff020000&&0x68=0x0&&0x6c=0x1&&0x70&0xff000000=0xff000000&&0x74&0xffffff=0x0\" -m u32 --u32 \"0x78=0xff020000&&0x7c=0x0&&0x80=0x1&&0x84&0xff000000=0xff000000\" -j RETURN
-A CORDON_MLD -j DROP
-A CORDON_OUTPUT -m owner --uid-owner 1-4294967294 -j CORDON_AGENT
-A CORDON_AGENT -m conntrack --ctstate RELATED,ESTABLISHED --ctdir REPLY -j ACCEPT
-A CORDON_AGENT -m connmark --mark 0x100000/0x100000 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A CORDON_AGENT -d 2001:db8::53/128 -j CORDON_REFUSE_RESOLVER
-A CORDON_AGENT -p udp -m conntrack --ctproto 17 --ctorigdstport 53 -j CORDON_REFUSE_RESOLVER
-A CORDON_AGENT -p tcp -m conntrack --ctproto 6 --ctorigdstport 53 -j CORDON_REFUSE_RESOLVER
-A CORDON_AGENT -d ::1/128 -p tcp -m tcp --dport 15443 -m conntrack --ctstate DNAT -j CORDON_ALLOW
-A CORDON_AGENT -o lo -p tcp -m tcp --dport 9464 -j CORDON_REFUSE_LOOPBACK
-A CORDON_AGENT -o lo -p tcp -m tcp --dport 3000 -j ACCEPT
-A CORDON_AGENT -o lo -p udp -m udp --dport 3000 -j ACCEPT
-A CORDON_AGENT -o lo -p tcp -m tcp --dport 8000:8099 -j ACCEPT
-A CORDON_AGENT -o lo -p udp -m udp --dport 8000:8099 -j ACCEPT
-A CORDON_AGENT -o lo -j CORDON_REFUSE_LOOPBACK
-A CORDON_AGENT -p tcp -m tcp --dport 22 -m set --match-set cordon6-r22 dst -j CORDON_ALLOW
-A CORDON_AGENT -p tcp -m set --match-set cordon6 dst -j CORDON_REFUSE_PORT
-A CORDON_AGENT -p tcp -m set --match-set cordon6-p8443 dst -j CORDON_REFUSE_PORT
-A CORDON_AGENT -p tcp -m set --match-set cordon6-r22 dst -j CORDON_REFUSE_PORT
-A CORDON_AGENT -p tcp -j CORDON_REFUSE_ADDR
-A CORDON_AGENT -j CORDON_REFUSE_PROTO
-A CORDON_ALLOW -j CONNMARK --set-xmark 0x100000/0x100000
-A CORDON_ALLOW -j ACCEPT
-A CORDON_REFUSE_RESOLVER -m limit --limit 50/sec --limit-burst 100 -j NFLOG --nflog-prefix resolver --nflog-group 7710 --nflog-size 128
-A CORDON_REFUSE_RESOLVER -p tcp -j REJECT --reject-with tcp-reset
-A CORDON_REFUSE_RESOLVER -p udp -j REJECT --reject-with icmp6-port-unreachable
-A CORDON_REFUSE_RESOLVER -j REJECT --reject-with icmp6-adm-prohibited
-A CORDON_REFUSE_LOOPBACK -m limit --limit 50/sec --limit-burst 100 -j NFLOG --nflog-prefix loopback --nflog-group 7710 --nflog-size 128
-A CORDON_REFUSE_LOOPBACK -p tcp -j REJECT --reject-with tcp-reset
-A CORDON_REFUSE_LOOPBACK -j REJECT --reject-with icmp6-adm-prohibited
-A CORDON_REFUSE_PORT -m limit --limit 50/sec --limit-burst 100 -j NFLOG --nflog-prefix port --nflog-group 7710 --nflog-size 128
-A CORDON_REFUSE_PORT -p tcp -j REJECT --reject-with tcp-reset
-A CORDON_REFUSE_PORT -j REJECT --reject-with icmp6-adm-prohibited
-A CORDON_REFUSE_ADDR -m limit --limit 50/sec --limit-burst 100 -j NFLOG --nflog-prefix not-admitted --nflog-group 7710 --nflog-size 128
-A CORDON_REFUSE_ADDR -p tcp -j REJECT --reject-with tcp-reset
-A CORDON_REFUSE_ADDR -j REJECT --reject-with icmp6-adm-prohibited
-A CORDON_REFUSE_PROTO -m limit --limit 50/sec --limit-burst 100 -j NFLOG --nflog-prefix udp-icmp --nflog-group 7710 --nflog-size 128
-A CORDON_REFUSE_PROTO -p tcp -j REJECT --reject-with tcp-reset
-A CORDON_REFUSE_PROTO -j REJECT --reject-with icmp6-adm-prohibited
-I OUTPUT 1 -j CORDON_OUTPUT
COMMIT
";
        assert_eq!(render_rules(&plan(), Family::V6, "-P OUTPUT ACCEPT\n", "-P OUTPUT ACCEPT\n"), expected);
    }

    #[test]
    fn without_name_binding_the_nat_chain_is_empty_and_the_checked_ports_are_address_based_again() {
        let plan = Plan { proxy_port: None, ..plan() };
        let rules = render_rules(&plan, Family::V4, "-P OUTPUT ACCEPT\n", "-P OUTPUT ACCEPT\n");
        let nat: Vec<&str> = rules.lines().take_while(|l| *l != "*filter").collect();
        assert_eq!(
            nat,
            ["*nat", ":CORDON_NAT - [0:0]", "-I OUTPUT 1 -j CORDON_NAT", "COMMIT"],
            "declared, so a restart flushes it"
        );
        assert!(!rules.contains("REDIRECT") && !rules.contains("DNAT") && !rules.contains("15443"), "{rules}");
        for accept in [
            "-A CORDON_AGENT -p tcp -m multiport --dports 80,443 -m set --match-set cordon4 dst -j CORDON_ALLOW",
            "-A CORDON_AGENT -p tcp -m tcp --dport 8443 -m set --match-set cordon4-p8443 dst -j CORDON_ALLOW",
            "-A CORDON_AGENT -p tcp -m tcp --dport 22 -m set --match-set cordon4-r22 dst -j CORDON_ALLOW",
        ] {
            assert!(rules.lines().any(|l| l == accept), "{accept}\n{rules}");
        }
    }

    #[test]
    fn every_refusal_of_the_agents_chain_is_logged_with_its_reason_before_it_is_rejected() {
        for family in [Family::V4, Family::V6] {
            let chain = render_chains(&plan(), family);
            let agent: Vec<&str> = chain.lines().filter(|l| l.starts_with("-A CORDON_AGENT ")).collect();
            assert!(
                !agent.iter().any(|l| l.contains("REJECT") || l.contains("DROP")),
                "refused only via a chain: {agent:#?}"
            );
            let refusing: Vec<&str> = agent.iter().copied().filter(|l| l.contains("-j CORDON_REFUSE_")).collect();
            assert!(refusing.len() >= 6, "{refusing:#?}");
            // The last two rules catch everything: other TCP is not admitted, the rest is UDP/ICMP.
            assert_eq!(
                agent[agent.len() - 2..],
                ["-A CORDON_AGENT -p tcp -j CORDON_REFUSE_ADDR", "-A CORDON_AGENT -j CORDON_REFUSE_PROTO"]
            );
            for (name, reason) in REFUSALS {
                let rules: Vec<&str> = chain.lines().filter(|l| l.starts_with(&format!("-A {name} "))).collect();
                assert!(
                    rules[0].contains(&format!(
                        "-m limit --limit 50/sec --limit-burst 100 -j NFLOG --nflog-prefix {} --nflog-group 7710",
                        reason.as_str()
                    )),
                    "{name} logs first: {rules:#?}"
                );
                assert_eq!(
                    rules.last().unwrap().split(" -j ").nth(1).unwrap().split(' ').next(),
                    Some("REJECT"),
                    "{name} ends in a reject"
                );
                assert!(rules[1..].iter().all(|r| r.contains("-j REJECT")), "{rules:#?}");
            }
        }
    }

    #[test]
    fn without_the_packet_log_read_the_same_packets_are_refused_unlogged() {
        let logged = render_chains(&plan(), Family::V4);
        let unlogged = render_chains(&Plan { log: false, ..plan() }, Family::V4);
        assert!(!unlogged.contains("NFLOG") && !unlogged.contains("-m limit"), "{unlogged}");
        let without_log: Vec<&str> = logged.lines().filter(|l| !l.contains("-j NFLOG")).collect();
        assert_eq!(without_log, unlogged.lines().collect::<Vec<_>>());
    }

    #[test]
    fn with_name_binding_the_proxy_port_is_accepted_only_as_a_redirect_and_before_the_loopback_reject() {
        let chain = render_chains(&plan(), Family::V4);
        let at = |needle: &str| chain.lines().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle}"));
        assert!(at("--dport 15443 -m conntrack --ctstate DNAT") < at("-o lo -j CORDON_REFUSE_LOOPBACK"));
        assert_eq!(chain.matches("15443").count(), 1, "no other rule opens the proxy port: {chain}");
        // A checked port reached without the redirect falls through to the reject.
        assert!(
            !chain.contains("--match-set cordon4 dst -j CORDON_ALLOW")
                && !chain.contains("cordon4-p8443 dst -j CORDON_ALLOW"),
            "{chain}"
        );
        // Root and kernel packets are never redirected: every nat rule matches the agent's uids.
        let nat = render_nat_chain(&plan(), Family::V6);
        assert!(
            nat.lines()
                .filter(|l| l.starts_with("-A"))
                .all(|l| l.contains(OWNER_MATCH) && l.ends_with("--to-ports 15443"))
        );
    }

    #[test]
    fn the_nat_jump_replaces_earlier_ones_and_leaves_dockers() {
        let listing = "-P OUTPUT ACCEPT\n-A OUTPUT -d 127.0.0.11/32 -j DOCKER_OUTPUT\n-A OUTPUT -j CORDON_NAT\n";
        assert_eq!(render_jump(listing, NAT_CHAIN), "-D OUTPUT -j CORDON_NAT\n-I OUTPUT 1 -j CORDON_NAT\n");
    }

    #[test]
    fn the_output_jump_replaces_the_old_owner_jump_and_duplicates_and_leaves_other_rules() {
        let listing = "-P OUTPUT ACCEPT\n\
-A OUTPUT -m owner --uid-owner 1-4294967294 -j CORDON_AGENT\n\
-A OUTPUT -d 127.0.0.11/32 -j DOCKER_OUTPUT\n\
-A OUTPUT -j CORDON_OUTPUT\n\
-A OUTPUT -j CORDON_OUTPUT\n";
        assert_eq!(
            render_output_jump(listing),
            "-D OUTPUT -m owner --uid-owner 1-4294967294 -j CORDON_AGENT\n\
-D OUTPUT -j CORDON_OUTPUT\n\
-D OUTPUT -j CORDON_OUTPUT\n\
-I OUTPUT 1 -j CORDON_OUTPUT\n"
        );
        assert_eq!(render_output_jump("-P OUTPUT ACCEPT\n"), "-I OUTPUT 1 -j CORDON_OUTPUT\n");
    }

    #[test]
    fn sets_are_created_fresh_and_swapped_over_the_ones_a_previous_run_left() {
        let existing: Vec<String> =
            ["cordon4", "cordon6-p8443.new", "cordon4-p22", "docker-set"].map(String::from).into();
        let sets = render_sets(&plan(), 300, &existing);
        assert_eq!(
            sets,
            "destroy cordon6-p8443.new
create cordon4.new hash:ip family inet timeout 300 maxelem 1048576
swap cordon4.new cordon4
destroy cordon4.new
create cordon4-p8443.new hash:ip family inet timeout 300 maxelem 1048576
rename cordon4-p8443.new cordon4-p8443
create cordon4-r22.new hash:ip family inet timeout 300 maxelem 1048576
rename cordon4-r22.new cordon4-r22
create cordon6.new hash:ip family inet6 timeout 300 maxelem 1048576
rename cordon6.new cordon6
create cordon6-p8443.new hash:ip family inet6 timeout 300 maxelem 1048576
rename cordon6-p8443.new cordon6-p8443
create cordon6-r22.new hash:ip family inet6 timeout 300 maxelem 1048576
rename cordon6-r22.new cordon6-r22
"
        );
        assert_eq!(stale_sets(&plan(), &existing), ["cordon6-p8443.new", "cordon4-p22"]);
    }

    #[test]
    fn only_cordons_own_set_names_are_recognised() {
        for name in
            ["cordon4", "cordon6", "cordon4-p8443", "cordon6-p1.new", "cordon4.new", "cordon4-r22", "cordon6-r22.new"]
        {
            assert!(is_cordon_set(name), "{name}");
        }
        for name in
            ["cordon", "cordon5", "cordon4-p", "cordon4-px", "cordon4x", "kube-cordon4", "cordon4.old", "cordon4-r"]
        {
            assert!(!is_cordon_set(name), "{name}");
        }
    }

    #[test]
    fn quoted_u32_expressions_stay_one_argument_when_a_rule_is_deleted() {
        let line = r#"-D OUTPUT -p ipv6-icmp -m u32 ! --u32 "0x4&0xff00=0x0&&0x28=0x1" -j CORDON_OUTPUT"#;
        assert_eq!(
            split_spec(line),
            [
                "-D",
                "OUTPUT",
                "-p",
                "ipv6-icmp",
                "-m",
                "u32",
                "!",
                "--u32",
                "0x4&0xff00=0x0&&0x28=0x1",
                "-j",
                "CORDON_OUTPUT"
            ]
        );
    }

    #[test]
    fn missing_capability_gets_the_capability_hint() {
        let e = FirewallError::Failed {
            program: "iptables-restore",
            stderr: "iptables-restore v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)".into(),
        };
        assert!(e.hint().contains("--cap-add NET_ADMIN"));
        let e = FirewallError::Spawn { program: "ipset", source: std::io::ErrorKind::NotFound.into() };
        assert!(e.hint().contains("apt-get install iptables ipset"));
    }

    #[test]
    fn a_runtime_without_netfilter_is_told_apart_from_a_missing_capability() {
        let no_netfilter = [
            "iptables-restore v1.8.9 (nf_tables): Could not fetch rule set generation id: Protocol not supported",
            "iptables v1.8.9 (legacy): can't initialize iptables table `filter': Table does not exist (do you need to insmod?)",
            "ip6tables-restore v1.8.9 (legacy): unable to initialize table 'filter'",
            "iptables-restore: line 5 failed: Couldn't load target `CONNMARK':No such file or directory",
            "iptables v1.8.9 (nf_tables): Couldn't load match `u32':No such file or directory",
            "Warning: Extension owner revision 0 not supported, missing kernel module?",
            "iptables: Failed to initialize nft: Protocol not supported",
            "ipset v7.17: Cannot open session to kernel.",
            "ipset v7.17: Kernel error received: set type not supported",
        ];
        for stderr in no_netfilter {
            assert_eq!(classify(stderr), Cause::NoNetfilter, "{stderr}");
        }
        for stderr in
            ["ipset v7.17: Kernel error received: Operation not permitted", "Permission denied (you must be root)"]
        {
            assert_eq!(classify(stderr), Cause::Capability, "{stderr}");
        }
        assert_eq!(classify("iptables-restore: line 3 failed"), Cause::Other);
        let e = FirewallError::NoNetfilter { program: "ip6tables-restore", stderr: no_netfilter[0].into() };
        assert!(e.hint().contains("lacks netfilter") && e.hint().contains("gVisor"), "{}", e.hint());
        assert!(!e.hint().contains("NET_ADMIN"));
        assert!(e.to_string().contains("does not provide the netfilter support"), "{e}");
    }

    /// Evaluates a rule's `-m u32 --u32 "..."` matches (the plain `at&mask=value` form used
    /// here) against an IPv6 packet, as xt_u32 does: a read past the end fails the test.
    fn u32_matches(rule: &str, packet: &[u8]) -> bool {
        let num = |t: &str| u32::from_str_radix(t.trim_start_matches("0x"), 16).unwrap();
        rule.split("--u32 \"").skip(1).all(|m| {
            m.split('"').next().unwrap().split("&&").all(|test| {
                let (lhs, value) = test.split_once('=').unwrap();
                let (at, mask) = lhs.split_once('&').map_or((lhs, u32::MAX), |(a, m)| (a, num(m)));
                let at = num(at) as usize;
                packet.get(at..at + 4).is_some_and(|w| u32::from_be_bytes(w.try_into().unwrap()) & mask == num(value))
            })
        })
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn mld_reports_of_solicited_node_groups_pass_and_any_other_group_drops_the_report() {
        let chain = render_chains(&plan(), Family::V6);
        let returns: Vec<&str> = chain.lines().filter(|l| l.starts_with("-A CORDON_MLD -m u32")).collect();
        let passes = |packet: &[u8]| returns.iter().any(|r| u32_matches(r, packet));
        // Captured from Linux 6.18 after `ip -6 addr add 2001:db8::ab:cd99/64 nodad` on a veth:
        // two records (the new address's group and the pending link-local one), then one.
        let two = hex("6000000000380001fe80000000000000ec8300fffe190337ff020000000000000000000000000016\
             3a00050200000100\
             8f00ae8600000002\
             04000000ff0200000000000000000001ffabcd99\
             04000000ff0200000000000000000001ff190337");
        let one = hex("6000000000240001fe800000000000008c6f1ffffef529d6ff020000000000000000000000000016\
             3a00050200000100\
             8f00710300000001\
             04000000ff0200000000000000000001fff529d6");
        assert!(passes(&one), "one solicited-node record");
        assert!(passes(&two), "two solicited-node records");
        // The same reports carrying a group of the agent's choosing (ff0e::...) instead.
        let mut agent = one.clone();
        agent[60..76].copy_from_slice(&hex("ff0e0000000000005ec2e7da7a00c0de"));
        assert!(!passes(&agent), "an agent's group");
        let mut mixed = two.clone();
        mixed[80..96].copy_from_slice(&hex("ff0e0000000000005ec2e7da7a00c0de"));
        assert!(!passes(&mixed), "an agent's group behind a solicited-node one");
        // A record with sources.
        let mut sources = one.clone();
        sources[59] = 1;
        assert!(!passes(&sources), "a record with a source");
        assert!(chain.contains("-A CORDON_MLD -j DROP"), "{chain}");
    }
}

/// `apply`, `remove` and `counters` against a recorder (`sys::effects::Recorder`): the exact
/// commands and their input, and the error and fix of each failure, without root.
/// tests/netfilter.rs proves them on the real kernel.
#[cfg(test)]
mod apply_tests {
    use super::*;
    use crate::fix::Fix;
    use crate::sys::effects::{Call, Fault, Recorder};

    fn plan() -> Plan {
        Plan {
            listen: "127.0.0.53:53".parse().unwrap(),
            resolvers: vec!["127.0.0.11".parse().unwrap()],
            ports: vec![443],
            extra_ports: vec![8443],
            raw_ports: vec![],
            loopback_ports: vec![],
            proxy_port: Some(15001),
            log: true,
            metrics_port: None,
        }
    }

    /// `OUTPUT` of either table before cordon's jump, and after.
    const BEFORE: &str = "-P OUTPUT ACCEPT\n";
    fn after(chain: &str) -> String {
        format!("-P OUTPUT ACCEPT\n-A OUTPUT -j {chain}\n")
    }

    /// The rules of `chain` in `rules`, as `iptables -S chain` lists them.
    fn listing(rules: &str, chain: &str) -> Vec<String> {
        rules.lines().filter(|l| l.starts_with(&format!("-A {chain} "))).map(|l| format!("{l}\n")).collect()
    }

    /// A kernel that takes the rules: `ipset list -n` shows a set of an earlier run and a
    /// stale one, then every set; each `OUTPUT` shows no jump, then one; each chain reads back
    /// as written.
    fn kernel() -> Recorder {
        kernel_where(true, None)
    }

    /// `kernel()`, but IPv6's `OUTPUT`s never get the jumps unless `v6_applies`, and the IPv4
    /// filter chain `lost` reads back without its last rule.
    fn kernel_where(v6_applies: bool, lost: Option<&str>) -> Recorder {
        let rec = Recorder::new();
        rec.output("ipset list -n", "cordon4\ncordon4-p22\n")
            .output("ipset list -n", "cordon4\ncordon4-p22\ncordon4-p8443\ncordon6\ncordon6-p8443\n");
        for family in [Family::V4, Family::V6] {
            let tool = family.iptables();
            rec.output(&format!("{tool} -w 10 -t nat -S OUTPUT"), BEFORE)
                .output(&format!("{tool} -w 10 -S OUTPUT"), BEFORE);
            if family == Family::V4 || v6_applies {
                rec.output(&format!("{tool} -w 10 -t nat -S OUTPUT"), &after(NAT_CHAIN))
                    .output(&format!("{tool} -w 10 -S OUTPUT"), &after(OUTPUT_CHAIN));
            }
            let rules = render_rules(&plan(), family, BEFORE, BEFORE);
            let nat = listing(&rules, NAT_CHAIN).concat();
            rec.output(&format!("{tool} -w 10 -t nat -S {NAT_CHAIN}"), &format!("-N {NAT_CHAIN}\n{nat}"));
            for chain in CHAINS {
                let mut listed = listing(&rules, chain);
                if family == Family::V4 && lost == Some(chain) {
                    listed.pop();
                }
                rec.output(&format!("{tool} -w 10 -S {chain}"), &format!("-N {chain}\n{}", listed.concat()));
            }
        }
        rec
    }

    fn read_back(tool: &str) -> Vec<String> {
        let mut commands =
            vec![format!("{tool} -w 10 -t nat -S {NAT_CHAIN}"), format!("{tool} -w 10 -t nat -S OUTPUT")];
        commands.extend(CHAINS.map(|c| format!("{tool} -w 10 -S {c}")));
        commands.push(format!("{tool} -w 10 -S OUTPUT"));
        commands
    }

    fn stdin_of(rec: &Recorder, program: &str) -> String {
        rec.calls()
            .into_iter()
            .find_map(|c| match c {
                Call::Run { program: p, stdin, .. } if p == program => stdin,
                _ => None,
            })
            .unwrap_or_else(|| panic!("{program} was not run with input"))
    }

    #[test]
    fn a_widening_creates_only_the_missing_sets_and_keeps_the_others_and_their_addresses() {
        let mut p = plan();
        p.extra_ports = vec![8443];
        p.raw_ports = vec![22];
        let existing: Vec<String> = ["cordon4", "cordon6", "cordon4-p8443", "cordon6-p8443"].map(String::from).to_vec();
        assert_eq!(
            render_missing_sets(&p, 360, &existing),
            "create cordon4-r22 hash:ip family inet timeout 360 maxelem 1048576\n\
             create cordon6-r22 hash:ip family inet6 timeout 360 maxelem 1048576\n"
        );
        assert_eq!(render_missing_sets(&p, 360, &p.sets().into_iter().map(|(_, n)| n).collect::<Vec<_>>()), "");
    }

    #[test]
    fn apply_swaps_the_sets_then_restores_and_reads_back_each_family_then_drops_stale_sets() {
        let rec = kernel();
        apply(&plan(), 300, &rec).unwrap();
        let mut expected = vec!["ipset list -n".to_string(), "ipset restore".into()];
        for (tool, restore) in [("iptables", "iptables-restore"), ("ip6tables", "ip6tables-restore")] {
            expected.push(format!("{tool} -w 10 -t nat -S OUTPUT"));
            expected.push(format!("{tool} -w 10 -S OUTPUT"));
            expected.push(format!("{restore} --noflush --wait 10"));
            expected.extend(read_back(tool));
        }
        expected.extend(["ipset list -n".into(), "ipset destroy cordon4-p22".into()]);
        assert_eq!(rec.commands(), expected);

        let sets = stdin_of(&rec, "ipset");
        assert_eq!(sets, render_sets(&plan(), 300, &["cordon4".into(), "cordon4-p22".into()]));
        assert!(
            sets.contains(
                "create cordon4.new hash:ip family inet timeout 300 maxelem 1048576\nswap cordon4.new cordon4\ndestroy cordon4.new\n"
            ),
            "{sets}"
        );
        assert!(sets.contains("rename cordon6.new cordon6\n"), "{sets}");
        assert_eq!(stdin_of(&rec, "iptables-restore"), render_rules(&plan(), Family::V4, BEFORE, BEFORE));
        assert_eq!(stdin_of(&rec, "ip6tables-restore"), render_rules(&plan(), Family::V6, BEFORE, BEFORE));
    }

    /// The commands `remove` runs when the IPv4 firewall is in place and the IPv6 one is not:
    /// the IPv4 jumps and chains go (nat, then filter), IPv6 has nothing to remove, every
    /// cordon set goes.
    fn rollback() -> Vec<String> {
        let mut expected: Vec<String> = [
            "iptables -w 10 -t nat -S OUTPUT",
            "iptables -w 10 -t nat -D OUTPUT -j CORDON_NAT",
            "iptables -w 10 -t nat -S",
            "iptables -w 10 -t nat -F CORDON_NAT",
            "iptables -w 10 -t nat -X CORDON_NAT",
            "iptables -w 10 -S OUTPUT",
            "iptables -w 10 -D OUTPUT -j CORDON_OUTPUT",
            "iptables -w 10 -S",
        ]
        .map(String::from)
        .into();
        for flag in ["-F", "-X"] {
            expected.extend(CHAINS.map(|c| format!("iptables -w 10 {flag} {c}")));
        }
        expected.extend(
            [
                "ip6tables -w 10 -t nat -S OUTPUT",
                "ip6tables -w 10 -t nat -S",
                "ip6tables -w 10 -S OUTPUT",
                "ip6tables -w 10 -S",
                "ipset list -n",
            ]
            .map(String::from),
        );
        expected.extend(
            ["cordon4", "cordon4-p22", "cordon4-p8443", "cordon6", "cordon6-p8443"]
                .map(|s| format!("ipset destroy {s}")),
        );
        expected
    }

    /// A kernel where IPv4's firewall goes in (`iptables -S` of each table lists its chains)
    /// and IPv6's does not, with the IPv4 filter chain `lost` reading back short.
    fn kernel_with_ipv4_chains(lost: Option<&str>) -> Recorder {
        let rec = kernel_where(false, lost);
        rec.output("iptables -w 10 -t nat -S", &format!("-P OUTPUT ACCEPT\n-N {NAT_CHAIN}\n")).output(
            "iptables -w 10 -S",
            &format!("-P OUTPUT ACCEPT\n{}", CHAINS.map(|c| format!("-N {c}\n")).concat()),
        );
        rec
    }

    #[test]
    fn a_runtime_without_ip6tables_gets_the_no_netfilter_fix_and_everything_applied_is_rolled_back() {
        let rec = kernel_with_ipv4_chains(None);
        let stderr = "ip6tables-restore v1.8.9 (legacy): can't initialize ip6tables table `filter': Table does not exist (do you need to insmod?)";
        rec.fail_run("ip6tables-restore", stderr);
        let e = apply(&plan(), 300, &rec).unwrap_err();
        assert!(matches!(e, FirewallError::NoNetfilter { program: "ip6tables-restore", .. }), "{e:?}");
        assert!(e.fix().unwrap().contains("lacks netfilter"), "{e:?}");
        let commands = rec.commands();
        let failed = commands.iter().position(|c| c == "ip6tables-restore --noflush --wait 10").unwrap();
        assert_eq!(commands[failed + 1..], rollback());
    }

    #[test]
    fn without_an_ipv6_nat_table_ipv6_gets_the_filter_alone_and_its_checked_ports_are_refused() {
        let rec = kernel();
        let missing = "ip6tables v1.8.9 (legacy): can't initialize ip6tables table `nat': Table does not exist (do you need to insmod?)";
        rec.fail_run("ip6tables -w 10 -t nat", missing);
        let applied = apply(&plan(), 300, &rec).expect("IPv4 and the IPv6 filter still apply");
        assert_eq!(applied.without_nat, [Family::V6]);
        let v6 = rec
            .calls()
            .into_iter()
            .find_map(|c| match c {
                Call::Run { program, stdin, .. } if program == "ip6tables-restore" => stdin,
                _ => None,
            })
            .unwrap();
        assert!(!v6.contains("*nat"), "no nat table for IPv6:\n{v6}");
        // Nothing of IPv6 is redirected, and the checked ports are accepted only as redirects.
        assert!(v6.contains("--ctstate DNAT -j CORDON_ALLOW"), "{v6}");
        assert!(
            !v6.contains("--match-set cordon6 dst -j CORDON_ALLOW"),
            "the checked ports are not accepted by address: {v6}"
        );
        assert!(!v6.contains("--match-set cordon6-p8443 dst -j CORDON_ALLOW"), "{v6}");
        assert!(!rec.commands().iter().any(|c| c == "ip6tables -w 10 -t nat -S CORDON_NAT"), "no nat read-back");
        // IPv4's nat table missing is no such fallback: it fails, and everything is rolled back.
        let rec = kernel();
        rec.fail_run("iptables -w 10 -t nat", &missing.replace("ip6tables", "iptables"));
        assert!(matches!(apply(&plan(), 300, &rec).unwrap_err(), FirewallError::NoNetfilter { .. }));
    }

    #[test]
    fn a_missing_net_admin_gets_the_capability_fix_and_a_rollback() {
        let rec = kernel_with_ipv4_chains(None);
        rec.fail_run("ip6tables-restore", "ip6tables-restore v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)");
        let e = apply(&plan(), 300, &rec).unwrap_err();
        assert!(matches!(e, FirewallError::Failed { program: "ip6tables-restore", .. }), "{e:?}");
        assert!(e.fix().unwrap().contains("--cap-add NET_ADMIN"), "{e:?}");
        assert!(rec.commands().ends_with(&rollback()), "{:#?}", rec.commands());
    }

    #[test]
    fn a_chain_that_reads_back_short_is_a_verify_error_and_a_rollback() {
        let rec = kernel_with_ipv4_chains(Some(ALLOW_CHAIN));
        let e = apply(&plan(), 300, &rec).unwrap_err();
        assert!(
            matches!(e, FirewallError::Verify { family: Family::V4, chain: ALLOW_CHAIN, found: 1, expected: 2 }),
            "{e:?}"
        );
        assert_eq!(e.fix().unwrap(), "another process changed the firewall during boot");
        let commands = rec.commands();
        let failed = commands.iter().position(|c| c == "iptables -w 10 -S CORDON_ALLOW").unwrap();
        assert_eq!(commands[failed + 1..], rollback());
    }

    #[test]
    fn a_missing_ipset_binary_gets_the_install_fix_and_nothing_else_runs_but_the_rollback() {
        let rec = Recorder::new();
        rec.fail_when(
            |c| c.command_line().is_some_and(|l| l.starts_with("ipset ")),
            Fault::Errno(nix::errno::Errno::ENOENT),
        );
        let e = apply(&plan(), 300, &rec).unwrap_err();
        assert!(matches!(e, FirewallError::Spawn { program: "ipset", .. }), "{e:?}");
        assert!(e.fix().unwrap().contains("apt-get install iptables ipset"), "{e:?}");
        let mut expected = vec!["ipset list -n".to_string()];
        for tool in ["iptables", "ip6tables"] {
            expected.extend(["-t nat -S OUTPUT", "-t nat -S", "-S OUTPUT", "-S"].map(|a| format!("{tool} -w 10 {a}")));
        }
        expected.push("ipset list -n".into());
        assert_eq!(rec.commands(), expected);
    }

    #[test]
    fn counters_are_read_per_rule_in_order_for_status() {
        let rec = Recorder::new();
        rec.output(
            "iptables -w 10 -L CORDON_AGENT -n -v -x",
            "Chain CORDON_AGENT (1 references)\n    pkts      bytes target     prot opt in     out     source               destination\n\
                   12     3400 ACCEPT     all  --  *      *       0.0.0.0/0            0.0.0.0/0            ctstate RELATED,ESTABLISHED\n\
                    3      180 REJECT     tcp  --  *      *       0.0.0.0/0            0.0.0.0/0            reject-with tcp-reset\n",
        );
        let rules = counters(Family::V4, &rec).unwrap();
        assert_eq!(rules.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [12, 3]);
        assert!(rules[1].1.starts_with("REJECT tcp -- * * 0.0.0.0/0"), "{rules:?}");
        rec.fail_run("iptables -w 10 -L", "iptables: No chain/target/match by that name.");
        assert!(matches!(counters(Family::V4, &rec), Err(FirewallError::Failed { program: "iptables", .. })));
    }
}
