//! Readiness probes: real positive and negative checks of the egress policy, made from a child
//! process running as the agent user with its privileges dropped, exactly as the agent's own
//! traffic would be. Any failed probe fails the boot.
//!
//! Negative probes pass on an active refusal (connection refused, which the firewall's REJECT
//! produces at once) or on the absence of a route; they fail if a connection is made or a
//! packet is silently left to time out.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A name no allowlist can contain (RFC 6761 reserves `.invalid`).
pub const DENIED_NAME: &str = "cordon-readiness-probe.invalid";
/// TEST-NET-3 (RFC 5737) and the IPv6 documentation prefix (RFC 3849): never admitted for a real
/// name, routed by any default route, so a working firewall is what stops them.
pub const NOT_ADMITTED_V4: &str = "203.0.113.1:443";
pub const NOT_ADMITTED_V6: &str = "[2001:db8:ffff::1]:443";
/// A stand-in outside resolver in TEST-NET-3.
pub const OUTSIDE_RESOLVER: &str = "203.0.113.53:53";
const TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub listen: SocketAddr,
    /// The upstream resolvers and a stand-in outside one: DNS to each must be refused.
    pub outside_dns: Vec<SocketAddr>,
    pub not_admitted: Vec<SocketAddr>,
    /// `name:port` that must resolve and connect.
    pub allowed: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProbeResult {
    pub probe: String,
    pub ok: bool,
    pub detail: String,
}

/// The spec for a configuration and its upstreams.
pub fn spec(listen: SocketAddr, upstreams: &[SocketAddr], allowed: Option<String>) -> Spec {
    let mut outside_dns = upstreams.to_vec();
    outside_dns.push(OUTSIDE_RESOLVER.parse().expect("constant address"));
    Spec {
        listen,
        outside_dns,
        not_admitted: vec![NOT_ADMITTED_V4.parse().expect("constant"), NOT_ADMITTED_V6.parse().expect("constant")],
        allowed,
    }
}

/// How long the probe child may take: every probe can wait out its own [`TIMEOUT`] (an
/// unanswered lookup, a dropped packet), the allowed name's lookup the C resolver's own
/// timeouts (resolv.conf(5): 5 s per try, 2 tries), plus the child's start.
pub fn deadline(spec: &Spec) -> Duration {
    let probes = 1 + spec.not_admitted.len() + 2 * spec.outside_dns.len() + usize::from(spec.allowed.is_some());
    let lookup = if spec.allowed.is_some() { Duration::from_secs(10) } else { Duration::ZERO };
    TIMEOUT * u32::try_from(probes).unwrap_or(u32::MAX) + lookup + Duration::from_secs(5)
}

/// A DNS query for `name`/A with a random-enough id, EDNS-less (so plain RFC 1035).
fn query(name: &str, id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, one question
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    q
}

/// An immediate "no": the firewall's reject (refused, not permitted), or no way to send at all
/// (no route; no address of that family, as in a container without IPv6).
fn refused(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused
            | ErrorKind::PermissionDenied
            | ErrorKind::NetworkUnreachable
            | ErrorKind::HostUnreachable
            | ErrorKind::AddrNotAvailable
    )
}

fn denied_name(listen: SocketAddr) -> ProbeResult {
    let probe = format!("denied name {DENIED_NAME} gets NXDOMAIN from {listen}");
    let result = (|| {
        let sock = UdpSocket::bind(if listen.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
        sock.set_read_timeout(Some(TIMEOUT))?;
        sock.connect(listen)?;
        let id = (std::process::id() & 0xffff) as u16;
        sock.send(&query(DENIED_NAME, id))?;
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf)?;
        Ok::<_, std::io::Error>((n, buf))
    })();
    match result {
        Ok((n, buf)) if n >= 4 && buf[3] & 0x0f == 3 => ProbeResult { probe, ok: true, detail: "NXDOMAIN".into() },
        Ok((n, buf)) => ProbeResult {
            probe,
            ok: false,
            detail: format!("answer with rcode {} ({n} bytes)", if n >= 4 { buf[3] & 0x0f } else { 255 }),
        },
        Err(e) => ProbeResult { probe, ok: false, detail: format!("no answer: {e}") },
    }
}

fn tcp_refused(target: SocketAddr, what: &str) -> ProbeResult {
    let probe = format!("{what} {target} is refused");
    match TcpStream::connect_timeout(&target, TIMEOUT) {
        Ok(_) => ProbeResult { probe, ok: false, detail: "connected: the firewall let it through".into() },
        Err(e) if refused(&e) => ProbeResult { probe, ok: true, detail: e.to_string() },
        Err(e) => ProbeResult { probe, ok: false, detail: format!("{e} (expected an immediate refusal)") },
    }
}

