//! Every direct libc call cordon makes lives here, each with its reason, so the unsafe surface
//! can be read in one sitting. Callers get `io::Result` or a typed value.

pub(crate) mod command;
pub mod effects;
pub(crate) mod memory;
pub mod net;
pub mod nofollow;

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

/// Linux numbers its signals 1..=64 (`_NSIG` - 1, signal(7)): 1-31 standard, 32-64 real-time.
pub const MAX_SIGNAL: i32 = 64;

/// The size of the kernel's signal set for the raw `rt_sig*` syscalls: 64 bits on every
/// architecture cordon ships for (x86_64, aarch64).
const KERNEL_SIGSET_SIZE: usize = 8;

/// The kernel's set of every signal but SIGPIPE. Raw rather than libc's `sigset_t`: glibc's
/// `sigfillset` and `sigprocmask` silently leave out its two internal real-time signals (32 and
/// 33), whose default action is to terminate, so "block everything" through glibc still lets a
/// `kill -33` end the process. SIGPIPE is left out because the reaper ignores it instead (see
/// [`block_all_signals`]).
const ALL_BUT_PIPE: u64 = !(1 << (libc::SIGPIPE - 1));

/// `SIGRTMIN+3`: the stop signal of systemd-style images (`STOPSIGNAL SIGRTMIN+3`). SIGRTMIN
/// is glibc's (34), the number `kill -s RTMIN` and Docker use, not the kernel's 32.
pub fn stop_signal_rtmin3() -> i32 {
    libc::SIGRTMIN() + 3
}

/// The name of signal `sig` for logs: `SIGTERM`, or `SIGRTMIN+n` for a real-time one (glibc's
/// numbering), or `signal 32` for glibc's internal two.
pub fn signal_name(sig: i32) -> String {
    match Signal::try_from(sig) {
        Ok(s) => s.as_str().to_string(),
        Err(_) if sig >= libc::SIGRTMIN() => format!("SIGRTMIN+{}", sig - libc::SIGRTMIN()),
        Err(_) => format!("signal {sig}"),
    }
}

