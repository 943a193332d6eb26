//! External commands with a real deadline: every command the boot runs (git, the readiness
//! probes, tmux, iptables and ipset) goes through [`output`].
//!
//! A deadline on the command alone is not one: `git clone` killed at its timeout leaves
//! `git-remote-http` holding the stderr pipe, and a reader waits until the server hangs up. So
//! each command runs as the leader of its own process group, the whole group is SIGKILLed at
//! the deadline (and whatever the leader leaves in its group when it exits), and the pipes are
//! read by threads that the caller stops waiting for: a descriptor some daemon outside the
//! group keeps open costs a parked thread, never the boot.
//!
//! Exit statuses come from std's `Child` (`waitpid` on the child's own pid), which is safe here:
//! only the reaper process calls `waitpid(-1)` (see `supervise::reaper`).

use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;

/// How often a running command is checked for its exit, its deadline and a stop request: the
/// latency of a stop during the boot.
const TICK: Duration = Duration::from_millis(20);
/// After the command exited (or was killed), how long its output may still take to arrive.
const DRAIN: Duration = Duration::from_millis(500);
/// After SIGKILL, how long to wait for the leader to become a zombie (a process in
/// uninterruptible sleep cannot be waited for forever).
const KILL_SETTLE: Duration = Duration::from_secs(2);
/// Output kept per stream; a command that writes more keeps its last bytes.
const OUTPUT_LIMIT: usize = 1 << 20;

/// A stop request for the commands that consult it: once requested, a running command is
/// killed within [`TICK`] and no new one starts.
#[derive(Debug, Default)]
pub(crate) struct Interrupt(AtomicBool);

impl Interrupt {
    pub(crate) const fn new() -> Interrupt {
        Interrupt(AtomicBool::new(false))
    }

    pub(crate) fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub(crate) fn is_requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The boot's stop request: the supervisor sets it on SIGTERM/SIGINT while the boot runs on
/// its blocking thread. Process-wide because the commands it stops are run from modules that
/// know nothing of the boot (firewall, session); nothing clears it, because after a stop
/// request the process only stops.
pub(crate) static BOOT: Interrupt = Interrupt::new();

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot run `{program}`")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{program}` did not finish within {}; it was killed", humantime::format_duration(*.deadline))]
    TimedOut {
        program: String,
        deadline: Duration,
        /// What it wrote to stderr before it was killed.
        stderr: String,
    },
    #[error("`{program}` was killed: cordon is stopping")]
    Interrupted { program: String },
    #[error("cannot wait for `{program}`")]
    Wait {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// How to run one command.
pub(crate) struct Options<'a> {
    /// Written to the command's stdin, which is then closed; without it stdin is /dev/null.
    pub stdin: Option<&'a [u8]>,
    pub deadline: Duration,
    pub interrupt: &'a Interrupt,
    /// Called with each line (split at `\n` or `\r`, as progress meters write) of stderr, as
    /// it arrives, on the calling thread.
    pub on_stderr_line: Option<&'a mut dyn FnMut(&str)>,
}

impl<'a> Options<'a> {
    /// The boot's defaults: no stdin, stopped by [`BOOT`].
    pub(crate) fn new(deadline: Duration) -> Options<'a> {
        Options { stdin: None, deadline, interrupt: &BOOT, on_stderr_line: None }
    }
}

/// Runs `program args` as root with `stdin`, within `deadline`: the simple form, for iptables
/// and ipset. Any exit status is an `Ok`; the caller judges it.
pub(crate) fn run(
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    deadline: Duration,
) -> Result<Output, CommandError> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    output(cmd, Options { stdin, ..Options::new(deadline) })
}

enum Chunk {
    Out(Vec<u8>),
    Err(Vec<u8>),
    /// One of the two readers reached end of file.
    Eof,
}

