//! Live policy changes: `cordon reload`, `allow`, `deny` (root only, through the admin socket
//! in `state::admin`), SIGHUP, and the expiry of a timed grant.
//!
//! A change is planned whole under the policy's entries lock (so changes never interleave),
//! checked, and then put in force with one swap of the allowlist. Widening needs nothing more:
//! established connections are untouched. Narrowing then, in this order, (1) removes from the
//! kernel's sets every admitted address that no name still allowed justifies (a name bound to
//! it by a DNS answer, or the name that admitted it), (2) kills the established connections to
//! those addresses (their sockets, through the kernel's socket-destroy, `ss -K`, and their
//! conntrack entries), and (3) forgets the removed names' bindings, so the name-bound layer
//! refuses them even where an address stays admitted for another name.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::config::allowlist::{Allowlist, DomainPattern, Entry, Reach};
use crate::egress::Egress;
use crate::egress::admission::SetOf;
use crate::egress::policy::{Change, Entries, Grant};

/// What an operator (or a signal, or a timer) asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Read the allowlist file and `network.allow` again; the runtime grants stay.
    Reload,
    /// Add an entry, for a while if `for_` says so.
    Allow { entry: Entry, for_: Option<Duration> },
    /// Remove every entry (file or grant, any port) with this pattern.
    Deny { pattern: DomainPattern },
    /// A timed grant ran out (its id).
    Expire { id: u64 },
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Op::Reload => f.write_str("reload"),
            Op::Allow { entry, for_: Some(d) } => write!(f, "allow {entry} for {}", humantime::format_duration(*d)),
            Op::Allow { entry, for_: None } => write!(f, "allow {entry}"),
            Op::Deny { pattern } => write!(f, "deny {pattern}"),
            Op::Expire { id } => write!(f, "expire grant {id}"),
        }
    }
}

/// What a reload read: the entries with their origins, or every problem (file and line).
pub type Loaded = Result<Vec<(Entry, String)>, Vec<String>>;

/// The entries after `op`, or why it is refused. Pure: the caller puts them in force.
/// `loaded` is what a reload read (only `Reload` uses it).
pub fn plan(current: &Entries, op: &Op, who: &str, loaded: Option<Loaded>) -> Result<Entries, String> {
    let mut next = current.clone();
    match op {
        Op::Reload => match loaded {
            Some(Ok(entries)) => {
                next.base = entries;
                // The file is the truth again: a deny of a file entry lasts until the next reload.
                next.denied.clear();
            }
            Some(Err(problems)) => return Err(format!("the allowlist has problems: {}", problems.join("; "))),
            None => return Err("nothing was read".into()),
        },
        Op::Allow { entry, for_ } => {
            next.grants.retain(|g| g.entry != *entry);
            next.next_id += 1;
            let until = for_.map(|d| (Instant::now() + d, SystemTime::now() + d));
            next.grants.push(Grant {
                id: next.next_id,
                entry: entry.clone(),
                at: SystemTime::now(),
                until,
                by: who.into(),
            });
            next.denied.remove(&entry.pattern);
        }
        Op::Deny { pattern } => {
            let in_base = next.base.iter().any(|(e, _)| e.pattern == *pattern) && !next.denied.contains(pattern);
            let granted = next.grants.iter().any(|g| g.entry.pattern == *pattern);
            if !in_base && !granted {
                let covering = Allowlist::new(current.compose()).explain(&pattern.to_string());
                return Err(if covering.is_empty() {
                    format!("`{pattern}` is not an entry of the policy in force: nothing to deny")
                } else {
                    format!(
                        "`{pattern}` is not an entry of the policy in force, but is allowed by {}: deny that entry instead",
                        covering.join(", ")
                    )
                });
            }
            next.grants.retain(|g| g.entry.pattern != *pattern);
            if in_base {
                next.denied.insert(pattern.clone());
            }
        }
        Op::Expire { id } => {
            if !next.grants.iter().any(|g| g.id == *id) {
                return Err(format!("grant {id} is no longer in force (denied or replaced)"));
            }
            next.grants.retain(|g| g.id != *id);
        }
    }
    Ok(next)
}