/// Blocks every signal of the calling thread but SIGPIPE, which the caller sets to ignored
/// (a blocked SIGPIPE would be queued by every failed write to a closed pipe). SIGKILL and
/// SIGSTOP cannot be blocked; the kernel drops them from the set.
///
/// The synchronous faults are blocked too, and a real one still kills: a fault the kernel raises
/// on a blocked or ignored signal resets it to the default action and unblocks it first
/// (`force_sig_info_to_task`, kernel/signal.c), so only a `kill -SEGV` from outside is caught.
pub fn block_all_signals() -> io::Result<()> {
    let set = ALL_BUT_PIPE;
    // SAFETY: rt_sigprocmask reads KERNEL_SIGSET_SIZE bytes from `set`, which lives on the
    // stack for the call; no old set is written.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &set as *const u64,
            std::ptr::null_mut::<u64>(),
            KERNEL_SIGSET_SIZE,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Waits for the next of the signals [`block_all_signals`] blocked and returns its number
/// (1..=64). Raw `rt_sigtimedwait` because nix's `SigSet::wait` returns a `Signal`, which has no
/// value for the real-time signals, and glibc's `sigwaitinfo` leaves out 32 and 33.
pub fn wait_signal() -> io::Result<i32> {
    let set = ALL_BUT_PIPE;
    loop {
        // SAFETY: rt_sigtimedwait reads KERNEL_SIGSET_SIZE bytes from `set`; a null siginfo and a
        // null timeout are allowed (no details, wait without limit).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_rt_sigtimedwait,
                &set as *const u64,
                std::ptr::null_mut::<libc::siginfo_t>(),
                std::ptr::null::<libc::timespec>(),
                KERNEL_SIGSET_SIZE,
            )
        };
        if rc > 0 {
            return Ok(rc as i32);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Blocks every signal of the calling thread that glibc lets a program block (all but its
/// internal 32 and 33, which must stay deliverable to every thread of a threaded process: glibc's
/// `setuid` family signals each thread with 33 and waits for it). The supervisor runs this
/// before it starts threads, which inherit the mask: signals are held until its handlers exist.
pub fn block_signals_for_startup() -> io::Result<()> {
    SigSet::all().thread_set_mask()?;
    Ok(())
}

/// Blocks every signal that can be blocked except the synchronous faults. Returns the set to
/// `sigwait` on. Used by `pane-run`, which waits for its child, not for signals.
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

/// glibc's internal real-time signal for `setuid` and friends in a threaded process (SIGSETXID,
/// nptl). glibc installs its handler at every start, so an inherited disposition never survives
/// into a glibc program, and a handler is reset by exec anyway; cordon leaves it to glibc.
const LIBC_SETXID_SIGNAL: i32 = 33;

/// Sets every signal's disposition to its default, except those in `ignored`, which are set
/// to ignored. A parent can leave any signal ignored across exec (`signal(SIGCHLD, SIG_IGN)`
/// makes every `waitpid` fail with ECHILD; an ignored SIGTERM makes a child deaf to `docker
/// stop`), and glibc's own `posix_spawn` (std's `Command`) leaves signal 32 ignored in every
/// child; the documented promise is default dispositions. Skips what cannot or must not be
/// changed: SIGKILL, SIGSTOP, and glibc's [`LIBC_SETXID_SIGNAL`].
/// Async-signal-safe: raw `rt_sigaction` only, no allocation, so it can run in `pre_exec`.
pub fn reset_signal_dispositions(ignored: &[i32]) -> io::Result<()> {
    for sig in 1..=MAX_SIGNAL {
        if [libc::SIGKILL, libc::SIGSTOP, LIBC_SETXID_SIGNAL].contains(&sig) {
            continue;
        }
        let handler = if ignored.contains(&sig) { libc::SIG_IGN } else { libc::SIG_DFL };
        let action = KernelSigaction { handler, flags: 0, restorer: 0, mask: 0 };
        // SAFETY: rt_sigaction reads one KernelSigaction (the kernel's layout on x86_64 and
        // aarch64) from the stack; SIG_DFL and SIG_IGN install no code of ours, so no restorer is
        // needed; the old action is not read. Raw rather than glibc's `sigaction`, which refuses
        // signal 32 (EINVAL) and so cannot undo an inherited SIG_IGN on it.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &action as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                KERNEL_SIGSET_SIZE,
            )
        };
        if rc == -1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `struct sigaction` as the kernel takes it (include/uapi/asm-generic/signal.h with
/// SA_RESTORER, which both x86_64 and aarch64 define), not glibc's.
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// The signals ignored in every process of cordon's own: SIGPIPE (a write to a closed pipe
/// returns EPIPE instead of killing; Rust's runtime sets this too) and the job-control stops, so
/// a Ctrl-Z on the terminal (SIGTSTP to the foreground group) or a log write while the agent
/// holds the terminal (SIGTTOU with `stty tostop`) never stops the supervisor.
pub const IGNORED_IN_CORDON: [i32; 4] = [libc::SIGPIPE, libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU];

/// Marks every descriptor from 3 up close-on-exec, so nothing cordon inherited or opened
/// reaches a child. Marking rather than closing keeps std's exec-error pipe working.
/// Async-signal-safe: a single syscall (close_range(2), Linux 5.11).
pub fn cloexec_from_3() -> io::Result<()> {
    // SAFETY: close_range only changes descriptor flags; no memory is touched.
    let rc = unsafe { libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Points stdout at stderr (`2>&1` the other way round), between fork and exec: for a command
/// whose two streams are read as one, in order, through its stderr pipe.
pub fn stdout_to_stderr() -> io::Result<()> {
    // SAFETY: dup2 on two descriptors the process owns; async-signal-safe, touches no memory.
    let rc = unsafe { libc::dup2(2, 1) };
    if rc == 1 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Where cordon's own binary is: what the reaper re-executes as the supervisor, what the agent's
/// git runs as its credential helper, what the probes and the tmux pane run. The image's path
/// when `/proc/self/exe` cannot be read (no /proc).
pub fn cordon_exe() -> std::path::PathBuf {
    std::env::current_exe().unwrap_or_else(|_| "/usr/local/bin/cordon".into())
}

/// Closes every descriptor from 3 up and returns what each one was (its number and the
/// `/proc/self/fd` link: `pipe:[1234]`, a path). For PID 1 at start, before it opens anything of
/// its own: a descriptor a launcher leaked would otherwise stay open for the container's life
/// (close-on-exec only keeps it from children), and a leaked pipe end never sees EOF.
pub fn close_inherited_descriptors() -> io::Result<Vec<(i32, String)>> {
    // Listed first, then closed: the directory handle is itself a descriptor, gone (and so
    // skipped, its link unreadable) by the time the list is read.
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd >= 3)
        .collect();
    let mut closed = Vec::new();
    for fd in fds {
        if let Ok(target) = std::fs::read_link(format!("/proc/self/fd/{fd}")) {
            closed.push((fd, target.display().to_string()));
        }
    }
    // SAFETY: close_range touches no memory; nothing in this process uses a descriptor above 2
    // yet (the caller runs before opening any), so no owner is left with a dangling one.
    let rc = unsafe { libc::close_range(3, u32::MAX, 0) };
    if rc == 0 { Ok(closed) } else { Err(io::Error::last_os_error()) }
}

/// One environment variable, name and value, as the process had it.
pub type EnvVar = (std::ffi::OsString, std::ffi::OsString);

/// Takes the whole environment out of the process: returns every variable, removes them all,
/// and overwrites the process's initial environment block with zeros, so `/proc/PID/environ`
/// (readable by root and by anything that dumps /proc) no longer shows a secret. The block is
/// the kernel's copy of the `envp` this process was started with; removing a variable only
/// drops the pointer to it. The second value says how many bytes were overwritten, or why none
/// were (the variables are taken either way). Fails, taking nothing, unless the process is
/// single-threaded (glibc's environment is not thread-safe): the caller runs it first thing.
pub fn take_environment() -> io::Result<(Vec<EnvVar>, io::Result<usize>)> {
    ensure_single_threaded("take the environment out")?;
    let vars: Vec<_> = std::env::vars_os().collect();
    for (k, _) in &vars {
        // SAFETY: the process has one thread (checked above), and only that thread, this one,
        // could start another.
        unsafe { std::env::remove_var(k) };
    }
    Ok((vars, zero_environment_block()))
}

/// Sets the process's own `PATH`, the one `Command::new("iptables")` searches. Fails unless
/// the process is single-threaded, like [`take_environment`].
pub fn set_own_path(path: &str) -> io::Result<()> {
    ensure_single_threaded("set PATH")?;
    // SAFETY: the process has one thread (checked above), and only that thread could start
    // another.
    unsafe { std::env::set_var("PATH", path) };
    Ok(())
}

/// Fails unless the calling process has exactly one thread (one entry in `/proc/self/task`).
/// Once true it stays true until this very thread starts another, which is what makes the
/// environment calls above sound without an `unsafe` contract on their callers.
fn ensure_single_threaded(operation: &str) -> io::Result<()> {
    let threads = std::fs::read_dir("/proc/self/task")?.count();
    if threads == 1 {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "cannot {operation}: the process has {threads} threads (the environment is only safe to change with one)"
        )))
    }
}

fn zero_environment_block() -> io::Result<usize> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let (start, end) =
        parse_env_bounds(&stat).ok_or_else(|| io::Error::other("no env_start/env_end in /proc/self/stat"))?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    if !writable_mapping_covers(&maps, start, end) {
        return Err(io::Error::other(format!("environment block {start:#x}..{end:#x} is not in one writable mapping")));
    }
    // SAFETY: [start, end) is this process's initial environment block (kernel-reported) and
    // lies in one writable mapping (checked above: its stack). No pointer into it is left:
    // the caller removed every variable from `environ`, and glibc copies what `setenv` adds.
    unsafe { std::ptr::write_bytes(start as *mut u8, 0, end - start) };
    Ok(end - start)
}

/// `env_start` and `env_end`, fields 50 and 51 of `/proc/PID/stat` (proc(5)). Fields are
/// counted from the last `)`, after which comes field 3.
pub fn parse_env_bounds(stat: &str) -> Option<(usize, usize)> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(50 - 3);
    let start = fields.next()?.parse().ok()?;
    let end = fields.next()?.parse().ok()?;
    (start < end).then_some((start, end))
}

/// Whether one writable mapping of `/proc/PID/maps` covers [start, end).
pub fn writable_mapping_covers(maps: &str, start: usize, end: usize) -> bool {
    maps.lines()
        .filter_map(parse_mapping)
        .any(|m| m.perms.starts_with("rw") && m.range.start <= start && end <= m.range.end)
}

/// One mapping, as a line of `/proc/PID/maps` (or a mapping's first line in `smaps`) gives it.
pub(crate) struct Mapping<'a> {
    pub range: std::ops::Range<usize>,
    /// `rwxp`-style, four characters.
    pub perms: &'a str,
    /// The file, a `[name]`, or empty for an anonymous mapping.
    pub path: &'a str,
}

