//! The egress firewall: default-deny for every uid but root, IPv4 and IPv6 alike.
//!
//! The ruleset is static after boot and rendered from a plan (pure, snapshot-tested); what
//! changes at run time is only the content of the ipset allow sets, which the DNS server fills
//! as it answers (see `admission`). The rules are applied with `iptables-restore --noflush`,
//! one transaction per family, rather than with the `iptables` crate: one exec instead of one
//! per rule, all-or-nothing, and it leaves the runtime's own chains (Docker's DNS NAT) alone.
//!
//! Policy for a packet from a socket owned by uid 1..=4294967294 (root-owned sockets, such as
//! cordon's own and the platform's SSH daemon, never enter the chain):
//!   1. DNS to cordon's listener: accept.
//!   2. Anything to an upstream resolver, and DNS (port 53, before NAT) anywhere else: reject.
//!   3. Loopback: accept.
//!   4. Established/related: accept.
//!   5. New TCP to an admitted address on an allowed port: accept.
//!   6. Everything else: reject at once (TCP reset, ICMP otherwise), counted.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};

pub const CHAIN: &str = "CORDON_AGENT";

/// The jump that sends the agent's packets to the chain. Sockets without an owner (kernel
/// replies) and root's never match the uid range.
const JUMP: [&str; 6] = ["-m", "owner", "--uid-owner", "1-4294967294", "-j", CHAIN];

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

/// What the rules are made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub listen: SocketAddr,
    pub upstreams: Vec<SocketAddr>,
    /// Ports open on addresses admitted for entries without a port.
    pub ports: Vec<u16>,
    /// Ports of `name:port` entries, each with its own set.
    pub extra_ports: Vec<u16>,
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
        }
        sets
    }
}

/// The `iptables-restore --noflush` input for one family. Declaring the chain flushes it, so
/// applying it again replaces the chain's rules whole.
pub fn render_rules(plan: &Plan, family: Family) -> String {
    let (reject, proto_unreach) = match family {
        Family::V4 => ("icmp-admin-prohibited", "icmp-port-unreachable"),
        Family::V6 => ("icmp6-adm-prohibited", "icmp6-port-unreachable"),
    };
    let mut r = String::new();
    let mut rule = |s: &str| {
        let _ = writeln!(r, "-A {CHAIN} {s}");
    };
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
    for up in plan.upstreams.iter().filter(|u| Family::of(u.ip()) == family) {
        rule(&format!("-d {}/{} -p tcp -j REJECT --reject-with tcp-reset", up.ip(), family.prefix()));
        rule(&format!("-d {}/{} -j REJECT --reject-with {reject}", up.ip(), family.prefix()));
    }
    // The original destination port, before any NAT: Docker's resolver at 127.0.0.11:53 is
    // DNATed to a random port, which a plain --dport 53 would miss.
    rule(&format!("-p udp -m conntrack --ctproto 17 --ctorigdstport 53 -j REJECT --reject-with {proto_unreach}"));
    rule("-p tcp -m conntrack --ctproto 6 --ctorigdstport 53 -j REJECT --reject-with tcp-reset");
    rule("-o lo -j ACCEPT");
    rule("-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT");
    let ports: Vec<String> = plan.ports.iter().map(u16::to_string).collect();
    rule(&format!(
        "-p tcp -m multiport --dports {} -m set --match-set {} dst -j ACCEPT",
        ports.join(","),
        set_name(family, None)
    ));
    for &p in &plan.extra_ports {
        rule(&format!("-p tcp -m tcp --dport {p} -m set --match-set {} dst -j ACCEPT", set_name(family, Some(p))));
    }
    rule("-p tcp -j REJECT --reject-with tcp-reset");
    rule(&format!("-j REJECT --reject-with {reject}"));
    format!("*filter\n:{CHAIN} - [0:0]\n{r}COMMIT\n")
}

/// The `ipset restore` input creating every set (kept if it exists: `-exist`).
pub fn render_sets(plan: &Plan, default_timeout: u32) -> String {
    let mut s = String::new();
    for (family, name) in plan.sets() {
        let _ = writeln!(
            s,
            "create {name} hash:ip family {} timeout {default_timeout} maxelem 1048576 -exist",
            family.ipset_family()
        );
    }
    s
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
    #[error("the {family:?} chain {CHAIN} has {found} rules after applying, expected {expected}")]
    Verify { family: Family, found: usize, expected: usize },
}

impl FirewallError {
    pub fn hint(&self) -> String {
        match self {
            FirewallError::Spawn { program, .. } => format!(
                "{program} is not installed: add iptables and ipset to the image (apt-get install iptables ipset)"
            ),
            FirewallError::Failed { stderr, .. }
                if stderr.contains("ermission denied")
                    || stderr.contains("Operation not permitted")
                    || stderr.contains("you must be root") =>
            {
                "cordon needs CAP_NET_ADMIN to set up the firewall: docker run --cap-add NET_ADMIN, or in Kubernetes \
                 securityContext.capabilities.add: [\"NET_ADMIN\"]; Fly machines have it"
                    .into()
            }
            FirewallError::Failed { .. } => {
                "the kernel may lack a netfilter module (xt_owner, xt_conntrack, xt_set, ip_set_hash_ip, xt_REJECT): \
                 check the host kernel"
                    .into()
            }
            FirewallError::Verify { .. } => "another process changed the firewall during boot".into(),
        }
    }
}

