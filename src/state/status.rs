//! `cordon status`: what is running, what failed, what was blocked and why. The document is
//! built by the running supervisor (live, over the control socket) or, when cordon does not
//! answer, from the state file; it renders as JSON (stable schema, `docs/status.md`) or as one
//! screen for a person.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::state::report::{AgentState, Phase, StageRecord, State};

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusDoc {
    pub version: u32,
    /// "live" (from the running cordon) or "state-file" (cordon did not answer).
    pub source: String,
    pub phase: Phase,
    pub reason: Option<String>,
    /// The stage running now, while booting.
    pub current_stage: Option<String>,
    pub failed: Option<FailedStage>,
    pub pid: u32,
    pub init_mode: String,
    pub started_at: String,
    pub uptime_s: Option<f64>,
    pub boot_ms: Option<f64>,
    pub stages: Vec<StageRecord>,
    pub dns: Option<DnsStatus>,
    pub egress: Option<EgressStatus>,
    /// The name-bound layer (live only; None when egress is not enforced).
    #[serde(default)]
    pub namebound: Option<NameBoundStatus>,
    pub session: SessionStatus,
    pub filesystem: FilesystemStatus,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedStage {
    pub stage: String,
    pub error: String,
    pub hint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DnsStatus {
    pub listen: String,
    pub upstreams: Vec<String>,
    pub upstream_last_error: Option<TimedMessage>,
    pub queries: QueryCounts,
    pub recent_denials: Vec<DenialStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimedMessage {
    pub at: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryCounts {
    pub allowed: u64,
    pub denied: u64,
    pub failed: u64,
    pub stale: u64,
    pub rebinding_blocked: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DenialStatus {
    pub name: String,
    #[serde(rename = "type")]
    pub qtype: String,
    pub count: u64,
    pub last: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EgressStatus {
    pub allowlist_entries: usize,
    pub admitted_ipv4: usize,
    pub admitted_ipv6: usize,
    pub last_refresh: Option<RefreshStatus>,
    /// Packets the firewall rejected, from its own counters; None if they could not be read.
    pub rejected_ipv4: Option<u64>,
    pub rejected_ipv6: Option<u64>,
}

/// The name-bound layer: the proxy's counters and its recent refusals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NameBoundStatus {
    /// `network.name_binding`.
    pub enabled: bool,
    /// The proxy is serving (false with `enabled`: the layer failed; connections on the
    /// name-checked ports are refused, never let through).
    pub running: bool,
    /// Loopback port of the proxy.
    pub proxy_port: Option<u16>,
    /// (name, address) pairs cordon's DNS answered and the layer holds.
    pub bindings: usize,
    pub connections: NameBoundCounts,
    /// Newest first, at most 32.
    pub recent_refusals: Vec<RefusalStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NameBoundCounts {
    /// Connections the kernel redirected to the proxy.
    pub accepted: u64,
    /// TLS connections and HTTP requests let through.
    pub allowed: u64,
    /// Refusals of any reason, timeouts and overload included.
    pub refused: u64,
    pub hello_timeouts: u64,
    pub overloaded: u64,
    /// Allowed, but the destination could not be reached.
    pub upstream_failures: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefusalStatus {
    /// The SNI or HTTP host, or "no SNI" / "no host".
    pub name: String,
    pub address: String,
    pub port: u16,
    /// "tls" or "http".
    pub kind: String,
    pub reason: String,
    pub at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefreshStatus {
    pub at: String,
    pub names: usize,
    pub addresses: usize,
    pub changed: usize,
    pub failed: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionStatus {
    pub agent: Option<AgentState>,
    /// The tmux session, when the agent runs in one (live only).
    pub tmux: Option<TmuxStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TmuxStatus {
    pub session: String,
    pub socket: String,
    /// The tmux server answers and the session exists.
    pub alive: bool,
    /// Attached clients: "pid tty WIDTHxHEIGHT".
    pub clients: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilesystemStatus {
    /// Whether the read-only root was verified (None: not reached, or turned off).
    pub readonly_root: Option<bool>,
    pub tmpfs: Vec<TmpfsUsage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TmpfsUsage {
    pub path: String,
    pub size_bytes: u64,
    pub used_bytes: u64,
    pub use_pct: u8,
    /// At or above 80% full.
    pub warning: bool,
}

/// `cordon status why <target>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WhyDoc {
    pub target: String,
    /// "name" or "address".
    pub kind: String,
    /// "allowed", "denied", "admitted", "not admitted", "never admitted", "not enforced".
    pub verdict: String,
    pub explanation: String,
    /// The allowlist entries that decided, with file and line.
    pub decided_by: Vec<String>,
    pub admitted: Vec<AdmittedStatus>,
    /// For a name: how its connections are judged, one line per port ("443: TLS, name-checked
    /// (SNI)", "22: address-based (name:22:raw)").
    #[serde(default)]
    pub ports: Vec<String>,
    /// For an address: the names cordon's DNS answered with it, whose connections to it the
    /// name-bound layer lets through (if allowlisted).
    #[serde(default)]
    pub bound_names: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdmittedStatus {
    pub ip: String,
    pub name: String,
    pub set: String,
    pub until: String,
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The part of the document the state file alone gives.
pub fn from_state(state: &State, source: &str) -> StatusDoc {
    let uptime_s = humantime::parse_rfc3339_weak(&state.started_at)
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .map(|d| (d.as_secs_f64() * 10.0).round() / 10.0);
    let failed = state.stages.iter().find(|s| s.outcome == crate::state::report::Outcome::Failed).map(|s| {
        FailedStage { stage: s.name.clone(), error: s.error.clone().unwrap_or_default(), hint: s.hint.clone() }
    });
    let current_stage = (state.phase == Phase::Booting)
        .then(|| state.stages.iter().rev().find(|s| s.outcome == crate::state::report::Outcome::Running))
        .flatten()
        .map(|s| s.name.clone());
    let readonly_root = state.stages.iter().find(|s| s.name == "readonly_root").and_then(|s| match s.outcome {
        crate::state::report::Outcome::Ok => Some(true),
        crate::state::report::Outcome::Failed => Some(false),
        _ => None,
    });
    StatusDoc {
        version: SCHEMA_VERSION,
        source: source.into(),
        phase: state.phase.clone(),
        reason: state.reason.clone(),
        current_stage,
        failed,
        pid: state.pid,
        init_mode: state.init_mode.clone(),
        started_at: state.started_at.clone(),
        uptime_s,
        boot_ms: state.boot_ms,
        stages: state.stages.clone(),
        dns: None,
        egress: None,
        namebound: None,
        session: SessionStatus { agent: state.agent.clone(), tmux: None },
        filesystem: FilesystemStatus { readonly_root, tmpfs: vec![] },
        warnings: state.warnings.clone(),
    }
}

/// Exit status for health checks: 0 ready, 1 anything else cordon reported.
pub fn exit_code(doc: &StatusDoc) -> u8 {
    if doc.phase == Phase::Ready { 0 } else { 1 }
}

/// Usage of a mounted filesystem, from statvfs(2).
pub fn usage(path: &std::path::Path) -> Option<TmpfsUsage> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    let frag = st.fragment_size();
    let size = st.blocks() * frag;
    let used = size.saturating_sub(st.blocks_free() * frag);
    let pct = (used * 100).checked_div(size).unwrap_or(0) as u8;
    Some(TmpfsUsage {
        path: path.display().to_string(),
        size_bytes: size,
        used_bytes: used,
        use_pct: pct,
        warning: pct >= 80,
    })
}

fn ago(at: &str) -> String {
    humantime::parse_rfc3339_weak(at)
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .map(|d| format!("{} ago", humantime::format_duration(std::time::Duration::from_secs(d.as_secs()))))
        .unwrap_or_else(|| at.to_string())
}

fn bytes(n: u64) -> String {
    crate::config::ByteSize(n.max(1)).to_string()
}

/// One screen for a person; ANSI colour when `color`.
pub fn render_human(doc: &StatusDoc, color: bool) -> String {
    let paint = |code: &str, s: &str| if color { format!("\x1b[{code}m{s}\x1b[0m") } else { s.to_string() };
    let mut o = String::new();
    let (word, code) = match doc.phase {
        Phase::Ready => ("READY", "1;32"),
        Phase::Booting => ("BOOTING", "1;33"),
        Phase::Degraded => ("DEGRADED", "1;33"),
        Phase::Failed => ("FAILED", "1;31"),
        Phase::Stopping => ("STOPPING", "1;33"),
        Phase::Stopped => ("STOPPED", "1;31"),
    };
    let up = doc
        .uptime_s
        .map(|s| format!("up {}", humantime::format_duration(std::time::Duration::from_secs(s as u64))))
        .unwrap_or_default();
    let boot = doc.boot_ms.map(|ms| format!(", boot {ms:.0} ms")).unwrap_or_default();
    let _ = writeln!(o, "cordon {}  {up}{boot}, {} (pid {})", paint(code, word), doc.init_mode, doc.pid);
    if doc.source != "live" {
        let _ = writeln!(
            o,
            "{}",
            paint("33", "  note: cordon is not answering on its control socket; this is its last state file")
        );
    }
    if let Some(stage) = &doc.current_stage {
        let _ = writeln!(o, "  booting: stage {stage} is running");
    }
    if let Some(f) = &doc.failed {
        let _ = writeln!(o, "  failed at stage {}: {}", paint("1", &f.stage), f.error);
        if let Some(h) = &f.hint {
            let _ = writeln!(o, "  fix: {h}");
        }
    } else if let Some(r) = &doc.reason {
        let _ = writeln!(o, "  {r}");
    }
    let stages: Vec<String> = doc
        .stages
        .iter()
        .map(|s| {
            let mark = match s.outcome {
                crate::state::report::Outcome::Ok => paint("32", "ok"),
                crate::state::report::Outcome::Failed => paint("31", "FAILED"),
                crate::state::report::Outcome::Skipped => "skipped".into(),
                crate::state::report::Outcome::Stopped => paint("33", "STOPPED"),
                crate::state::report::Outcome::Running => paint("33", "..."),
            };
            match s.duration_ms {
                Some(ms) => format!("{} {mark} {ms:.0}ms", s.name),
                None => format!("{} {mark}", s.name),
            }
        })
        .collect();
    let mut line = String::from("stages:");
    for s in stages {
        if line.len() + s.len() > 78 {
            let _ = writeln!(o, "{line}");
            line = String::from("       ");
        }
        line.push(' ');
        line.push_str(&s);
    }
    let _ = writeln!(o, "{line}");
    if let Some(d) = &doc.dns {
        let health = match &d.upstream_last_error {
            None => paint("32", "no upstream errors"),
            Some(e) => paint("33", &format!("last upstream error {}: {}", ago(&e.at), e.message)),
        };
        let _ = writeln!(o, "dns:    {} -> {}; {health}", d.listen, d.upstreams.join(" "));
        let q = &d.queries;
        let _ = writeln!(
            o,
            "        {} allowed, {} denied, {} failed, {} stale, {} rebinding blocked",
            q.allowed, q.denied, q.failed, q.stale, q.rebinding_blocked
        );
        if !d.recent_denials.is_empty() {
            let _ = writeln!(o, "        recently denied (explain one: cordon status why NAME):");
            for den in d.recent_denials.iter().take(8) {
                let _ = writeln!(
                    o,
                    "          {:<40} {:<5} x{:<4} {}",
                    den.name.trim_end_matches('.'),
                    den.qtype,
                    den.count,
                    ago(&den.last)
                );
            }
        }
    }
    if let Some(e) = &doc.egress {
        let rej = |n: Option<u64>| n.map_or("?".to_string(), |n| n.to_string());
        let _ = writeln!(
            o,
            "egress: {} allowlist entries; admitted {} v4, {} v6; rejected {} v4, {} v6 packets",
            e.allowlist_entries,
            e.admitted_ipv4,
            e.admitted_ipv6,
            rej(e.rejected_ipv4),
            rej(e.rejected_ipv6)
        );
        match &e.last_refresh {
            None => {
                let _ = writeln!(o, "        no refresh yet");
            }
            Some(r) if r.failed.is_empty() => {
                let _ =
                    writeln!(o, "        last refresh {}: {} names, {} addresses", ago(&r.at), r.names, r.addresses);
            }
            Some(r) => {
                let _ = writeln!(
                    o,
                    "        last refresh {}: {} names, {} addresses; {}",
                    ago(&r.at),
                    r.names,
                    r.addresses,
                    paint(
                        "33",
                        &format!("upstream failed for {} (kept last known): {}", r.failed.len(), r.failed.join(" "))
                    )
                );
            }
        }
    } else if doc.source == "live" && doc.phase != Phase::Booting {
        let _ = writeln!(o, "egress: {}", paint("31", "not enforced"));
    }
    if let Some(n) = &doc.namebound {
        let state = match (n.enabled, n.running) {
            (false, _) => paint("33", "name binding OFF: address-based (network.name_binding)"),
            (true, false) => paint("31", "name binding NOT RUNNING: checked ports refused"),
            (true, true) => paint("32", &format!("name binding on (proxy port {})", n.proxy_port.unwrap_or(0))),
        };
        let _ = writeln!(o, "names:  {state}; {} bindings", n.bindings);
        let c = &n.connections;
        if n.enabled {
            let line = format!(
                "        {} checked, {} allowed, {} refused ({} silent, {} overload), {} unreachable",
                c.accepted, c.allowed, c.refused, c.hello_timeouts, c.overloaded, c.upstream_failures
            );
            let _ = writeln!(o, "{}", fit(&line));
        }
        if !n.recent_refusals.is_empty() {
            let _ = writeln!(o, "        recently refused (explain: cordon status why NAME|ADDRESS):");
            for r in n.recent_refusals.iter().take(8) {
                let what =
                    format!("          {} -> {} {}, {}", r.name, format_addr(&r.address, r.port), r.kind, ago(&r.at));
                let _ = writeln!(o, "{}", fit(&what));
                let _ = writeln!(o, "{}", fit(&format!("            {}", r.reason)));
            }
        }
    }
    match &doc.session.agent {
        Some(a) => {
            let running = if a.running { paint("32", "running") } else { paint("31", "not running") };
            let last = a.last_exit.map_or("none".to_string(), |c| c.to_string());
            let pid = a.pid.map_or(String::new(), |p| format!(" (pid {p})"));
            let _ = writeln!(o, "agent:  {running}{pid}; {} restarts; last exit status {last}", a.restarts);
            if let Some(i) = &a.idle {
                let span = |s: u64| humantime::format_duration(Duration::from_secs(s)).to_string();
                let left = i.stop_after_s.saturating_sub(i.idle_s);
                let _ = writeln!(
                    o,
                    "        idle {} (supervisor.idle_stop {}): stops in {} unless it becomes active",
                    span(i.idle_s),
                    span(i.stop_after_s),
                    span(left)
                );
            }
        }
        None => {
            let _ = writeln!(o, "agent:  not started");
        }
    }
    if let Some(t) = &doc.session.tmux {
        let alive = if t.alive { paint("32", "up") } else { paint("31", "DOWN") };
        let _ = writeln!(o, "tmux:   session `{}` {alive}; {} attached (cordon attach)", t.session, t.clients.len());
    }
    let ro = match doc.filesystem.readonly_root {
        Some(true) => paint("32", "root read-only (verified)"),
        Some(false) => paint("31", "root NOT read-only"),
        None => "root read-only: not verified".into(),
    };
    let _ = writeln!(o, "files:  {ro}");
    for t in &doc.filesystem.tmpfs {
        let line = format!("{} {}% of {}", t.path, t.use_pct, bytes(t.size_bytes));
        let _ = writeln!(o, "        {}", if t.warning { paint("33", &format!("{line} (nearly full)")) } else { line });
    }
    for w in &doc.warnings {
        let _ = writeln!(o, "{} {w}", paint("33", "warning:"));
    }
    o
}

/// A screen line cut to 80 columns.
fn fit(line: &str) -> String {
    if line.chars().count() <= 80 {
        line.to_string()
    } else {
        format!("{}…", line.chars().take(79).collect::<String>())
    }
}

fn format_addr(ip: &str, port: u16) -> String {
    if ip.contains(':') { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") }
}

pub fn render_why(w: &WhyDoc) -> String {
    let mut o = format!("{} {}: {}\n  {}\n", w.kind, w.target, w.verdict, w.explanation);
    for d in &w.decided_by {
        let _ = writeln!(o, "  allowlist entry: {d}");
    }
    for p in &w.ports {
        let _ = writeln!(o, "  port {p}");
    }
    if !w.bound_names.is_empty() {
        let _ = writeln!(
            o,
            "  names answered with it (name-checked connections may carry these): {}",
            w.bound_names.join(" ")
        );
    }
    for a in &w.admitted {
        let _ = writeln!(o, "  admitted {} for {} in {} until {}", a.ip, a.name.trim_end_matches('.'), a.set, a.until);
    }
    o
}

/// Answers `why` against live egress state.
pub fn why(target: &str, egress: Option<&crate::egress::Egress>) -> WhyDoc {
    let ip: Option<IpAddr> = target.trim_start_matches('[').trim_end_matches(']').parse().ok();
    let kind = if ip.is_some() { "address" } else { "name" };
    let mut doc = WhyDoc {
        target: target.into(),
        kind: kind.into(),
        verdict: String::new(),
        explanation: String::new(),
        decided_by: vec![],
        admitted: vec![],
        ports: vec![],
        bound_names: vec![],
    };
    let Some(egress) = egress else {
        doc.verdict = "not enforced".into();
        doc.explanation =
            "egress is not enforced (network.enforce = false, or the boot stopped before the DNS stage)".into();
        return doc;
    };
    let admitted = egress.admitter.admitted();
    let out = |a: &crate::egress::admission::AdmittedAddr| AdmittedStatus {
        ip: a.ip.to_string(),
        name: a.name.clone(),
        set: a.set.clone(),
        until: rfc3339(a.until),
    };
    match ip {
        Some(ip) => {
            doc.admitted = admitted.iter().filter(|a| a.ip == ip).map(out).collect();
            doc.bound_names = egress.bindings.names_for(ip, std::time::Instant::now());
            if !doc.admitted.is_empty() {
                doc.verdict = "admitted".into();
                doc.explanation = "an allowed name resolved to it; the agent may connect on the allowed ports".into();
            } else if let Some(why) = crate::egress::addrs::refusal(ip, &[]) {
                doc.verdict = "never admitted".into();
                doc.explanation = format!(
                    "{why} address: never admitted for a public name (DNS rebinding protection) unless network.allow_cidrs lists it"
                );
            } else {
                doc.verdict = "not admitted".into();
                doc.explanation =
                    "no allowed name resolved to it recently: connections from the agent are rejected".into();
            }
        }
        None => {
            let name = crate::config::allowlist::canonical(target);
            match egress.allowlist.lookup(&name) {
                Some(reach) => {
                    doc.verdict = "allowed".into();
                    doc.explanation = "the name is answered and its addresses admitted".into();
                    doc.decided_by = egress.allowlist.explain(&name);
                    doc.ports = port_rules(&reach, &egress.ports, egress.name_binding);
                }
                None => {
                    doc.verdict = "denied".into();
                    doc.explanation = "no allowlist entry matches: the name gets NXDOMAIN and is never sent upstream; add it to the allowlist (exact name, or *.parent for the names below a domain)".into();
                }
            }
            doc.admitted = admitted.iter().filter(|a| a.name.trim_end_matches('.') == name).map(out).collect();
        }
    }
    doc
}

/// How the connections of a name with `reach` are judged, port by port: name-checked (TLS SNI,
/// or the Host of every HTTP request on port 80) or address-based (`:raw` entries, or every
/// port when name binding is off). `ports` is `network.ports`.
pub fn port_rules(reach: &crate::config::allowlist::Reach, ports: &[u16], name_binding: bool) -> Vec<String> {
    let mut checked: Vec<u16> = if reach.default_ports { ports.to_vec() } else { vec![] };
    checked.extend(reach.extra_ports.iter().filter(|p| !checked.contains(p)).collect::<Vec<_>>());
    checked.sort_unstable();
    let mut out: Vec<(u16, String)> = checked
        .into_iter()
        .map(|p| {
            let rule = match (name_binding, p) {
                (false, _) => "address-based (network.name_binding = false)".to_string(),
                (true, 80) => {
                    "HTTP, name-checked: the Host of every request must be this name, answered with the address".into()
                }
                (true, _) => {
                    "TLS, name-checked: the ClientHello's SNI must be this name, answered with the address".into()
                }
            };
            (p, rule)
        })
        .collect();
    for &p in &reach.raw_ports {
        if !out.iter().any(|(q, _)| *q == p) {
            out.push((
                p,
                format!(
                    "address-based (a `:{p}:raw` entry): any connection to an admitted address passes, no name is read"
                ),
            ));
        }
    }
    out.sort_by_key(|(p, _)| *p);
    out.into_iter().map(|(p, rule)| format!("{p}: {rule}")).collect()
}

/// Where a state directory's control socket is.
pub fn socket_path(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("control.sock")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::allowlist::Reach;

    #[test]
    fn a_names_ports_say_which_are_name_checked_and_which_address_based() {
        let reach = Reach { default_ports: true, extra_ports: [8443].into(), raw_ports: [22].into() };
        let rules = port_rules(&reach, &[80, 443], true);
        let starts: Vec<&str> = rules.iter().map(|r| r.split(',').next().unwrap()).collect();
        assert_eq!(
            starts,
            [
                "22: address-based (a `:22:raw` entry): any connection to an admitted address passes",
                "80: HTTP",
                "443: TLS",
                "8443: TLS"
            ]
        );
        let off = port_rules(&reach, &[80, 443], false);
        assert!(
            off.iter().filter(|r| !r.starts_with("22:")).all(|r| r.contains("network.name_binding = false")),
            "{off:?}"
        );
        let raw_only = Reach { raw_ports: [5432].into(), ..Reach::default() };
        assert_eq!(port_rules(&raw_only, &[80, 443], true).len(), 1);
    }
}