/// Reads `lo-hi perms offset dev inode [path]`; None for any other line.
pub(crate) fn parse_mapping(line: &str) -> Option<Mapping<'_>> {
    let mut parts = line.splitn(6, ' ');
    let (lo, hi) = parts.next()?.split_once('-')?;
    let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)) else { return None };
    let perms = parts.next().filter(|p| p.len() == 4 && lo < hi)?;
    // offset, device, inode, then the path after the padding (absent for anonymous mappings).
    let path = parts.nth(3).map(str::trim_start).unwrap_or("");
    Some(Mapping { range: lo..hi, perms, path })
}

/// Makes the process non-dumpable (`PR_SET_DUMPABLE` 0, prctl(2)): no core dump of its memory,
/// which holds the secrets, and its /proc files (`mem`, `environ`, `maps`) owned by root and
/// closed to ptrace by anyone without CAP_SYS_PTRACE.
pub fn set_non_dumpable() -> io::Result<()> {
    // SAFETY: a plain prctl on the calling process; no memory is passed.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Caps glibc's malloc arenas at `arenas` (mallopt(3) `M_ARENA_MAX`). By default glibc gives
/// each thread that contends for the main arena one of its own (up to 8 per core), each keeping
/// its freed memory resident; cordon's supervisor has two runtime workers and a few blocking
/// threads, and its RSS is mostly those arenas' kept pages. Call before any thread starts.
/// Best effort: another libc has no such knob, and nothing depends on it.
pub fn limit_malloc_arenas(arenas: i32) {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = arenas;
}

/// SIGKILL to every process of the caller's pid namespace but itself and the namespace's init
/// (kill(2) with pid -1). One atomic pass: the kernel walks the process list under the lock
/// fork needs, so a process that keeps forking cannot slip a child past it, as it can past a
/// snapshot of /proc. Only for a caller whose namespace is the container (cordon as PID 1).
pub fn kill_namespace() {
    let _ = nix::sys::signal::kill(Pid::from_raw(-1), Signal::SIGKILL);
}

/// Exit status of a reaped process in shell convention: the code, or 128 + signal number; None
/// for a status that is not an end (stopped, continued). From the raw `wait` status, because
/// nix's `WaitStatus` cannot represent a death by a real-time signal (its `waitpid` reaps the
/// child and then returns EINVAL, losing the status).
pub fn shell_exit_code(status: libc::c_int) -> Option<i32> {
    if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Some(128 + libc::WTERMSIG(status))
    } else {
        None
    }
}

