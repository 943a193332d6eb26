//! The control socket, `<state_dir>/control.sock`: read-only, line-based requests from root and
//! the agent user (`root:<agent group>`, mode 0660). `status` answers the live status document,
//! `why <name|address>` an explanation; there is no request that changes anything, and nothing
//! secret is in any answer.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;

use crate::egress::Egress;
use crate::state::report::State;
use crate::state::status::{self, StatusDoc};

/// A request line longer than this is refused.
const MAX_REQUEST: usize = 512;
const TIMEOUT: Duration = Duration::from_secs(5);

/// What the control socket reads from: the report's state, and the parts of the boot that
/// exist once their stage has run.
pub struct Live {
    pub state: watch::Receiver<State>,
    pub egress: OnceLock<Arc<Egress>>,
    pub tmpfs: OnceLock<Vec<PathBuf>>,
    pub tmux: OnceLock<crate::session::tmux::Tmux>,
    /// The reaper's count of reaped processes, for the metrics (absent when the supervisor was
    /// started without it).
    pub reaped: OnceLock<crate::sys::ReapedCount>,
}

impl Live {
    pub fn new(state: watch::Receiver<State>) -> Arc<Live> {
        Arc::new(Live {
            state,
            egress: OnceLock::new(),
            tmpfs: OnceLock::new(),
            tmux: OnceLock::new(),
            reaped: OnceLock::new(),
        })
    }
}

/// Binds the socket (replacing a stale one), owner-only until [`grant`] widens it.
pub(crate) fn bind(state_dir: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let path = status::socket_path(state_dir);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Lets the agent's group query the socket.
pub(crate) fn grant(state_dir: &Path, gid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = status::socket_path(state_dir);
    std::os::unix::fs::chown(&path, Some(0), Some(gid))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
}

/// Serves requests on `listener` (bound by [`bind`]) until the service is stopped.
pub(crate) fn serve(listener: tokio::net::UnixListener, live: Arc<Live>) -> crate::service::Service {
    serve_connections("control", listener, live, TIMEOUT, answer)
}

/// The service `name`: every connection accepted on `listener` is answered by `answer` in a
/// task of its own, given at most `timeout`, until the service is stopped. The control and
/// admin sockets' loop.
pub(crate) fn serve_connections<F, Fut>(
    name: &'static str,
    listener: tokio::net::UnixListener,
    live: Arc<Live>,
    timeout: Duration,
    answer: F,
) -> crate::service::Service
where
    F: Fn(tokio::net::UnixStream, Arc<Live>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    crate::service::Service::spawn(name, move |mut stop| async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
                () = stop.requested() => return,
            };
            let answered = answer(stream, live.clone());
            tokio::spawn(async move {
                let _ = tokio::time::timeout(timeout, answered).await;
            });
        }
    })
}

async fn answer(stream: tokio::net::UnixStream, live: Arc<Live>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST as u64)).read_line(&mut line).await?;
    let request = line.trim();
    let reply = match request.split_once(' ').map_or((request, ""), |(a, b)| (a, b.trim())) {
        ("status", "") => serde_json::to_string(&live_status(&live).await),
        ("why", target) if !target.is_empty() => serde_json::to_string(&status::why(target, live.egress.get().map(|e| &**e))),
        _ => Ok(serde_json::json!({ "error": "unknown request; this socket answers `status` and `why <name|address>` only" }).to_string()),
    }
    .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string());
    write.write_all(reply.as_bytes()).await?;
    write.write_all(b"\n").await?;
    write.shutdown().await
}

async fn live_status(live: &Live) -> StatusDoc {
    let state = live.state.borrow().clone();
    let mut doc = status::from_state(&state, "live");
    if let Some(egress) = live.egress.get() {
        doc.dns = Some(dns_status(egress));
        doc.egress = Some(egress_status(egress).await);
        doc.namebound = Some(namebound_status(egress));
        doc.policy = Some(policy_status(egress));
        doc.journal = Some(journal_status(egress));
    }
    doc.filesystem.tmpfs = live.tmpfs.get().into_iter().flatten().filter_map(|p| status::usage(p)).collect();
    if let Some(tmux) = live.tmux.get().cloned() {
        doc.session.tmux = tokio::task::spawn_blocking(move || status::TmuxStatus {
            session: tmux.session.clone(),
            socket: tmux.socket.display().to_string(),
            alive: tmux.has_session(),
            clients: tmux.clients(),
        })
        .await
        .ok();
    }
    doc
}

fn dns_status(egress: &Egress) -> status::DnsStatus {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &egress.stats;
    let last = s.last_upstream_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
    status::DnsStatus {
        listen: egress.listen.to_string(),
        upstreams: egress.upstreams.iter().map(ToString::to_string).collect(),
        upstream_last_error: last.map(|(at, message)| status::TimedMessage { at: status::rfc3339(at), message }),
        queries: status::QueryCounts {
            allowed: s.allowed.load(Relaxed),
            denied: s.denied.load(Relaxed),
            failed: s.failed.load(Relaxed),
            stale: s.stale.load(Relaxed),
            rebinding_blocked: s.rebinding_blocked.load(Relaxed),
            busy: s.busy.load(Relaxed),
        },
        recent_denials: s
            .recent_denials()
            .into_iter()
            .take(32)
            .map(|d| status::DenialStatus {
                name: d.name,
                qtype: d.qtype,
                count: d.count,
                last: status::rfc3339(d.last),
            })
            .collect(),
    }
}