fn udp_dns_refused(target: SocketAddr) -> ProbeResult {
    let probe = format!("DNS over UDP to {target} is refused");
    let result = (|| {
        let sock = UdpSocket::bind(if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
        sock.set_read_timeout(Some(TIMEOUT))?;
        sock.connect(target)?;
        sock.send(&query("example.com", 0x4242))?;
        let mut buf = [0u8; 512];
        sock.recv(&mut buf)
    })();
    match result {
        Ok(n) => ProbeResult { probe, ok: false, detail: format!("got a {n}-byte answer: DNS bypass possible") },
        Err(e) if refused(&e) => ProbeResult { probe, ok: true, detail: e.to_string() },
        Err(e) => ProbeResult { probe, ok: false, detail: format!("{e} (expected an immediate refusal)") },
    }
}

fn allowed(target: &str) -> ProbeResult {
    let probe = format!("allowed {target} resolves and connects");
    let addrs: Vec<SocketAddr> = match target.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => return ProbeResult { probe, ok: false, detail: format!("does not resolve: {e}") },
    };
    let mut last = String::from("no address");
    for addr in &addrs {
        match TcpStream::connect_timeout(addr, TIMEOUT) {
            Ok(mut s) => {
                // Be polite to whatever answers: a byte-less close.
                let _ = s.write_all(b"");
                let _ = s.read(&mut [0u8; 0]);
                return ProbeResult { probe, ok: true, detail: format!("connected to {addr}") };
            }
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    ProbeResult { probe, ok: false, detail: last }
}

/// The boot's `readiness` stage: after the lockdown is complete and before the agent, the
/// probes run as the agent user (`cordon probe`, with the agent's privileges) and must all pass,
/// positively and negatively.
pub fn stage(
    egress: &crate::egress::Egress,
    allowed: Option<String>,
    user: &crate::session::users::AgentUser,
) -> crate::fix::StageResult<()> {
    use crate::fix::Problem;
    use crate::session::users::unprivileged_command;
    use crate::sys::command;
    let spec = spec(egress.listen, &egress.upstreams, allowed);
    let spec_json = serde_json::to_string(&spec).expect("probe spec serialises");
    let mut cmd = unprivileged_command(crate::sys::cordon_exe(), user);
    cmd.args(["probe", "--spec", &spec_json]).current_dir("/");
    let out = command::output(cmd, command::Options::new(deadline(&spec)))
        .map_err(|e| Problem::caused_by("cannot run the readiness probes", &e))?;
    let results: Vec<ProbeResult> = serde_json::from_slice(&out.stdout).map_err(|e| {
        Problem::new(format!(
            "the readiness probes gave no result ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    })?;
    let failed: Vec<String> = results.iter().filter(|r| !r.ok).map(|r| format!("{}: {}", r.probe, r.detail)).collect();
    if !failed.is_empty() {
        return Err(Problem::new(format!(
            "{} of {} egress probes failed: {}",
            failed.len(),
            results.len(),
            failed.join("; ")
        ))
        .with_fix("the firewall or DNS server is not enforcing the policy; see the boot log and `cordon status`"));
    }
    Ok(((), format!("{} probes passed as uid {}", results.len(), user.uid)))
}

/// Runs every probe of `spec`.
pub fn run(spec: &Spec) -> Vec<ProbeResult> {
    let mut results = vec![denied_name(spec.listen)];
    for &t in &spec.not_admitted {
        results.push(tcp_refused(t, "connection to the never-resolved address"));
    }
    for &t in &spec.outside_dns {
        results.push(udp_dns_refused(t));
        results.push(tcp_refused(t, "DNS over TCP to"));
    }
    if let Some(a) = &spec.allowed {
        results.push(allowed(a));
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;

    #[test]
    fn query_encodes_labels_type_and_class() {
        let q = query("a.bc", 0x1234);
        assert_eq!(&q[..2], &[0x12, 0x34]);
        assert_eq!(&q[12..], &[1, b'a', 2, b'b', b'c', 0, 0, 1, 0, 1]);
    }

    #[test]
    fn immediate_refusals_count_and_timeouts_do_not() {
        for errno in [Errno::ECONNREFUSED, Errno::EPERM, Errno::ENETUNREACH, Errno::EHOSTUNREACH, Errno::EADDRNOTAVAIL]
        {
            let errno = errno as i32;
            assert!(refused(&std::io::Error::from_raw_os_error(errno)), "errno {errno}");
        }
        assert!(!refused(&std::io::Error::from(ErrorKind::TimedOut)));
        assert!(!refused(&std::io::Error::from_raw_os_error(nix::errno::Errno::ETIMEDOUT as i32)));
    }

    #[test]
    fn spec_probes_upstreams_and_an_outside_resolver() {
        let s = spec("127.0.0.53:53".parse().unwrap(), &["127.0.0.11:53".parse().unwrap()], None);
        assert_eq!(s.outside_dns.len(), 2);
        assert_eq!(s.not_admitted.len(), 2);
        assert_eq!(deadline(&s), Duration::from_secs(3 * 7 + 5), "one timeout per probe, and the start");
    }
}