/// Exit status of a child that std or tokio waited for, in shell convention: the code, or
/// 128 + signal number, decoded by [`shell_exit_code`] like the reaper's. A status `wait`
/// returns is always an end; anything else (it cannot happen) reads as 1, a failure.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    shell_exit_code(status.into_raw()).unwrap_or(1)
}

/// Reaps every child that has exited, without blocking. The one `waitpid(-1)` of the program:
/// only the reaper process calls it, so no exit status is stolen from anyone else.
pub fn reap_exited() -> Vec<(Pid, i32)> {
    let mut reaped = Vec::new();
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid writes one c_int to `status`, which lives on the stack for the call.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        match pid {
            0 => break,
            -1 if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) => continue,
            // ECHILD: no child left; anything else cannot happen with these arguments.
            -1 => break,
            pid => reaped.extend(shell_exit_code(status).map(|code| (Pid::from_raw(pid), code))),
        }
    }
    reaped
}

/// The reaper's count of the processes it reaped, shared with the supervisor (a separate
/// process after an exec, so no shared memory survives) through an 8-byte memfd: the reaper
/// rewrites the whole count after each reap, the supervisor reads it when asked. A value
/// rather than a pipe of events: the reaper never blocks on a reader, and nothing is lost
/// while nobody reads.
#[derive(Debug)]
pub struct ReapedCount {
    file: std::fs::File,
    /// The reaper's own running total (the supervisor only reads the file).
    total: std::sync::atomic::AtomicU64,
}

/// The variable that names the count's descriptor number in the supervisor.
pub const REAPED_FD_ENV: &str = "CORDON_REAPED_FD";
const REAPED_NAME: &str = "cordon-reaped";

impl ReapedCount {
    /// In the reaper, before it starts the supervisor: a fresh count of 0, on a descriptor
    /// without close-on-exec, so the supervisor inherits it.
    pub fn create() -> io::Result<ReapedCount> {
        use nix::sys::memfd::{MFdFlags, memfd_create};
        let fd = memfd_create(REAPED_NAME, MFdFlags::empty()).map_err(io::Error::from)?;
        let count = ReapedCount { file: std::fs::File::from(fd), total: std::sync::atomic::AtomicU64::new(0) };
        count.store(0)?;
        Ok(count)
    }