/// Runs `cmd` (its stdio is replaced) as a new process group and collects its output. The
/// group is SIGKILLed at the deadline, on a stop request, and when the leader exits (what it
/// left behind in its group, such as a helper holding a pipe, is debris).
pub(crate) fn output(mut cmd: Command, mut opts: Options<'_>) -> Result<Output, CommandError> {
    use std::os::unix::process::CommandExt;
    let program = cmd.get_program().to_string_lossy().into_owned();
    if opts.interrupt.is_requested() {
        return Err(CommandError::Interrupted { program });
    }
    cmd.process_group(0)
        .stdin(if opts.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| CommandError::Spawn { program: program.clone(), source })?;
    let pgid = Pid::from_raw(child.id() as i32);

    let (tx, rx) = mpsc::channel();
    if let (Some(input), Some(mut pipe)) = (opts.stdin, child.stdin.take()) {
        // A thread, so a command that writes before it has read all its input cannot deadlock
        // against us. A write error shows up as the command's own failure.
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    spawn_reader(child.stdout.take().expect("piped"), tx.clone(), Chunk::Out);
    spawn_reader(child.stderr.take().expect("piped"), tx, Chunk::Err);

    let started = Instant::now();
    let mut out = Collected::default();
    let ended = loop {
        out.take(&rx, TICK, &mut opts.on_stderr_line);
        match exited(pgid) {
            Ok(true) => break None,
            Ok(false) => {}
            Err(source) => {
                kill_group(pgid);
                let _ = child.wait();
                return Err(CommandError::Wait { program, source });
            }
        }
        if opts.interrupt.is_requested() {
            break Some(CommandError::Interrupted { program: program.clone() });
        }
        if started.elapsed() >= opts.deadline {
            break Some(CommandError::TimedOut {
                program: program.clone(),
                deadline: opts.deadline,
                stderr: String::new(),
            });
        }
    };
    // The leader is a zombie (or about to be killed): its pid, and so the group id, cannot be
    // reused until it is reaped below, so this kill cannot hit a stranger.
    kill_group(pgid);
    let status = reap(&mut child, &program)?;
    let drain_until = Instant::now() + DRAIN;
    while out.eofs < 2 && Instant::now() < drain_until {
        out.take(&rx, TICK, &mut opts.on_stderr_line);
    }
    out.flush_line(&mut opts.on_stderr_line);
    match ended {
        None => Ok(Output { status, stdout: out.stdout, stderr: out.stderr }),
        Some(CommandError::TimedOut { program, deadline, .. }) => {
            Err(CommandError::TimedOut { program, deadline, stderr: String::from_utf8_lossy(&out.stderr).into_owned() })
        }
        Some(e) => Err(e),
    }
}

fn spawn_reader(mut pipe: impl Read + Send + 'static, tx: mpsc::Sender<Chunk>, wrap: fn(Vec<u8>) -> Chunk) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(wrap(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(Chunk::Eof);
    });
}

/// Whether the leader has exited, without reaping it (`WNOWAIT`), so its pid stays reserved
/// until the group is killed.
fn exited(pid: Pid) -> std::io::Result<bool> {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    match waitid(Id::Pid(pid), flags) {
        Ok(WaitStatus::StillAlive) => Ok(false),
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn kill_group(pgid: Pid) {
    // ESRCH: the group is already empty.
    let _ = killpg(pgid, Signal::SIGKILL);
}

fn reap(child: &mut std::process::Child, program: &str) -> Result<ExitStatus, CommandError> {
    let settle = Instant::now() + KILL_SETTLE;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() < settle => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                return Err(CommandError::Wait {
                    program: program.into(),
                    source: std::io::Error::other("still running after SIGKILL"),
                });
            }
            Err(source) => return Err(CommandError::Wait { program: program.into(), source }),
        }
    }
}

#[derive(Default)]
struct Collected {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    eofs: u8,
    /// The stderr line being assembled for `on_stderr_line`.
    line: Vec<u8>,
}