/// The ports of `have` and `need`, sorted, each once: a live change only ever adds port rules.
pub fn union(have: &[u16], need: BTreeSet<u16>) -> Vec<u16> {
    let mut all: BTreeSet<u16> = need;
    all.extend(have);
    all.into_iter().collect()
}

/// Whether `reach` lets an address into `set`.
pub fn reaches(reach: &Reach, set: SetOf) -> bool {
    match set {
        SetOf::Default => reach.default_ports,
        SetOf::Port(p) => reach.extra_ports.contains(&p),
        SetOf::Raw(p) => reach.raw_ports.contains(&p),
    }
}

/// Who made a change, as recorded.
pub fn who_peer(uid: u32, pid: Option<i32>) -> String {
    match pid {
        Some(pid) => format!("uid {uid} pid {pid}"),
        None => format!("uid {uid}"),
    }
}

impl Egress {
    /// Makes the change `op` asked by `who`, atomically, recording it (status and the log) either
    /// way. Ok: what it did; Err: why it was refused, the policy unchanged. Blocking (kernel
    /// calls, `ss`): call it off the async workers.
    pub fn change(self: &Arc<Self>, op: Op, who: &str) -> Result<String, String> {
        let result = self.change_inner(&op, who);
        let (ok, text) = match &result {
            Ok(t) => (true, t.clone()),
            Err(e) => (false, e.clone()),
        };
        if ok {
            tracing::info!(who, what = %op, result = %text, "egress policy changed");
        } else {
            tracing::warn!(who, what = %op, reason = %text, "egress policy change refused");
        }
        self.policy.record(Change { at: SystemTime::now(), who: who.into(), what: op.to_string(), ok, result: text });
        result
    }