    /// The descriptor number, for [`REAPED_FD_ENV`].
    pub fn fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.file.as_raw_fd()
    }

    /// In the reaper: counts `n` more reaped processes.
    pub fn add(&self, n: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        if n > 0 {
            let total = self.total.fetch_add(n as u64, Relaxed) + n as u64;
            let _ = self.store(total);
        }
    }

    fn store(&self, value: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(&value.to_le_bytes(), 0)
    }

    /// In the supervisor, first thing: takes over descriptor `fd` (the value of
    /// [`REAPED_FD_ENV`]) if it is the reaper's memfd, and marks it close-on-exec so no child
    /// of the supervisor inherits it. None otherwise: the count is then not reported.
    pub fn inherited(fd: &str) -> Option<ReapedCount> {
        use std::os::fd::FromRawFd;
        let fd: i32 = fd.parse().ok().filter(|&fd| fd >= 3)?;
        let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
        if !target.to_string_lossy().starts_with(&format!("/memfd:{REAPED_NAME}")) {
            return None;
        }
        // SAFETY: the descriptor is open (its /proc link was just read) and is the reaper's
        // memfd, which nothing else in this process owns; the File becomes its one owner.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
        flags.ok()?;
        Some(ReapedCount { file, total: std::sync::atomic::AtomicU64::new(0) })
    }

    /// In the supervisor: the reaper's count now.
    pub fn load(&self) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        let mut bytes = [0u8; 8];
        self.file.read_exact_at(&mut bytes, 0).ok()?;
        Some(u64::from_le_bytes(bytes))
    }
}

/// A process as /proc shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcEntry {
    pub pid: i32,
    pub ppid: i32,
    pub state: char,
    /// The process group.
    pub pgrp: i32,
}

/// Parses `/proc/<pid>/stat`: the command name is in parentheses and may itself contain
/// spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcEntry> {
    let pid = text.split(' ').next()?.parse().ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some(ProcEntry { pid, ppid, state, pgrp })
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

/// The process groups all of whose members in `table` are among `pids`: the groups that can
/// be killed as a whole (one atomic `killpg`, which also reaches a child forked a moment ago)
/// without touching a process outside `pids`.
pub fn groups_within(pids: &[i32], table: &[ProcEntry]) -> Vec<i32> {
    let inside: HashSet<i32> = pids.iter().copied().collect();
    let mut groups: Vec<i32> = table.iter().filter(|p| inside.contains(&p.pid)).map(|p| p.pgrp).collect();
    groups.sort_unstable();
    groups.dedup();
    groups
        .retain(|&g| g > 1 && table.iter().filter(|p| p.pgrp == g && p.state != 'Z').all(|p| inside.contains(&p.pid)));
    groups
}

/// SIGKILL to everything below `root` but `spare` (the caller), from a fresh /proc snapshot:
/// each process, and each process group wholly inside that set as a group. Returns how many
/// live processes the snapshot found.
pub fn kill_descendants(root: i32, spare: i32) -> usize {
    let table = processes();
    let left: Vec<i32> = live_descendants(root, &table).into_iter().filter(|&p| p != spare).collect();
    for group in groups_within(&left, &table) {
        let _ = nix::sys::signal::killpg(Pid::from_raw(group), Signal::SIGKILL);
    }
    signal_all(&left, Signal::SIGKILL);
    left.len()
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

/// Makes `cmd`'s child start with an empty signal mask: the caller may keep signals blocked
/// (`pane-run` does), and std does not reset the mask for children (rust-lang/rust#101077).
pub fn unblock_signals_at_exec(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs between fork and exec and makes one sigprocmask call, which is
    // async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(unblock_all_signals);
    }
}

