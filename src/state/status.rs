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

pub(crate) const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StatusDoc {
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
    /// The egress policy's mode, runtime grants, changes and observations (live only; None when
    /// egress is not enforced).
    #[serde(default)]
    pub policy: Option<PolicyStatus>,
    /// The journal of refused connections (live only; None when egress is not enforced).
    #[serde(default)]
    pub journal: Option<JournalStatus>,
    pub session: SessionStatus,
    pub filesystem: FilesystemStatus,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct FailedStage {
    pub stage: String,
    pub error: String,
    pub hint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct DnsStatus {
    pub listen: String,
    pub upstreams: Vec<String>,
    pub upstream_last_error: Option<TimedMessage>,
    pub queries: QueryCounts,
    pub recent_denials: Vec<DenialStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TimedMessage {
    pub at: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct QueryCounts {
    pub allowed: u64,
    pub denied: u64,
    pub failed: u64,
    pub stale: u64,
    pub rebinding_blocked: u64,
    /// Of those answered, queries answered at once (stale or SERVFAIL) because
    /// `LOOKUPS_IN_FLIGHT` lookups were already waiting on upstream.
    #[serde(default)]
    pub busy: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct DenialStatus {
    pub name: String,
    #[serde(rename = "type")]
    pub qtype: String,
    pub count: u64,
    pub last: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct EgressStatus {
    pub allowlist_entries: usize,
    pub admitted_ipv4: usize,
    pub admitted_ipv6: usize,
    pub last_refresh: Option<RefreshStatus>,
    /// Packets the firewall rejected, from its own counters; None if they could not be read.
    pub rejected_ipv4: Option<u64>,
    pub rejected_ipv6: Option<u64>,
}

/// The egress policy: how it is enforced, what was changed at run time and by whom, and, in
/// observe mode, what would have been refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct PolicyStatus {
    /// "enforce" or "observe" (`network.mode`; observe: egress is NOT enforced).
    pub mode: String,
    /// Entries added by `cordon allow`, in force now.
    pub grants: Vec<GrantStatus>,
    /// File entries removed by `cordon deny` until the next reload.
    pub denied: Vec<String>,
    /// The last 64 changes and refused attempts, oldest first.
    pub changes: Vec<ChangeStatus>,
    /// Observe mode: names outside the allowlist that were let through, most seen first (at
    /// most 32 here; `cordon policy suggest` has them all).
    pub observed: Vec<ObservedStatus>,
    /// Observe mode: how many distinct names were recorded, and how many lookups of names past
    /// the bound were not.
    pub observed_names: usize,
    pub observed_dropped: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct GrantStatus {
    pub entry: String,
    pub by: String,
    pub at: String,
    /// When it goes away by itself; None: until a deny or the container's end.
    pub until: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ChangeStatus {
    pub at: String,
    /// "uid 0 pid 42", "SIGHUP", "timer (grant expired)".
    pub who: String,
    /// "reload", "allow NAME for 3s", "deny NAME", "expire grant N", or the refused request.
    pub what: String,
    pub ok: bool,
    /// What it did, or why it was refused.
    pub result: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ObservedStatus {
    pub name: String,
    /// Lookups and connections.
    pub count: u64,
    pub first: String,
    pub last: String,
    /// Where it was seen: "dns", "proxy".
    pub via: Vec<String>,
    /// The uids whose DNS queries asked for it (the owner of the query's client socket), at
    /// most 8.
    #[serde(default)]
    pub uids: Vec<u32>,
}

/// The name-bound layer: the proxy's counters and its recent refusals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct NameBoundStatus {
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
pub(crate) struct NameBoundCounts {
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
pub(crate) struct RefusalStatus {
    /// The SNI or HTTP host, or "no SNI" / "no host".
    pub name: String,
    pub address: String,
    pub port: u16,
    /// "tls" or "http".
    pub kind: String,
    pub reason: String,
    pub at: String,
}

/// The journal of refused connections: per-reason counters and the kept records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct JournalStatus {
    /// The kernel's packet log is read (false: the firewall's refusals are rejected and
    /// counted, but not journalled; the name-bound layer's still are).
    pub reading: bool,
    /// One per reason, in a fixed order, zeros included.
    pub counts: Vec<JournalCount>,
    /// Times the kernel could not hand logged packets to cordon (its buffer was full).
    pub overflows: u64,
    /// Newest first, at most 256.
    pub recent: Vec<crate::egress::journal::Event>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct JournalCount {
    pub reason: String,
    /// Refusals seen since start.
    pub total: u64,
    /// Of those, not recorded because of the journal's rate limit.
    pub dropped: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RefreshStatus {
    pub at: String,
    pub names: usize,
    pub addresses: usize,
    pub changed: usize,
    pub failed: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SessionStatus {
    pub agent: Option<AgentState>,
    /// The tmux session, when the agent runs in one (live only).
    pub tmux: Option<TmuxStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TmuxStatus {
    pub session: String,
    pub socket: String,
    /// The tmux server answers and the session exists.
    pub alive: bool,
    /// Attached clients: "pid tty WIDTHxHEIGHT".
    pub clients: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct FilesystemStatus {
    /// Whether the read-only root was verified (None: not reached, or turned off).
    pub readonly_root: Option<bool>,
    pub tmpfs: Vec<TmpfsUsage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TmpfsUsage {
    pub path: String,
    pub size_bytes: u64,
    pub used_bytes: u64,
    pub use_pct: u8,
    /// At or above 80% full.
    pub warning: bool,
}

/// `cordon status why <target>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct WhyDoc {
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
    /// For an address: the journal's last refusals to it, newest first, at most 8.
    #[serde(default)]
    pub refusals: Vec<crate::egress::journal::Event>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct AdmittedStatus {
    pub ip: String,
    pub name: String,
    pub set: String,
    pub until: String,
}

pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The part of the document the state file alone gives.
pub(crate) fn from_state(state: &State, source: &str) -> StatusDoc {
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
        policy: None,
        journal: None,
        session: SessionStatus { agent: state.agent.clone(), tmux: None },
        filesystem: FilesystemStatus { readonly_root, tmpfs: vec![] },
        warnings: state.warnings.clone(),
    }
}

/// Exit status for health checks: 0 ready, 1 anything else cordon reported.
pub(crate) fn exit_code(doc: &StatusDoc) -> u8 {
    if doc.phase == Phase::Ready { 0 } else { 1 }
}

/// Usage of a mounted filesystem, from statvfs(2).
pub(crate) fn usage(path: &std::path::Path) -> Option<TmpfsUsage> {
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

/// One screen for a person; ANSI colour when `color`. One section per part of the container,
/// in the order a person asks about them: is it up, how did the boot go, DNS, egress, the
/// agent, the files.
pub(crate) fn render_human(doc: &StatusDoc, color: bool) -> String {
    let paint = Paint(color);
    let mut o = String::new();
    render_summary(&mut o, doc, paint);
    render_stages(&mut o, &doc.stages, paint);
    if let Some(d) = &doc.dns {
        render_dns(&mut o, d, paint);
    }
    match &doc.egress {
        Some(e) => render_egress(&mut o, e, paint),
        // Live and past the DNS stage without egress state: the boot turned enforcement off.
        None if doc.source == "live" && doc.phase != Phase::Booting => {
            let _ = writeln!(o, "egress: {}", paint.on("31", "not enforced"));
        }
        None => {}
    }
    if let Some(n) = &doc.namebound {
        render_namebound(&mut o, n, paint);
    }
    if let Some(p) = &doc.policy {
        render_policy(&mut o, p, paint);
    }
    if let Some(j) = &doc.journal {
        render_journal(&mut o, j, paint);
    }
    render_session(&mut o, &doc.session, paint);
    render_files(&mut o, &doc.filesystem, paint);
    for w in &doc.warnings {
        let _ = writeln!(o, "{} {w}", paint.on("33", "warning:"));
    }
    o
}

/// ANSI colour for the human rendering, or none.
#[derive(Clone, Copy)]
struct Paint(bool);

impl Paint {
    /// `s` in the SGR colour `code` (`"1;31"`: bold red) when colour is on.
    fn on(self, code: &str, s: &str) -> String {
        if self.0 { format!("\x1b[{code}m{s}\x1b[0m") } else { s.to_string() }
    }
}

/// The phase, uptime and boot time; where the document comes from; the stage running, the
/// failure and its fix, or the reason of the phase.
fn render_summary(o: &mut String, doc: &StatusDoc, paint: Paint) {
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
    let _ = writeln!(o, "cordon {}  {up}{boot}, {} (pid {})", paint.on(code, word), doc.init_mode, doc.pid);
    if doc.source != "live" {
        let note = "  note: cordon is not answering on its control socket; this is its last state file";
        let _ = writeln!(o, "{}", paint.on("33", note));
    }
    if let Some(stage) = &doc.current_stage {
        let _ = writeln!(o, "  booting: stage {stage} is running");
    }
    if let Some(f) = &doc.failed {
        let _ = writeln!(o, "  failed at stage {}: {}", paint.on("1", &f.stage), f.error);
        if let Some(h) = &f.hint {
            let _ = writeln!(o, "  fix: {h}");
        }
    } else if let Some(r) = &doc.reason {
        let _ = writeln!(o, "  {r}");
    }
}

/// Every stage with its outcome and duration, wrapped at 78 columns.
fn render_stages(o: &mut String, stages: &[StageRecord], paint: Paint) {
    use crate::state::report::Outcome;
    let mut line = String::from("stages:");
    for s in stages {
        let mark = match s.outcome {
            Outcome::Ok => paint.on("32", "ok"),
            Outcome::Failed => paint.on("31", "FAILED"),
            Outcome::Skipped => "skipped".into(),
            Outcome::Stopped => paint.on("33", "STOPPED"),
            Outcome::Running => paint.on("33", "..."),
        };
        let s = match s.duration_ms {
            Some(ms) => format!("{} {mark} {ms:.0}ms", s.name),
            None => format!("{} {mark}", s.name),
        };
        if line.len() + 1 + s.len() > 78 {
            let _ = writeln!(o, "{line}");
            line = String::from("       ");
        }
        line.push(' ');
        line.push_str(&s);
    }
    let _ = writeln!(o, "{line}");
}

/// The DNS server: where it listens, its upstreams and their health, the query counters, and
/// the last 8 names denied.
fn render_dns(o: &mut String, d: &DnsStatus, paint: Paint) {
    let health = match &d.upstream_last_error {
        None => paint.on("32", "no upstream errors"),
        Some(e) => paint.on("33", &format!("last upstream error {}: {}", ago(&e.at), e.message)),
    };
    let _ = writeln!(o, "dns:    {} -> {}; {health}", d.listen, d.upstreams.join(" "));
    let q = &d.queries;
    let _ = writeln!(
        o,
        "        {} allowed, {} denied, {} failed, {} stale, {} rebinding blocked{}",
        q.allowed,
        q.denied,
        q.failed,
        q.stale,
        q.rebinding_blocked,
        if q.busy == 0 {
            String::new()
        } else {
            paint.on("33", &format!("; {} answered at once, upstream busy", q.busy))
        }
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

/// The allowlist's size, what is admitted and rejected, and the last refresh.
fn render_egress(o: &mut String, e: &EgressStatus, paint: Paint) {
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
    let _ = match &e.last_refresh {
        None => writeln!(o, "        no refresh yet"),
        Some(r) if r.failed.is_empty() => {
            writeln!(o, "        last refresh {}: {} names, {} addresses", ago(&r.at), r.names, r.addresses)
        }
        Some(r) => {
            let failed = format!("upstream failed for {} (kept last known): {}", r.failed.len(), r.failed.join(" "));
            writeln!(
                o,
                "        last refresh {}: {} names, {} addresses; {}",
                ago(&r.at),
                r.names,
                r.addresses,
                paint.on("33", &failed)
            )
        }
    };
}

/// The policy: observe mode said plainly, the grants, the last changes, the top observations.
fn render_policy(o: &mut String, p: &PolicyStatus, paint: Paint) {
    let mode = if p.mode == "observe" {
        paint.on("1;31", "OBSERVE MODE: egress is NOT enforced (names outside the allowlist are let through)")
    } else {
        paint.on("32", "enforced")
    };
    let _ = writeln!(o, "policy: {mode}; {} runtime grant(s), {} denied until reload", p.grants.len(), p.denied.len());
    for g in &p.grants {
        let until = g.until.as_deref().map(|u| format!(" until {u}")).unwrap_or_default();
        let _ = writeln!(o, "          allow {} (by {}{until})", g.entry, g.by);
    }
    if !p.changes.is_empty() {
        let _ = writeln!(o, "        recent changes:");
        for c in p.changes.iter().rev().take(5) {
            let mark = if c.ok { paint.on("32", "ok") } else { paint.on("31", "refused") };
            let _ = writeln!(o, "          {} {} by {}: {mark} {}", ago(&c.at), c.what, c.who, c.result);
        }
    }
    if p.mode == "observe" {
        let _ =
            writeln!(o, "        {} name(s) observed (cordon policy suggest prints an allowlist):", p.observed_names);
        for n in p.observed.iter().take(8) {
            let uids: Vec<String> = n.uids.iter().map(|u| format!("uid {u}")).collect();
            let by = if uids.is_empty() { String::new() } else { format!(" by {}", uids.join(", ")) };
            let _ = writeln!(o, "          {:<40} x{:<4} {}{by}", n.name, n.count, ago(&n.last));
        }
    }
}

/// The name-bound layer: whether it runs, its counters, the newest refusals.
fn render_namebound(o: &mut String, n: &NameBoundStatus, paint: Paint) {
    let state = match (n.enabled, n.running) {
        (false, _) => paint.on("33", "name binding OFF: address-based (network.name_binding)"),
        (true, false) => paint.on("31", "name binding NOT RUNNING: checked ports refused"),
        (true, true) => paint.on("32", &format!("name binding on (proxy port {})", n.proxy_port.unwrap_or(0))),
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

/// The journal: refusals by reason (with what the rate limit dropped), then the 8 newest.
fn render_journal(o: &mut String, j: &JournalStatus, paint: Paint) {
    let seen: Vec<String> = j
        .counts
        .iter()
        .filter(|c| c.total > 0)
        .map(|c| {
            if c.dropped > 0 {
                format!("{} {} ({} unrecorded)", c.total, c.reason, c.dropped)
            } else {
                format!("{} {}", c.total, c.reason)
            }
        })
        .collect();
    let summary = if seen.is_empty() { "none".to_string() } else { seen.join(", ") };
    let _ = writeln!(o, "{}", fit(&format!("refused: {summary}")));
    if !j.reading {
        let _ = writeln!(
            o,
            "        {}",
            paint.on("33", "packet log not read: the firewall's refusals are not journalled")
        );
    }
    if j.overflows > 0 {
        let _ =
            writeln!(o, "        {}", paint.on("33", &format!("{} kernel log overflows (packets lost)", j.overflows)));
    }
    for e in j.recent.iter().take(8) {
        let uid = e.uid.map_or("uid ?".to_string(), |u| format!("uid {u}"));
        let to = match e.port {
            Some(p) => format_addr(&e.address, p),
            None => e.address.clone(),
        };
        let name = match (&e.sent_name, e.names.first()) {
            (Some(sent), _) => format!(" \"{sent}\""),
            (None, Some(bound)) => format!(" ({bound})"),
            (None, None) => String::new(),
        };
        let line = format!("          {} {uid} {} {to}{name} {}", e.reason, e.protocol, ago(&e.at));
        let _ = writeln!(o, "{}", fit(&line));
    }
}

/// The agent (running, restarts, last exit status) and its tmux session.
fn render_session(o: &mut String, session: &SessionStatus, paint: Paint) {
    match &session.agent {
        Some(a) => {
            let running = if a.running { paint.on("32", "running") } else { paint.on("31", "not running") };
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
    if let Some(t) = &session.tmux {
        let alive = if t.alive { paint.on("32", "up") } else { paint.on("31", "DOWN") };
        let _ = writeln!(o, "tmux:   session `{}` {alive}; {} attached (cordon attach)", t.session, t.clients.len());
    }
}

/// The read-only root and how full each tmpfs is.
fn render_files(o: &mut String, fs: &FilesystemStatus, paint: Paint) {
    let ro = match fs.readonly_root {
        Some(true) => paint.on("32", "root read-only (verified)"),
        Some(false) => paint.on("31", "root NOT read-only"),
        None => "root read-only: not verified".into(),
    };
    let _ = writeln!(o, "files:  {ro}");
    for t in &fs.tmpfs {
        let line = format!("{} {}% of {}", t.path, t.use_pct, bytes(t.size_bytes));
        let _ =
            writeln!(o, "        {}", if t.warning { paint.on("33", &format!("{line} (nearly full)")) } else { line });
    }
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

pub(crate) fn render_why(w: &WhyDoc) -> String {
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
    if !w.refusals.is_empty() {
        let _ = writeln!(o, "  last refused connections to it:");
    }
    for e in &w.refusals {
        let port = e.port.map_or(String::new(), |p| format!(" port {p}"));
        let uid = e.uid.map_or("uid ?".to_string(), |u| format!("uid {u}"));
        let sent = e.sent_name.as_ref().map_or(String::new(), |n| format!(" name \"{n}\""));
        let _ = writeln!(o, "    {} {}: {} {}{port}{sent}", e.at, e.reason, uid, e.protocol);
    }
    o
}

/// Answers `why` against live egress state.
pub(crate) fn why(target: &str, egress: Option<&crate::egress::Egress>) -> WhyDoc {
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
        refusals: vec![],
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
            doc.refusals = egress.journal.recent_to(ip).into_iter().take(8).collect();
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
            match egress.policy.allowlist().lookup(&name) {
                Some(reach) => {
                    doc.verdict = "allowed".into();
                    doc.explanation = "the name is answered and its addresses admitted".into();
                    doc.decided_by = egress.policy.allowlist().explain(&name);
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
pub(crate) fn port_rules(reach: &crate::config::allowlist::Reach, ports: &[u16], name_binding: bool) -> Vec<String> {
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
pub(crate) fn socket_path(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("control.sock")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::allowlist::Reach;
    use crate::state::report::Outcome;

    fn stage(name: &str, outcome: Outcome, ms: Option<f64>) -> StageRecord {
        StageRecord {
            name: name.into(),
            started_at: "then".into(),
            duration_ms: ms,
            outcome,
            detail: None,
            error: None,
            hint: None,
        }
    }

    /// A live, ready container with every section filled. Times are not RFC 3339, so they
    /// render as given rather than as "N ago" (which depends on the clock).
    fn ready_doc() -> StatusDoc {
        StatusDoc {
            version: 1,
            source: "live".into(),
            phase: Phase::Ready,
            reason: None,
            current_stage: None,
            failed: None,
            pid: 1,
            init_mode: "pid1".into(),
            started_at: "then".into(),
            uptime_s: Some(3725.0),
            boot_ms: Some(812.4),
            stages: vec![
                stage("sanity", Outcome::Ok, Some(0.2)),
                stage("config", Outcome::Ok, Some(3.0)),
                stage("readonly_root", Outcome::Skipped, None),
            ],
            dns: Some(DnsStatus {
                listen: "127.0.0.53:53".into(),
                upstreams: vec!["192.0.2.1:53".into()],
                upstream_last_error: None,
                queries: QueryCounts { allowed: 2, denied: 3, failed: 0, stale: 0, rebinding_blocked: 1, busy: 0 },
                recent_denials: vec![DenialStatus {
                    name: "evil.example.".into(),
                    qtype: "A".into(),
                    count: 3,
                    last: "just now".into(),
                }],
            }),
            namebound: None,
            policy: None,
            journal: None,
            egress: Some(EgressStatus {
                allowlist_entries: 12,
                admitted_ipv4: 4,
                admitted_ipv6: 1,
                last_refresh: None,
                rejected_ipv4: Some(7),
                rejected_ipv6: None,
            }),
            session: SessionStatus {
                agent: Some(AgentState { pid: Some(42), running: true, restarts: 0, last_exit: None, idle: None }),
                tmux: Some(TmuxStatus {
                    session: "agent".into(),
                    socket: "/run/cordon/tmux/sock".into(),
                    alive: true,
                    clients: vec!["7 /dev/pts/0 80x24".into()],
                }),
            },
            filesystem: FilesystemStatus {
                readonly_root: Some(true),
                tmpfs: vec![TmpfsUsage {
                    path: "/tmp".into(),
                    size_bytes: 512 << 20,
                    used_bytes: 460 << 20,
                    use_pct: 89,
                    warning: true,
                }],
            },
            warnings: vec!["something to look at".into()],
        }
    }

    #[test]
    fn a_ready_container_renders_as_one_screen_section_by_section() {
        assert_eq!(
            render_human(&ready_doc(), false),
            "\
cordon READY  up 1h 2m 5s, boot 812 ms, pid1 (pid 1)
stages: sanity ok 0ms config ok 3ms readonly_root skipped
dns:    127.0.0.53:53 -> 192.0.2.1:53; no upstream errors
        2 allowed, 3 denied, 0 failed, 0 stale, 1 rebinding blocked
        recently denied (explain one: cordon status why NAME):
          evil.example                             A     x3    just now
egress: 12 allowlist entries; admitted 4 v4, 1 v6; rejected 7 v4, ? v6 packets
        no refresh yet
agent:  running (pid 42); 0 restarts; last exit status none
tmux:   session `agent` up; 1 attached (cordon attach)
files:  root read-only (verified)
        /tmp 89% of 512M (nearly full)
warning: something to look at
"
        );
    }

    #[test]
    fn queries_answered_at_once_because_upstream_was_busy_are_shown_only_when_there_were_some() {
        let mut doc = ready_doc();
        let dns = doc.dns.as_mut().unwrap();
        dns.queries.busy = 5;
        dns.queries.failed = 4;
        dns.queries.stale = 1;
        let screen = render_human(&doc, false);
        assert!(
            screen.contains(
                "2 allowed, 3 denied, 4 failed, 1 stale, 1 rebinding blocked; 5 answered at once, upstream busy\n"
            ),
            "{screen}"
        );
        // A status document from before the field reads as none.
        let json = serde_json::to_value(&doc.dns.as_ref().unwrap().queries).unwrap();
        let mut old = json.as_object().unwrap().clone();
        old.remove("busy");
        let read: QueryCounts = serde_json::from_value(serde_json::Value::Object(old)).unwrap();
        assert_eq!(read.busy, 0);
    }

    #[test]
    fn the_summary_of_a_failed_boot_read_from_the_state_file_names_the_stage_and_the_fix() {
        let mut doc = ready_doc();
        doc.source = "state file".into();
        doc.phase = Phase::Failed;
        doc.uptime_s = None;
        doc.boot_ms = None;
        doc.reason = Some("not shown when a stage failed".into());
        doc.failed = Some(FailedStage {
            stage: "secrets".into(),
            error: "GH_PAT is missing".into(),
            hint: Some("pass -e GH_PAT".into()),
        });
        let mut o = String::new();
        render_summary(&mut o, &doc, Paint(false));
        assert_eq!(
            o,
            "cordon FAILED  , pid1 (pid 1)\n  note: cordon is not answering on its control socket; this is its last \
             state file\n  failed at stage secrets: GH_PAT is missing\n  fix: pass -e GH_PAT\n"
        );
    }

    #[test]
    fn the_summary_of_a_boot_in_progress_names_the_running_stage_and_the_reason() {
        let mut doc = ready_doc();
        doc.phase = Phase::Booting;
        doc.current_stage = Some("clone".into());
        doc.reason = Some("waiting for the clone".into());
        let mut o = String::new();
        render_summary(&mut o, &doc, Paint(false));
        assert!(o.starts_with("cordon BOOTING  up 1h 2m 5s, boot 812 ms"), "{o}");
        assert!(o.ends_with("  booting: stage clone is running\n  waiting for the clone\n"), "{o}");
    }

    #[test]
    fn stages_wrap_at_78_columns_and_mark_every_outcome() {
        let stages: Vec<StageRecord> = [
            ("sanity", Outcome::Ok),
            ("config", Outcome::Ok),
            ("state", Outcome::Ok),
            ("secrets", Outcome::Ok),
            ("filesystem", Outcome::Ok),
            ("dns", Outcome::Failed),
            ("firewall", Outcome::Stopped),
            ("readiness", Outcome::Running),
        ]
        .into_iter()
        .map(|(name, outcome)| stage(name, outcome, Some(12.0)))
        .collect();
        let mut o = String::new();
        render_stages(&mut o, &stages, Paint(false));
        assert_eq!(
            o,
            "stages: sanity ok 12ms config ok 12ms state ok 12ms secrets ok 12ms\n        filesystem ok 12ms dns \
             FAILED 12ms firewall STOPPED 12ms\n        readiness ... 12ms\n"
        );
        assert!(o.lines().all(|l| l.len() <= 78), "{o}");
    }

    #[test]
    fn dns_shows_the_last_upstream_error_and_at_most_eight_denials() {
        let mut d = ready_doc().dns.unwrap();
        d.upstream_last_error = Some(TimedMessage { at: "a moment ago".into(), message: "timed out".into() });
        d.recent_denials = (0..10)
            .map(|i| DenialStatus {
                name: format!("n{i}.example."),
                qtype: "AAAA".into(),
                count: 1,
                last: "now".into(),
            })
            .collect();
        let mut o = String::new();
        render_dns(&mut o, &d, Paint(false));
        let lines: Vec<&str> = o.lines().collect();
        assert_eq!(lines[0], "dns:    127.0.0.53:53 -> 192.0.2.1:53; last upstream error a moment ago: timed out");
        assert_eq!(lines.len(), 3 + 8, "{o}");
        assert_eq!(lines[3].split_whitespace().collect::<Vec<_>>(), ["n0.example", "AAAA", "x1", "now"]);
    }

    #[test]
    fn egress_shows_a_refresh_that_kept_the_last_known_addresses() {
        let mut e = ready_doc().egress.unwrap();
        e.last_refresh = Some(RefreshStatus {
            at: "earlier".into(),
            names: 5,
            addresses: 9,
            changed: 1,
            failed: vec!["a.example".into(), "b.example".into()],
        });
        let mut o = String::new();
        render_egress(&mut o, &e, Paint(false));
        assert_eq!(
            o.lines().nth(1),
            Some(
                "        last refresh earlier: 5 names, 9 addresses; upstream failed for 2 (kept last known): a.example b.example"
            )
        );
    }

    #[test]
    fn egress_not_enforced_is_said_only_by_a_live_cordon_past_the_boot() {
        let mut doc = ready_doc();
        doc.egress = None;
        assert!(render_human(&doc, false).contains("\negress: not enforced\n"));
        doc.phase = Phase::Booting;
        assert!(!render_human(&doc, false).contains("egress:"));
        doc.phase = Phase::Ready;
        doc.source = "state file".into();
        assert!(!render_human(&doc, false).contains("egress:"));
    }

    #[test]
    fn the_session_shows_an_agent_not_started_or_exited_and_a_tmux_server_down() {
        let mut session = ready_doc().session;
        session.agent = None;
        session.tmux.as_mut().unwrap().alive = false;
        let mut o = String::new();
        render_session(&mut o, &session, Paint(false));
        assert_eq!(o, "agent:  not started\ntmux:   session `agent` DOWN; 1 attached (cordon attach)\n");

        session.agent = Some(AgentState { pid: None, running: false, restarts: 3, last_exit: Some(137), idle: None });
        session.tmux = None;
        let mut o = String::new();
        render_session(&mut o, &session, Paint(false));
        assert_eq!(o, "agent:  not running; 3 restarts; last exit status 137\n");
    }

    #[test]
    fn files_say_whether_the_read_only_root_was_verified() {
        let mut fs = FilesystemStatus { readonly_root: Some(false), tmpfs: vec![] };
        let mut o = String::new();
        render_files(&mut o, &fs, Paint(false));
        assert_eq!(o, "files:  root NOT read-only\n");
        fs.readonly_root = None;
        let mut o = String::new();
        render_files(&mut o, &fs, Paint(false));
        assert_eq!(o, "files:  root read-only: not verified\n");
    }

    #[test]
    fn colour_is_added_only_when_asked_for() {
        let doc = ready_doc();
        assert!(!render_human(&doc, false).contains('\x1b'));
        let coloured = render_human(&doc, true);
        assert!(coloured.starts_with("cordon \x1b[1;32mREADY\x1b[0m  up"), "{coloured}");
        assert!(coloured.contains("\x1b[33mwarning:\x1b[0m something to look at"));
    }

    fn event(reason: &str, address: &str, port: Option<u16>) -> crate::egress::journal::Event {
        crate::egress::journal::Event {
            at: "just now".into(),
            uid: Some(1000),
            protocol: if port == Some(53) { "udp".into() } else { "tcp".into() },
            address: address.into(),
            port,
            names: vec![],
            reason: reason.into(),
            sent_name: None,
            detail: None,
        }
    }

    #[test]
    fn the_journal_shows_counts_by_reason_and_the_eight_newest_refusals() {
        let mut named = event("name", "192.0.2.10", Some(443));
        named.sent_name = Some("evil.example.net".into());
        let mut port = event("port", "192.0.2.10", Some(8080));
        port.names = vec!["api.example.com".into()];
        let mut recent = vec![named, port, event("resolver", "2001:db8::53", Some(53))];
        recent.extend((0..10).map(|i| event("not-admitted", &format!("192.0.2.{i}"), Some(443))));
        let j = JournalStatus {
            reading: true,
            counts: vec![
                JournalCount { reason: "not-admitted".into(), total: 500, dropped: 400 },
                JournalCount { reason: "port".into(), total: 1, dropped: 0 },
                JournalCount { reason: "udp-icmp".into(), total: 0, dropped: 0 },
            ],
            overflows: 0,
            recent,
        };
        let mut o = String::new();
        render_journal(&mut o, &j, Paint(false));
        let lines: Vec<&str> = o.lines().collect();
        assert_eq!(lines[0], "refused: 500 not-admitted (400 unrecorded), 1 port");
        assert_eq!(lines[1], "          name uid 1000 tcp 192.0.2.10:443 \"evil.example.net\" just now");
        assert_eq!(lines[2], "          port uid 1000 tcp 192.0.2.10:8080 (api.example.com) just now");
        assert_eq!(lines[3], "          resolver uid 1000 udp [2001:db8::53]:53 just now");
        assert_eq!(lines.len(), 1 + 8, "{o}");

        let quiet = JournalStatus { reading: false, counts: vec![], overflows: 3, recent: vec![] };
        let mut o = String::new();
        render_journal(&mut o, &quiet, Paint(false));
        assert_eq!(
            o,
            "refused: none\n        packet log not read: the firewall's refusals are not journalled\n        3 kernel log overflows (packets lost)\n"
        );
    }

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