impl Collected {
    /// Takes what arrives within `wait` (and everything queued behind it).
    fn take(&mut self, rx: &mpsc::Receiver<Chunk>, wait: Duration, on_line: &mut Option<&mut dyn FnMut(&str)>) {
        let Ok(first) = rx.recv_timeout(wait) else { return };
        for chunk in std::iter::once(first).chain(rx.try_iter()) {
            match chunk {
                Chunk::Out(b) => append_capped(&mut self.stdout, &b),
                Chunk::Err(b) => {
                    if let Some(f) = on_line.as_mut() {
                        for &c in &b {
                            if c == b'\n' || c == b'\r' {
                                if !self.line.is_empty() {
                                    f(&String::from_utf8_lossy(&self.line));
                                    self.line.clear();
                                }
                            } else if self.line.len() < 4096 {
                                self.line.push(c);
                            }
                        }
                    }
                    append_capped(&mut self.stderr, &b);
                }
                Chunk::Eof => self.eofs += 1,
            }
        }
    }

    fn flush_line(&mut self, on_line: &mut Option<&mut dyn FnMut(&str)>) {
        if let Some(f) = on_line.as_mut()
            && !self.line.is_empty()
        {
            f(&String::from_utf8_lossy(&self.line));
            self.line.clear();
        }
    }
}

fn append_capped(buf: &mut Vec<u8>, more: &[u8]) {
    buf.extend_from_slice(more);
    if buf.len() > OUTPUT_LIMIT {
        buf.drain(..buf.len() - OUTPUT_LIMIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, deadline: Duration, interrupt: &Interrupt) -> Result<Output, CommandError> {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script]);
        output(cmd, Options { interrupt, ..Options::new(deadline) })
    }

    #[test]
    fn output_status_and_stdin_come_back() {
        let out =
            run("/bin/sh", &["-c", "cat; echo oops >&2; exit 3"], Some(b"hello\n"), Duration::from_secs(10)).unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"hello\n");
        assert_eq!(out.stderr, b"oops\n");
    }

    #[test]
    fn a_grandchild_holding_the_pipe_does_not_outlast_the_deadline() {
        let interrupt = Interrupt::new();
        let t0 = Instant::now();
        // The grandchild keeps stdout and stderr open, as git-remote-http does after git dies.
        let e = sh("sleep 30 & echo started >&2; sleep 30", Duration::from_millis(500), &interrupt).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(3), "took {:?}", t0.elapsed());
        match e {
            CommandError::TimedOut { stderr, .. } => assert_eq!(stderr, "started\n"),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn what_the_leader_leaves_in_its_group_is_killed_when_it_exits() {
        let interrupt = Interrupt::new();
        let t0 = Instant::now();
        let out = sh("sleep 30 & echo $!", Duration::from_secs(10), &interrupt).unwrap();
        assert!(t0.elapsed() < Duration::from_secs(3), "took {:?}", t0.elapsed());
        let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(stat.is_empty() || stat.contains(") Z"), "the background sleep survived: {stat}");
    }

    #[test]
    fn a_stop_request_kills_a_running_command_at_once_and_starts_no_new_one() {
        let interrupt = std::sync::Arc::new(Interrupt::new());
        let i = interrupt.clone();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            i.request();
        });
        let t0 = Instant::now();
        let e = sh("sleep 30", Duration::from_secs(30), &interrupt).unwrap_err();
        assert!(matches!(e, CommandError::Interrupted { .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(2), "took {:?}", t0.elapsed());
        stopper.join().unwrap();
        assert!(matches!(sh("true", Duration::from_secs(5), &interrupt), Err(CommandError::Interrupted { .. })));
    }

    #[test]
    fn stderr_lines_are_split_at_carriage_returns_too() {
        let interrupt = Interrupt::new();
        let mut lines = Vec::new();
        let mut f = |l: &str| lines.push(l.to_string());
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "printf 'a 10%%\\ra 100%%\\nb\\n' >&2; printf tail >&2"]);
        output(
            cmd,
            Options { on_stderr_line: Some(&mut f), interrupt: &interrupt, ..Options::new(Duration::from_secs(5)) },
        )
        .unwrap();
        assert_eq!(lines, ["a 10%", "a 100%", "b", "tail"]);
    }

    #[test]
    fn a_missing_program_is_a_spawn_error_naming_it() {
        let e = run("/no/such/program", &[], None, Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.to_string(), "cannot run `/no/such/program`");
        assert!(matches!(e, CommandError::Spawn { .. }));
    }
}
