//! The admin socket, `<state_dir>/admin.sock`: the requests that change the egress policy
//! (`reload`, `allow`, `deny`) and `suggest`, for root only. Two locks: the socket is
//! `root:root` mode 0600, so no other uid can connect; and every connection's peer credentials
//! (SO_PEERCRED) are checked again, uid 0 or refused, so a socket handed to another process or
//! a mode changed by mistake still lets nothing through, and nothing such a peer sends is read.
//! A refused attempt is recorded like a change. The read-only control socket (`control`) is the agent's; this one never is.
//!
//! One request line, one JSON answer: `{"ok": bool, "message": "..."}`, and `text` for
//! `suggest`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::config::allowlist::{DomainPattern, Entry};
use crate::egress::change::{Op, who_peer};
use crate::egress::policy::Change;
use crate::state::control::Live;

const MAX_REQUEST: usize = 512;
/// The longest runtime grant, `allow --for`: a year, well inside what the expiry's clock can
/// add to now (a huge duration would overflow it); longer is meant to be a file entry.
pub const MAX_GRANT: Duration = Duration::from_secs(365 * 24 * 3600);

/// Checks a grant's duration: above 0 and at most [`MAX_GRANT`].
pub fn grant_duration(d: Duration) -> Result<Duration, String> {
    if d.is_zero() {
        return Err("the duration must be above 0".into());
    }
    if d > MAX_GRANT {
        return Err(format!(
            "{} is longer than a grant may last (365 days); for longer, add the entry to the allowlist file \
             and `cordon reload`",
            humantime::format_duration(d)
        ));
    }
    Ok(d)
}
/// A change may wait on the kernel and on `ss`; bounded all the same.
const TIMEOUT: Duration = Duration::from_secs(20);

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("admin.sock")
}

/// Binds the socket (replacing a stale one), root only.
pub(crate) fn bind(state_dir: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(state_dir);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::os::unix::fs::chown(&path, Some(0), Some(0))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves requests on `listener` until the service is stopped.
pub(crate) fn serve(listener: tokio::net::UnixListener, live: Arc<Live>) -> crate::service::Service {
    crate::state::control::serve_connections("admin", listener, live, TIMEOUT, answer)
}

/// A request, parsed: a change, or `suggest`.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Change(Op),
    Suggest,
}

/// Parses one request line: `reload`, `allow ENTRY [SECONDS]`, `deny PATTERN`, `suggest`.
pub fn parse(line: &str) -> Result<Request, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["reload"] => Ok(Request::Change(Op::Reload)),
        ["suggest"] => Ok(Request::Suggest),
        ["allow", entry] | ["allow", entry, _] => {
            let entry = Entry::parse(entry)?;
            let for_ = match words.get(2) {
                Some(secs) => match secs.parse::<u64>() {
                    Ok(s) => {
                        Some(grant_duration(Duration::from_secs(s)).map_err(|e| format!("`{secs}` seconds: {e}"))?)
                    }
                    _ => return Err(format!("`{secs}`: the duration must be a whole number of seconds above 0")),
                },
                None => None,
            };
            Ok(Request::Change(Op::Allow { entry, for_ }))
        }
        ["deny", pattern] => Ok(Request::Change(Op::Deny { pattern: DomainPattern::parse(pattern)? })),
        _ => {
            Err("unknown request; this socket answers `reload`, `allow ENTRY [SECONDS]`, `deny PATTERN`, `suggest`"
                .into())
        }
    }
}