/// Makes `cmd`'s child start as `uid`/`gid` with exactly `groups` and no privilege, with an
/// empty signal mask, every signal at its default disposition, and no descriptor above 2: what
/// everything cordon runs as the agent user starts with.
pub fn drop_to_user_at_exec(cmd: &mut std::process::Command, uid: u32, gid: u32, groups: Vec<u32>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // syscalls (sigprocmask, sigaction, close_range, prctl, set*id, capset); it allocates
    // nothing (`groups` was built before the fork and is only read).
    unsafe {
        cmd.pre_exec(move || {
            unblock_all_signals()?;
            // What cordon ignores (SIGPIPE, the job-control stops) or its launcher left ignored
            // would otherwise stay ignored across exec.
            reset_signal_dispositions(&[])?;
            cloexec_from_3()?;
            drop_privileges(uid, gid, &groups)
        });
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
        let e = parse_stat("42 (a) b (c)) S 7 40 42 0 -1").unwrap();
        assert_eq!(e, ProcEntry { pid: 42, ppid: 7, state: 'S', pgrp: 40 });
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn only_groups_wholly_inside_the_set_are_killed_as_groups() {
        let p = |pid, pgrp, state| ProcEntry { pid, ppid: 1, state, pgrp };
        // 10 and 11 form group 10; 20 shares group 20 with 21, which is outside the set;
        // 30's group has a zombie member outside (gone already): still wholly inside.
        let table = [p(10, 10, 'S'), p(11, 10, 'R'), p(20, 20, 'S'), p(21, 20, 'S'), p(30, 30, 'S'), p(31, 30, 'Z')];
        assert_eq!(groups_within(&[10, 11, 20, 30], &table), [10, 30]);
        assert!(groups_within(&[], &table).is_empty());
    }

    #[test]
    fn exit_statuses_in_shell_convention_include_real_time_signals() {
        assert_eq!(shell_exit_code(7 << 8), Some(7));
        assert_eq!(shell_exit_code(libc::SIGKILL), Some(128 + 9));
        assert_eq!(shell_exit_code(libc::SIGSEGV | 0x80), Some(128 + 11), "core dumped");
        assert_eq!(shell_exit_code(37), Some(128 + 37), "SIGRTMIN+3");
        assert_eq!(shell_exit_code(0x137f), None, "stopped by SIGSTOP");
    }

    #[test]
    fn exit_code_of_a_waited_child_is_its_code_or_128_plus_its_signal() {
        use std::os::unix::process::ExitStatusExt;
        use std::process::ExitStatus;
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGTERM)), 128 + 15);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGRTMIN() + 3)), 128 + 37, "real-time signals too");
        let real = std::process::Command::new("sh").args(["-c", "kill -KILL $$"]).status().unwrap();
        assert_eq!(exit_code(real), 128 + 9);
    }

    #[test]
    fn environment_bounds_are_fields_50_and_51_of_stat() {
        // A real line (kernel 6.x) with a hostile command name.
        let stat = "4242 (a) b) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 500 2527232 200 \
                    18446744073709551615 94000 95000 140736000 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 96000 97000 98000 \
                    140736100 140736200 140736200 140736900 0";
        assert_eq!(parse_env_bounds(stat), Some((140736200, 140736900)));
        assert_eq!(parse_env_bounds("1 (x) S 0"), None);
    }

    #[test]
    fn the_environment_block_must_lie_in_one_writable_mapping() {
        let maps = "7ffd0000-7ffe0000 rw-p 00000000 00:00 0 [stack]\n55550000-55560000 r--p 00000000 08:01 1 /bin/x\n";
        assert!(writable_mapping_covers(maps, 0x7ffd_1000, 0x7ffd_2000));
        assert!(!writable_mapping_covers(maps, 0x5555_1000, 0x5555_2000), "read-only");
        assert!(!writable_mapping_covers(maps, 0x7ffd_f000, 0x7ffe_1000), "runs past the end");
    }

    #[test]
    fn the_environment_block_of_this_process_can_be_located() {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let (start, end) = parse_env_bounds(&stat).unwrap();
        assert!(writable_mapping_covers(&std::fs::read_to_string("/proc/self/maps").unwrap(), start, end));
    }

    #[test]
    fn signal_names_cover_the_real_time_range() {
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
        assert_eq!(signal_name(stop_signal_rtmin3()), "SIGRTMIN+3");
        assert_eq!(signal_name(MAX_SIGNAL), format!("SIGRTMIN+{}", MAX_SIGNAL - libc::SIGRTMIN()));
        assert_eq!(signal_name(32), "signal 32");
    }

    #[test]
    fn descendants_include_grandchildren_but_not_zombies_or_strangers() {
        let p = |pid, ppid, state| ProcEntry { pid, ppid, state, pgrp: pid };
        let table = [p(1, 0, 'S'), p(10, 1, 'S'), p(11, 10, 'R'), p(12, 11, 'Z'), p(13, 12, 'S'), p(20, 2, 'S')];
        let mut d = live_descendants(1, &table);
        d.sort();
        assert_eq!(d, [10, 11, 13]);
        assert!(live_descendants(20, &table).is_empty());
    }
}
