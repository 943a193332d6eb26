//! Every direct libc call cordon makes lives here, each with its reason, so the unsafe surface
//! can be read in one sitting. Callers get `io::Result` or a typed value.

pub mod command;
pub mod net;

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::Path;

use nix::sys::signal::{SigSet, Signal};
use nix::unistd::Pid;

/// The signals cordon handles or forwards. Everything else stays blocked in the reaper and
/// default in children.
pub const FORWARDED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// Blocks every signal that can be blocked except the synchronous faults, which must still
/// kill a buggy process rather than spin. Returns the set to `sigwait` on.
pub fn block_signals() -> io::Result<SigSet> {
    let mut set = SigSet::all();
    for s in [Signal::SIGSEGV, Signal::SIGBUS, Signal::SIGILL, Signal::SIGFPE, Signal::SIGTRAP, Signal::SIGABRT] {
        set.remove(s);
    }
    set.thread_block()?;
    Ok(set)
}

/// Restores an empty signal mask on the calling thread. std does not do this for children
/// (rust-lang/rust#101077), and a child that inherits a blocked SIGTERM ignores `docker stop`.
pub fn unblock_all_signals() -> io::Result<()> {
    SigSet::empty().thread_set_mask()?;
    Ok(())
}

/// Marks every descriptor from 3 up close-on-exec, so nothing cordon inherited or opened
/// reaches a child. Marking rather than closing keeps std's exec-error pipe working.
/// Async-signal-safe: a single syscall (close_range(2), Linux 5.11).
pub fn cloexec_from_3() -> io::Result<()> {
    // SAFETY: close_range only changes descriptor flags; no memory is touched.
    let rc = unsafe { libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Where cordon's own binary is: what the reaper re-executes as the supervisor, what the agent's
/// git runs as its credential helper, what the probes and the tmux pane run. The image's path
/// when `/proc/self/exe` cannot be read (no /proc).
pub fn cordon_exe() -> std::path::PathBuf {
    std::env::current_exe().unwrap_or_else(|_| "/usr/local/bin/cordon".into())
}

/// Exit status of a reaped process in shell convention: the code, or 128 + signal number.
pub fn exit_code(status: nix::sys::wait::WaitStatus) -> Option<(Pid, i32)> {
    use nix::sys::wait::WaitStatus::*;
    match status {
        Exited(pid, code) => Some((pid, code)),
        Signaled(pid, sig, _) => Some((pid, 128 + sig as i32)),
        _ => None,
    }
}

/// Reaps every child that has exited, without blocking. The one `waitpid(-1)` of the program:
/// only the reaper process calls it, so no exit status is stolen from anyone else.
pub fn reap_exited() -> Vec<(Pid, i32)> {
    use nix::errno::Errno;
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let mut reaped = Vec::new();
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
            Ok(status) => reaped.extend(exit_code(status)),
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    reaped
}

/// A process as /proc shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcEntry {
    pub pid: i32,
    pub ppid: i32,
    pub state: char,
}

/// Parses `/proc/<pid>/stat`: the command name is in parentheses and may itself contain
/// spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcEntry> {
    let pid = text.split(' ').next()?.parse().ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some(ProcEntry { pid, ppid, state })
}

/// Every process /proc can see.
pub fn processes() -> Vec<ProcEntry> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return vec![] };
    dir.filter_map(|e| {
        let name = e.ok()?.file_name();
        let pid: i32 = name.to_str()?.parse().ok()?;
        parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    })
    .collect()
}

/// The live (non-zombie) descendants of `root`, from a snapshot of the process table. Because
/// the reaper is PID 1 or a subreaper, orphans stay inside its subtree and are found here.
pub fn live_descendants(root: i32, table: &[ProcEntry]) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<&ProcEntry>> = HashMap::new();
    for p in table {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        for c in children.get(&pid).into_iter().flatten() {
            if seen.insert(c.pid) {
                if c.state != 'Z' {
                    out.push(c.pid);
                }
                stack.push(c.pid);
            }
        }
    }
    out
}

/// Whether `pid` is a live process (not gone, not a zombie).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| parse_stat(&t))
        .is_some_and(|e| e.state != 'Z')
}

/// Sends `sig` to each pid, ignoring those that are already gone.
pub fn signal_all(pids: &[i32], sig: Signal) {
    for &pid in pids {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
    }
}

/// Drops every privilege of the calling (forked, not yet exec'd) process and becomes
/// `uid`/`gid` with exactly `groups`. Async-signal-safe: only raw syscalls, no allocation.
///
/// Order matters: the bounding set and ambient set need CAP_SETPCAP, so they go before the
/// uid change; setresuid from 0 clears the permitted and effective sets but not the
/// inheritable one, which capset clears after; no_new_privs comes last (prctl(2),
/// capabilities(7)).
pub fn drop_privileges(uid: u32, gid: u32, groups: &[u32]) -> io::Result<()> {
    let check = |rc: libc::c_int| if rc == -1 { Err(io::Error::last_os_error()) } else { Ok(()) };
    // SAFETY: all calls below are plain syscalls on the current process with valid arguments;
    // `groups` outlives the setgroups call and the capset structs live on the stack.
    unsafe {
        // The kernel knows at most 64 capabilities; EINVAL marks the ones it does not have.
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) == -1
                && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
            {
                return Err(io::Error::last_os_error());
            }
        }
        check(libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))?;
        check(libc::setgroups(groups.len(), groups.as_ptr()))?;
        check(libc::setresgid(gid, gid, gid))?;
        check(libc::setresuid(uid, uid, uid))?;
        let header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
        let data = [CapData::default(); 2];
        check(libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as libc::c_int)?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
    }
    Ok(())
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Creates a file exclusively to learn whether the filesystem at `dir` accepts writes; the
/// probe file is removed again when it could be created.
pub fn write_probe(dir: &Path) -> io::Result<()> {
    let probe = dir.join(format!(".cordon-write-probe-{}", std::process::id()));
    std::fs::OpenOptions::new().write(true).create_new(true).open(&probe)?;
    std::fs::remove_file(&probe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_hostile_command_names() {
        let e = parse_stat("42 (a) b (c)) S 7 42 42 0 -1").unwrap();
        assert_eq!(e, ProcEntry { pid: 42, ppid: 7, state: 'S' });
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn descendants_include_grandchildren_but_not_zombies_or_strangers() {
        let p = |pid, ppid, state| ProcEntry { pid, ppid, state };
        let table = [p(1, 0, 'S'), p(10, 1, 'S'), p(11, 10, 'R'), p(12, 11, 'Z'), p(13, 12, 'S'), p(20, 2, 'S')];
        let mut d = live_descendants(1, &table);
        d.sort();
        assert_eq!(d, [10, 11, 13]);
        assert!(live_descendants(20, &table).is_empty());
    }
}