    fn change_inner(self: &Arc<Self>, op: &Op, who: &str) -> Result<String, String> {
        let mut entries = self.policy.entries();
        let loaded = matches!(op, Op::Reload).then(|| self.policy.load());
        let next = plan(&entries, op, who, loaded)?;
        let allowlist = Allowlist::new(next.compose());
        // Per-entry ports the rules lack: their sets and rules first, so the new entries work the
        // moment they are in force. Ports no longer needed keep their (then empty) rules.
        let mut widened = String::new();
        let mut firewall = self.firewall.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((plan, timeout)) = firewall.as_mut() {
            let mut wider = plan.clone();
            wider.extra_ports = union(&plan.extra_ports, allowlist.extra_ports());
            wider.raw_ports = union(&plan.raw_ports, allowlist.raw_ports());
            if wider != *plan {
                crate::egress::firewall::widen(&wider, *timeout, &crate::sys::effects::Host)
                    .map_err(|e| format!("cannot add the firewall rules for the new per-entry ports: {e}"))?;
                let ports = |v: &[u16], old: &[u16], raw: &str| {
                    v.iter().filter(|p| !old.contains(p)).map(|p| format!("{p}{raw}")).collect::<Vec<_>>()
                };
                let mut added = ports(&wider.extra_ports, &plan.extra_ports, "");
                added.extend(ports(&wider.raw_ports, &plan.raw_ports, ":raw"));
                widened = format!("; firewall rules added for port(s) {}", added.join(", "));
                *plan = wider;
            }
        }
        drop(firewall);
        let size = allowlist.len();
        // No admission runs from the swap to the end of the revocation (see `Policy::gate`).
        let gate = self.policy.change_gate();
        let old = self.policy.replace(allowlist);
        let new = self.policy.allowlist();
        let narrowed = self.narrow(&old, &new, gate);
        // A timed grant: its expiry, as a task that makes an `Expire` change.
        if let Op::Allow { for_: Some(d), .. } = op
            && let Some(grant) = next.grants.last()
        {
            let (egress, id, d) = (self.clone(), grant.id, *d);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    tokio::time::sleep(d).await;
                    // A grant denied or replaced meanwhile is gone already: nothing to record.
                    let _ = tokio::task::spawn_blocking(move || {
                        if egress.policy.entries().grants.iter().any(|g| g.id == id) {
                            let _ = egress.change(Op::Expire { id }, "timer (grant expired)");
                        }
                    })
                    .await;
                });
            }
        }
        *entries = next;
        Ok(format!("{size} entries in force{widened}{narrowed}"))
    }

    /// Takes away what `old` allowed and `new` does not; returns a note for the record. `gate`
    /// (the change side of the policy's gate) is released once the addresses and bindings are
    /// gone, before the slower killing of connections: an admission after that sees `new`.
    fn narrow(&self, old: &Allowlist, new: &Allowlist, gate: std::sync::RwLockWriteGuard<'_, ()>) -> String {
        let now = Instant::now();
        let justified = |ip: IpAddr, admitted_by: &str, set: SetOf| {
            let names = self.bindings.names_for(ip, now);
            std::iter::once(admitted_by)
                .chain(names.iter().map(String::as_str))
                .any(|n| new.lookup(n).or_else(|| self.policy.observe_quiet(n)).is_some_and(|r| reaches(&r, set)))
        };
        let revoked = match self.admitter.revoke(justified) {
            Ok(ips) => ips,
            Err(e) => {
                tracing::error!("a narrowing change cannot remove addresses from the allow sets: {e}");
                return format!("; ERROR: cannot remove addresses from the allow sets: {e}");
            }
        };
        let forgotten = self.bindings.forget(|n| new.lookup(n).is_some() || old.lookup(n).is_none());
        self.last_good.lock().unwrap_or_else(|e| e.into_inner()).retain(|n, _| new.is_exact(n));
        drop(gate);
        let killed = kill_connections(&revoked);
        if revoked.is_empty() && forgotten == 0 {
            return String::new();
        }
        let ips: Vec<String> = revoked.iter().map(ToString::to_string).collect();
        format!(
            "; {} address(es) removed{}{}, {forgotten} name binding(s) forgotten{killed}",
            revoked.len(),
            if ips.is_empty() { "" } else { ": " },
            ips.join(" ")
        )
    }
}