async fn answer(stream: tokio::net::UnixStream, live: Arc<Live>) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let who = who_peer(cred.uid(), cred.pid());
    let (read, mut write) = stream.into_split();
    let egress = live.egress.get().cloned();
    let refused = cred.uid() != 0;
    let mut unread = None;
    let reply = if refused {
        // Refused on the credentials alone: nothing another uid sends is parsed or logged, so
        // the attempt costs root no more than the peer's uid and pid. What it sent is drained
        // unseen after the answer (below): a socket closed with unread data resets the
        // connection, and the peer could lose the answer.
        unread = Some(read);
        let message = format!("permission denied: only root may change the egress policy ({who} asked)");
        if let Some(egress) = &egress {
            tracing::warn!(who, "refused a policy request from a uid other than root (not read)");
            let what = "(a request, not read)".into();
            egress.policy.record(Change { at: SystemTime::now(), who, what, ok: false, result: message.clone() });
        }
        serde_json::json!({ "ok": false, "permission_denied": true, "message": message })
    } else {
        let mut line = String::new();
        BufReader::new(read.take(MAX_REQUEST as u64)).read_line(&mut line).await?;
        let request = line.trim().to_string();
        match (egress, parse(&request)) {
            (None, _) => {
                serde_json::json!({ "ok": false, "message": "egress is not enforced here (network.enforce = false): there is no policy to change" })
            }
            (_, Err(e)) => serde_json::json!({ "ok": false, "message": e }),
            (Some(egress), Ok(Request::Suggest)) => {
                let text = suggest(&egress);
                serde_json::json!({ "ok": true, "message": "", "text": text })
            }
            (Some(egress), Ok(Request::Change(op))) => {
                let done = tokio::task::spawn_blocking(move || egress.change(op, &who)).await;
                match done {
                    Ok(Ok(message)) => serde_json::json!({ "ok": true, "message": message }),
                    Ok(Err(message)) => serde_json::json!({ "ok": false, "message": message }),
                    Err(e) => serde_json::json!({ "ok": false, "message": format!("the change failed: {e}") }),
                }
            }
        }
    };
    write.write_all(reply.to_string().as_bytes()).await?;
    write.write_all(b"\n").await?;
    write.shutdown().await?;
    if let Some(read) = unread {
        let mut sink = tokio::io::sink();
        let mut unseen = read.take(MAX_REQUEST as u64);
        let drain = tokio::io::copy(&mut unseen, &mut sink);
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    }
    Ok(())
}

/// The suggested allowlist from what observe mode recorded and the entries in force.
fn suggest(egress: &crate::egress::Egress) -> String {
    use crate::egress::suggest::{Seen, collapse, render};
    let (observed, dropped) = egress.policy.observed();
    let seen: Vec<Seen> = observed.into_iter().map(|(name, o)| Seen { name, count: o.count, first: o.first }).collect();
    let in_force = egress.policy.entries().compose();
    let mut text = render(&in_force, &collapse(&seen), dropped);
    if egress.policy.mode() != crate::config::Mode::Observe {
        text.insert_str(0, "# NOTE: network.mode is \"enforce\": nothing is observed, this is the policy in force.\n");
    }
    text
}

/// Sends one request to the admin socket; the JSON answer.
pub(crate) fn request(state_dir: &Path, line: &str) -> std::io::Result<serde_json::Value> {
    use std::io::Write as _;
    let mut stream = std::os::unix::net::UnixStream::connect(socket_path(state_dir))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    // A peer other than root is answered without its request being read, possibly before it
    // was sent: the answer is still there to read.
    match stream.write_all(format!("{line}\n").as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe && e.kind() != std::io::ErrorKind::ConnectionReset => {
            return Err(e);
        }
        _ => {}
    }
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut stream, &mut reply)?;
    serde_json::from_str(&reply).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_into_changes_and_bad_ones_say_why() {
        assert_eq!(parse("reload").unwrap(), Request::Change(Op::Reload));
        assert_eq!(parse("suggest").unwrap(), Request::Suggest);
        assert_eq!(
            parse("allow x.example.com:8443 3").unwrap(),
            Request::Change(Op::Allow {
                entry: Entry::parse("x.example.com:8443").unwrap(),
                for_: Some(Duration::from_secs(3))
            })
        );
        assert!(matches!(parse("deny *.example.com").unwrap(), Request::Change(Op::Deny { .. })));
        assert!(parse("allow *.com").unwrap_err().contains("wildcard"));
        assert!(parse("allow x.example.com 0").unwrap_err().contains("above 0"));
        assert!(parse("allow x.example.com 31536000").is_ok(), "a year is the longest grant");
        assert!(parse("allow x.example.com 31536001").unwrap_err().contains("365 days"));
        assert!(parse(&format!("allow x.example.com {}", u64::MAX)).unwrap_err().contains("365 days"), "no overflow");
        assert!(parse("deny x.example.com:443").is_err(), "deny takes a pattern, every port goes");
        assert!(parse("status").unwrap_err().contains("unknown request"));
    }
}