fn run(program: &'static str, args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| FirewallError::Spawn { program, source })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error shows up as the program's failure below.
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(|source| FirewallError::Spawn { program, source })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(FirewallError::Failed { program, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() })
    }
}

/// Creates the sets, then installs the chain and the jump for both families, then reads the
/// chains back. The sets come first because the rules reference them.
pub fn apply(plan: &Plan, default_timeout: u32) -> Result<(), FirewallError> {
    run("ipset", &["restore"], Some(&render_sets(plan, default_timeout)))?;
    for family in [Family::V4, Family::V6] {
        let rules = render_rules(plan, family);
        run(family.restore(), &["--noflush", "--wait", "10"], Some(&rules))?;
        if run(family.iptables(), &[&["-w", "10", "-C", "OUTPUT"][..], &JUMP].concat(), None).is_err() {
            run(family.iptables(), &[&["-w", "10", "-I", "OUTPUT", "1"][..], &JUMP].concat(), None)?;
        }
        let listed = run(family.iptables(), &["-w", "10", "-S", CHAIN], None)?;
        let found = listed.lines().filter(|l| l.starts_with("-A ")).count();
        let expected = rules.lines().filter(|l| l.starts_with("-A ")).count();
        if found != expected {
            return Err(FirewallError::Verify { family, found, expected });
        }
    }
    Ok(())
}

/// Per-rule packet counters of the chain, in rule order (for `status`).
pub fn counters(family: Family) -> Result<Vec<(u64, String)>, FirewallError> {
    let out = run(family.iptables(), &["-w", "10", "-L", CHAIN, "-n", "-v", "-x"], None)?;
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
            upstreams: vec!["127.0.0.11:53".parse().unwrap(), "[2001:db8::53]:53".parse().unwrap()],
            ports: vec![80, 443],
            extra_ports: vec![8443],
        }
    }

    #[test]
    fn ipv4_rules_snapshot() {
        let expected = "\
*filter
:CORDON_AGENT - [0:0]
-A CORDON_AGENT -d 127.0.0.53/32 -p udp -m udp --dport 53 -j ACCEPT
-A CORDON_AGENT -d 127.0.0.53/32 -p tcp -m tcp --dport 53 -j ACCEPT
-A CORDON_AGENT -d 127.0.0.11/32 -p tcp -j REJECT --reject-with tcp-reset
-A CORDON_AGENT -d 127.0.0.11/32 -j REJECT --reject-with icmp-admin-prohibited
-A CORDON_AGENT -p udp -m conntrack --ctproto 17 --ctorigdstport 53 -j REJECT --reject-with icmp-port-unreachable
-A CORDON_AGENT -p tcp -m conntrack --ctproto 6 --ctorigdstport 53 -j REJECT --reject-with tcp-reset
-A CORDON_AGENT -o lo -j ACCEPT
-A CORDON_AGENT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A CORDON_AGENT -p tcp -m multiport --dports 80,443 -m set --match-set cordon4 dst -j ACCEPT
-A CORDON_AGENT -p tcp -m tcp --dport 8443 -m set --match-set cordon4-p8443 dst -j ACCEPT
-A CORDON_AGENT -p tcp -j REJECT --reject-with tcp-reset
-A CORDON_AGENT -j REJECT --reject-with icmp-admin-prohibited
COMMIT
";
        assert_eq!(render_rules(&plan(), Family::V4), expected);
    }

    #[test]
    fn ipv6_gets_the_same_policy_without_the_ipv4_listener() {
        let expected = "\
*filter
:CORDON_AGENT - [0:0]
-A CORDON_AGENT -d 2001:db8::53/128 -p tcp -j REJECT --reject-with tcp-reset
-A CORDON_AGENT -d 2001:db8::53/128 -j REJECT --reject-with icmp6-adm-prohibited
-A CORDON_AGENT -p udp -m conntrack --ctproto 17 --ctorigdstport 53 -j REJECT --reject-with icmp6-port-unreachable
-A CORDON_AGENT -p tcp -m conntrack --ctproto 6 --ctorigdstport 53 -j REJECT --reject-with tcp-reset
-A CORDON_AGENT -o lo -j ACCEPT
-A CORDON_AGENT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A CORDON_AGENT -p tcp -m multiport --dports 80,443 -m set --match-set cordon6 dst -j ACCEPT
-A CORDON_AGENT -p tcp -m tcp --dport 8443 -m set --match-set cordon6-p8443 dst -j ACCEPT
-A CORDON_AGENT -p tcp -j REJECT --reject-with tcp-reset
-A CORDON_AGENT -j REJECT --reject-with icmp6-adm-prohibited
COMMIT
";
        assert_eq!(render_rules(&plan(), Family::V6), expected);
    }

    #[test]
    fn every_referenced_set_is_created() {
        let sets = render_sets(&plan(), 300);
        for name in ["cordon4 ", "cordon6 ", "cordon4-p8443 ", "cordon6-p8443 "] {
            assert!(sets.contains(&format!("create {name}")), "{sets}");
        }
        assert!(sets.contains("cordon6 hash:ip family inet6 timeout 300"));
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
}