/// Kills the established connections to `ips`: every socket in this network namespace whose
/// destination is one of them is destroyed (`ss -K`, the kernel's SOCK_DESTROY: the agent's
/// socket fails with ECONNABORTED and the peer gets a reset), then their conntrack entries are
/// deleted. Returns a note for the record when something failed.
fn kill_connections(ips: &[IpAddr]) -> String {
    if ips.is_empty() {
        return String::new();
    }
    let mut problems = Vec::new();
    for ip in ips {
        let mut cmd = std::process::Command::new("ss");
        // ss reads what follows an address's last colon as a port: an IPv6 address goes in
        // brackets, or `2001:db8::1` would mean address 2001:db8: port 1.
        let dst = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        cmd.args(["-K", "-n", "dst", &dst]);
        match crate::sys::command::output(cmd, crate::sys::command::Options::new(Duration::from_secs(2))) {
            Ok(out) if out.status.success() => {}
            Ok(out) => problems.push(format!("ss -K dst {ip}: {}", String::from_utf8_lossy(&out.stderr).trim())),
            Err(e) => problems.push(format!("ss -K dst {ip}: {e}")),
        }
        if let Err(e) = crate::egress::conntrack::delete_by_destination(*ip) {
            problems.push(format!("conntrack delete dst {ip}: {e}"));
        }
    }
    if problems.is_empty() {
        String::new()
    } else {
        tracing::error!(problems = problems.join("; "), "cannot kill every connection to the removed addresses");
        format!("; ERROR killing connections: {}", problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(text: &str) -> Entries {
        Entries {
            base: crate::config::allowlist::parse_file(text, std::path::Path::new("d")).unwrap(),
            ..Entries::default()
        }
    }

    fn names(e: &Entries) -> Vec<String> {
        e.compose().iter().map(|(e, _)| e.to_string()).collect()
    }

    fn allow(text: &str, for_: Option<Duration>) -> Op {
        Op::Allow { entry: Entry::parse(text).unwrap(), for_ }
    }

    fn deny(text: &str) -> Op {
        Op::Deny { pattern: DomainPattern::parse(text).unwrap() }
    }

    #[test]
    fn allow_adds_a_grant_and_allowing_again_replaces_it() {
        let e = entries("a.example.com\n");
        let e = plan(&e, &allow("b.example.com", None), "uid 0", None).unwrap();
        let e = plan(&e, &allow("b.example.com", Some(Duration::from_secs(3))), "uid 0", None).unwrap();
        assert_eq!(names(&e), ["a.example.com", "b.example.com"]);
        assert_eq!(e.grants.len(), 1);
        assert!(e.grants[0].until.is_some());
    }

    #[test]
    fn deny_removes_file_entries_and_grants_of_any_port_until_the_next_reload() {
        let e = entries("a.example.com\na.example.com:8443\nb.example.com\n");
        let e = plan(&e, &allow("a.example.com:22:raw", None), "uid 0", None).unwrap();
        let denied = plan(&e, &deny("a.example.com"), "uid 0", None).unwrap();
        assert_eq!(names(&denied), ["b.example.com"]);
        let reloaded = plan(&denied, &Op::Reload, "SIGHUP", Some(Ok(e.base.clone()))).unwrap();
        assert_eq!(names(&reloaded), ["a.example.com", "a.example.com:8443", "b.example.com"]);
    }

    #[test]
    fn deny_of_a_name_that_is_no_entry_is_refused_and_names_the_covering_wildcard() {
        let e = entries("*.example.com\n");
        let err = plan(&e, &deny("x.example.com"), "uid 0", None).unwrap_err();
        assert!(err.contains("allowed by *.example.com (d:1)"), "{err}");
        let err = plan(&e, &deny("other.example.net"), "uid 0", None).unwrap_err();
        assert!(err.contains("nothing to deny"), "{err}");
        let twice = plan(&entries("a.example.com\n"), &deny("a.example.com"), "uid 0", None).unwrap();
        assert!(plan(&twice, &deny("a.example.com"), "uid 0", None).is_err(), "already denied");
    }

    #[test]
    fn a_bad_reload_is_refused_with_its_problems_and_keeps_the_runtime_grants_otherwise() {
        let e = plan(&entries("a.example.com\n"), &allow("g.example.com", None), "uid 0", None).unwrap();
        let err = plan(&e, &Op::Reload, "uid 0", Some(Err(vec!["d:3: `*`: bad".into()]))).unwrap_err();
        assert!(err.contains("d:3: `*`: bad"), "{err}");
        let new = crate::config::allowlist::parse_file("n.example.com\n", std::path::Path::new("d")).unwrap();
        let e = plan(&e, &Op::Reload, "uid 0", Some(Ok(new))).unwrap();
        assert_eq!(names(&e), ["n.example.com", "g.example.com"]);
    }

    #[test]
    fn an_expired_grant_goes_and_a_stale_expiry_is_refused() {
        let e = plan(&entries(""), &allow("g.example.com", Some(Duration::from_secs(3))), "uid 0", None).unwrap();
        let id = e.grants[0].id;
        let gone = plan(&e, &Op::Expire { id }, "timer", None).unwrap();
        assert!(names(&gone).is_empty());
        assert!(plan(&gone, &Op::Expire { id }, "timer", None).is_err());
    }

    #[test]
    fn port_rules_are_only_ever_added() {
        assert_eq!(union(&[8443, 22], BTreeSet::from([9000, 8443])), [22, 8443, 9000]);
        assert_eq!(union(&[8443], BTreeSet::new()), [8443], "a port no longer needed keeps its rules");
    }
}