fn policy_status(egress: &Egress) -> status::PolicyStatus {
    let policy = &egress.policy;
    let entries = policy.entries().clone();
    let (mut observed, dropped) = policy.observed();
    observed.sort_by(|a, b| b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(&b.0)));
    status::PolicyStatus {
        mode: match policy.mode() {
            crate::config::Mode::Enforce => "enforce".into(),
            crate::config::Mode::Observe => "observe".into(),
        },
        grants: entries
            .grants
            .iter()
            .map(|g| status::GrantStatus {
                entry: g.entry.to_string(),
                by: g.by.clone(),
                at: status::rfc3339(g.at),
                until: g.until.map(|(_, wall)| status::rfc3339(wall)),
            })
            .collect(),
        denied: entries.denied.iter().map(ToString::to_string).collect(),
        changes: policy
            .changes()
            .into_iter()
            .map(|c| status::ChangeStatus {
                at: status::rfc3339(c.at),
                who: c.who,
                what: c.what,
                ok: c.ok,
                result: c.result,
            })
            .collect(),
        observed_names: observed.len(),
        observed_dropped: dropped,
        observed: observed
            .into_iter()
            .take(32)
            .map(|(name, o)| status::ObservedStatus {
                name,
                count: o.count,
                first: status::rfc3339(o.first),
                last: status::rfc3339(o.last),
                via: o.via.iter().map(|v| v.to_string()).collect(),
                uids: o.uids.iter().copied().collect(),
            })
            .collect(),
    }
}

fn journal_status(egress: &Egress) -> status::JournalStatus {
    let counts = egress.journal.counts();
    status::JournalStatus {
        reading: egress.journal_reading.load(std::sync::atomic::Ordering::Relaxed),
        counts: counts
            .by_reason
            .iter()
            .map(|(reason, c)| status::JournalCount {
                reason: reason.as_str().into(),
                total: c.total,
                dropped: c.dropped,
            })
            .collect(),
        overflows: counts.overflows,
        recent: egress.journal.recent(),
    }
}

fn namebound_status(egress: &Egress) -> status::NameBoundStatus {
    let proxy = egress.proxy.get();
    let counts = proxy.map(|p| p.stats.counts()).unwrap_or_default();
    let recent = proxy.map(|p| p.stats.recent_refusals()).unwrap_or_default();
    status::NameBoundStatus {
        enabled: egress.name_binding,
        running: proxy.is_some() && egress.proxy_serving.load(std::sync::atomic::Ordering::Relaxed),
        proxy_port: egress.proxy_port,
        bindings: egress.bindings.len(),
        connections: status::NameBoundCounts {
            accepted: counts.accepted,
            allowed: counts.allowed,
            refused: counts.refused,
            hello_timeouts: counts.hello_timeouts,
            overloaded: counts.overloaded,
            upstream_failures: counts.upstream_failures,
        },
        recent_refusals: recent
            .iter()
            .rev()
            .take(32)
            .map(|r| status::RefusalStatus {
                name: r.shown_name().to_string(),
                address: r.dst.ip().to_canonical().to_string(),
                port: r.dst.port(),
                kind: r.kind.to_string(),
                reason: r.reason.to_string(),
                at: status::rfc3339(r.at),
            })
            .collect(),
    }
}

async fn egress_status(egress: &Egress) -> status::EgressStatus {
    use crate::egress::firewall::{Family, counters};
    let admitted = egress.admitter.admitted();
    let mut v4 = std::collections::BTreeSet::new();
    let mut v6 = std::collections::BTreeSet::new();
    for a in &admitted {
        if a.ip.is_ipv4() {
            v4.insert(a.ip)
        } else {
            v6.insert(a.ip)
        };
    }
    let rejected = |family| {
        counters(family, &crate::sys::effects::Host)
            .ok()
            .map(|rules| rules.iter().filter(|(_, r)| r.starts_with("CORDON_REFUSE_")).map(|(n, _)| n).sum())
    };
    let (r4, r6) =
        tokio::task::spawn_blocking(move || (rejected(Family::V4), rejected(Family::V6))).await.unwrap_or((None, None));
    let last = egress.last_refresh.lock().unwrap_or_else(|e| e.into_inner()).clone();
    status::EgressStatus {
        allowlist_entries: egress.policy.allowlist().len(),
        admitted_ipv4: v4.len(),
        admitted_ipv6: v6.len(),
        last_refresh: last.map(|r| status::RefreshStatus {
            at: status::rfc3339(r.at),
            names: r.names,
            addresses: r.addresses,
            changed: r.changed,
            failed: r.failed,
        }),
        rejected_ipv4: r4,
        rejected_ipv6: r6,
    }
}

/// Sends one request to a running cordon and returns its JSON answer.
pub(crate) fn request(state_dir: &Path, line: &str) -> std::io::Result<String> {
    let mut stream = std::os::unix::net::UnixStream::connect(status::socket_path(state_dir))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    stream.write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut stream, &mut reply)?;
    Ok(reply)
}
