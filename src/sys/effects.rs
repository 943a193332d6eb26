//! The seam for effects, in the manner of youki's `Syscall`: the mounts, file changes and
//! commands of the `state`, `filesystem`, `firewall` and `readonly_root` stages go through
//! [`Effects`], passed in explicitly (`&dyn Effects`). The boot passes [`Host`], which does
//! them for real; unit tests pass a [`Recorder`], which records each call as a typed [`Call`],
//! answers from a script and fails where told, so each stage's exact sequence of effects and
//! each failure's error and fix are tested without root. The namespace tests
//! (`tests/filesystem.rs`, `tests/netfilter.rs`, `tests/egress.rs`) prove the real effects.
//!
//! The seam is narrow on purpose: only what those stages do. The commands run as the agent
//! (git for the clone, tmux, the readiness probes) stay outside it: they are built as a
//! `Command` with a `pre_exec` that drops privileges or resets signals, and stream their stderr,
//! which a `run(program, args, stdin)` cannot express.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use nix::mount::MsFlags;

use super::command::CommandError;

/// What kind of file a path is, as `stat` or `lstat` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// The parts of a file's metadata the stages check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileInfo {
    pub kind: FileKind,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits with setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
}

impl FileInfo {
    fn of(meta: &std::fs::Metadata) -> FileInfo {
        let t = meta.file_type();
        let kind = if t.is_symlink() {
            FileKind::Symlink
        } else if t.is_dir() {
            FileKind::Dir
        } else if t.is_file() {
            FileKind::File
        } else {
            FileKind::Other
        };
        FileInfo { kind, uid: meta.uid(), gid: meta.gid(), mode: meta.mode() & 0o7777 }
    }
}

/// Every effect of the stages that go through the seam.
pub trait Effects: Send + Sync {
    /// `/proc/self/mountinfo` (proc(5)), as text.
    fn read_mountinfo(&self) -> io::Result<String>;
    /// `stat(2)`: follows symlinks.
    fn stat(&self, path: &Path) -> io::Result<FileInfo>;
    /// `lstat(2)`: the link itself.
    fn lstat(&self, path: &Path) -> io::Result<FileInfo>;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Mounts a new tmpfs at `path` with per-mount `flags` and superblock options `data`.
    fn mount_tmpfs(&self, path: &Path, flags: MsFlags, data: &str) -> nix::Result<()>;
    /// Changes the per-mount flags of the mount at `path` (`flags` carries `MS_REMOUNT`, and
    /// `MS_BIND` for a per-mount change).
    fn remount(&self, path: &Path, flags: MsFlags) -> nix::Result<()>;
    /// `chown(2)`: follows symlinks.
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()>;
    /// `lchown(2)`: the link itself.
    fn lchown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()>;
    fn chmod(&self, path: &Path, mode: u32) -> io::Result<()>;
    /// Creates `path -> target`.
    fn symlink(&self, target: &Path, path: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Whether the filesystem at `dir` accepts a new file ([`super::write_probe`]).
    fn write_probe(&self, dir: &Path) -> io::Result<()>;
    /// Runs `program args` as root with `stdin` within `deadline` ([`super::command::run`]).
    /// Any exit status is an `Ok`; the caller judges it.
    fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
        deadline: Duration,
    ) -> Result<Output, CommandError>;
}

/// The real system.
#[derive(Debug, Clone, Copy, Default)]
pub struct Host;

impl Effects for Host {
    fn read_mountinfo(&self) -> io::Result<String> {
        std::fs::read_to_string("/proc/self/mountinfo")
    }

    fn stat(&self, path: &Path) -> io::Result<FileInfo> {
        std::fs::metadata(path).map(|m| FileInfo::of(&m))
    }

    fn lstat(&self, path: &Path) -> io::Result<FileInfo> {
        std::fs::symlink_metadata(path).map(|m| FileInfo::of(&m))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn mount_tmpfs(&self, path: &Path, flags: MsFlags, data: &str) -> nix::Result<()> {
        nix::mount::mount(Some("tmpfs"), path, Some("tmpfs"), flags, Some(data))
    }

    fn remount(&self, path: &Path, flags: MsFlags) -> nix::Result<()> {
        nix::mount::mount(None::<&str>, path, None::<&str>, flags, None::<&str>)
    }

    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
    }

    fn lchown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
    }

    fn chmod(&self, path: &Path, mode: u32) -> io::Result<()> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }

    fn symlink(&self, target: &Path, path: &Path) -> io::Result<()> {
        std::os::unix::fs::symlink(target, path)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn write_probe(&self, dir: &Path) -> io::Result<()> {
        super::write_probe(dir)
    }

    fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
        deadline: Duration,
    ) -> Result<Output, CommandError> {
        super::command::run(program, args, stdin, deadline)
    }
}

#[cfg(test)]
pub use recorder::{Call, Fault, Recorder};

#[cfg(test)]
mod recorder {
    use std::collections::{HashMap, VecDeque};
    use std::io;
    use std::os::unix::process::ExitStatusExt;
    use std::path::{Path, PathBuf};
    use std::process::{ExitStatus, Output};
    use std::sync::Mutex;
    use std::time::Duration;

    use nix::errno::Errno;
    use nix::mount::MsFlags;

    use super::{Effects, FileInfo, FileKind};
    use crate::sys::command::CommandError;

    /// One call through the seam, as the [`Recorder`] saw it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        ReadMountinfo,
        Stat {
            path: PathBuf,
        },
        Lstat {
            path: PathBuf,
        },
        CreateDirAll {
            path: PathBuf,
        },
        MountTmpfs {
            path: PathBuf,
            flags: MsFlags,
            data: String,
        },
        Remount {
            path: PathBuf,
            flags: MsFlags,
        },
        Chown {
            path: PathBuf,
            uid: u32,
            gid: u32,
        },
        Lchown {
            path: PathBuf,
            uid: u32,
            gid: u32,
        },
        Chmod {
            path: PathBuf,
            mode: u32,
        },
        Symlink {
            target: PathBuf,
            path: PathBuf,
        },
        RemoveFile {
            path: PathBuf,
        },
        WriteProbe {
            dir: PathBuf,
        },
        /// `stdin` as text (lossy): the ipset and iptables-restore scripts.
        Run {
            program: String,
            args: Vec<String>,
            stdin: Option<String>,
        },
    }

    impl Call {
        /// Reads that change nothing: left out of [`Recorder::changes`].
        fn is_read(&self) -> bool {
            matches!(self, Call::ReadMountinfo | Call::Stat { .. } | Call::Lstat { .. })
        }

        /// `program args...` of a `Run`, for matching and for reading a sequence of commands.
        pub fn command_line(&self) -> Option<String> {
            match self {
                Call::Run { program, args, .. } => {
                    Some(std::iter::once(program).chain(args).cloned().collect::<Vec<_>>().join(" "))
                }
                _ => None,
            }
        }
    }

    /// A failure to inject.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Fault {
        /// The call fails with this errno (for `run`: the program cannot be started).
        Errno(Errno),
        /// `run` only: the program runs and exits with `code`, writing `stderr`.
        Exit { code: i32, stderr: String },
    }

    impl Fault {
        fn io(&self) -> io::Error {
            match self {
                Fault::Errno(e) => io::Error::from_raw_os_error(*e as i32),
                Fault::Exit { .. } => panic!("Fault::Exit only applies to run, not to {self:?}"),
            }
        }

        fn errno(&self) -> Errno {
            match self {
                Fault::Errno(e) => *e,
                Fault::Exit { .. } => panic!("Fault::Exit only applies to run, not to {self:?}"),
            }
        }
    }

    type Matcher = Box<dyn Fn(&Call) -> bool + Send + Sync>;

    struct Injected {
        /// Which calls: by index in the whole sequence, or by a predicate (every match).
        matches: Matcher,
        fault: Fault,
    }

    /// Records every call, fails the ones it was told to, and answers reads from a script:
    /// mountinfo texts in order (the last repeats), scripted stdout per command line (the
    /// last repeats; unscripted commands succeed with no output), and a small table of files
    /// that `create_dir_all`, `chown`, `chmod`, `symlink` and tmpfs mounts (their `uid=`,
    /// `gid=` and `mode=`, as the kernel does) keep up to date.
    #[derive(Default)]
    pub struct Recorder {
        calls: Mutex<Vec<Call>>,
        failures: Mutex<Vec<Injected>>,
        mountinfo: Mutex<VecDeque<String>>,
        outputs: Mutex<HashMap<String, VecDeque<String>>>,
        files: Mutex<HashMap<PathBuf, FileInfo>>,
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next scripted answer: the front, which stays when it is the last.
    fn next(queue: &mut VecDeque<String>) -> Option<String> {
        if queue.len() > 1 { queue.pop_front() } else { queue.front().cloned() }
    }

    impl Recorder {
        pub fn new() -> Recorder {
            Recorder::default()
        }

        /// What successive reads of mountinfo return, in order; the last repeats.
        pub fn mountinfo<'a>(&self, texts: impl IntoIterator<Item = &'a str>) -> &Self {
            lock(&self.mountinfo).extend(texts.into_iter().map(String::from));
            self
        }

        /// A file that exists before the stage runs.
        pub fn file(&self, path: &str, kind: FileKind, uid: u32, gid: u32, mode: u32) -> &Self {
            lock(&self.files).insert(path.into(), FileInfo { kind, uid, gid, mode });
            self
        }

        /// What `command_line` (`program args...`) prints, one more answer per call; the last
        /// repeats.
        pub fn output(&self, command_line: &str, stdout: &str) -> &Self {
            lock(&self.outputs).entry(command_line.into()).or_default().push_back(stdout.into());
            self
        }

        /// The `n`th call (from 0, reads included) fails.
        pub fn fail_call(&self, n: usize, fault: Fault) -> &Self {
            let seen = std::sync::atomic::AtomicUsize::new(0);
            let matches = Box::new(move |_: &Call| seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == n);
            lock(&self.failures).push(Injected { matches, fault });
            self
        }

        /// Every call `matches` accepts fails.
        pub fn fail_when(&self, matches: impl Fn(&Call) -> bool + Send + Sync + 'static, fault: Fault) -> &Self {
            lock(&self.failures).push(Injected { matches: Box::new(matches), fault });
            self
        }

        /// Every run of a command line that starts with `prefix` exits 1 with `stderr`.
        pub fn fail_run(&self, prefix: &str, stderr: &str) -> &Self {
            let prefix = prefix.to_string();
            self.fail_when(
                move |c| c.command_line().is_some_and(|l| l.starts_with(&prefix)),
                Fault::Exit { code: 1, stderr: stderr.into() },
            )
        }

        /// Every call, in order.
        pub fn calls(&self) -> Vec<Call> {
            lock(&self.calls).clone()
        }

        /// Every call but the reads of mountinfo and file metadata: what was done.
        pub fn changes(&self) -> Vec<Call> {
            self.calls().into_iter().filter(|c| !c.is_read()).collect()
        }

        /// The command lines run, in order.
        pub fn commands(&self) -> Vec<String> {
            self.calls().iter().filter_map(Call::command_line).collect()
        }

        /// Records `call` and returns the fault injected for it, if any. Every matcher sees
        /// every call, so a by-index matcher counts them all.
        fn record(&self, call: Call) -> Option<Fault> {
            let fault = lock(&self.failures)
                .iter()
                .map(|f| ((f.matches)(&call), &f.fault))
                .fold(None, |found, (hit, fault)| found.or(hit.then(|| fault.clone())));
            lock(&self.calls).push(call);
            fault
        }

        fn check(&self, call: Call) -> io::Result<()> {
            match self.record(call) {
                Some(fault) => Err(fault.io()),
                None => Ok(()),
            }
        }

        fn update(&self, path: &Path, f: impl FnOnce(&mut FileInfo)) -> io::Result<()> {
            match lock(&self.files).get_mut(path) {
                Some(info) => {
                    f(info);
                    Ok(())
                }
                None => Err(io::Error::from_raw_os_error(libc::ENOENT)),
            }
        }

        fn lookup(&self, path: &Path) -> io::Result<FileInfo> {
            lock(&self.files).get(path).copied().ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
        }
    }

    impl Effects for Recorder {
        fn read_mountinfo(&self) -> io::Result<String> {
            self.check(Call::ReadMountinfo)?;
            Ok(next(&mut lock(&self.mountinfo)).unwrap_or_default())
        }

        fn stat(&self, path: &Path) -> io::Result<FileInfo> {
            self.check(Call::Stat { path: path.into() })?;
            self.lookup(path)
        }

        fn lstat(&self, path: &Path) -> io::Result<FileInfo> {
            self.check(Call::Lstat { path: path.into() })?;
            self.lookup(path)
        }

        fn create_dir_all(&self, path: &Path) -> io::Result<()> {
            self.check(Call::CreateDirAll { path: path.into() })?;
            let mut files = lock(&self.files);
            for dir in path.ancestors() {
                files.entry(dir.into()).or_insert(FileInfo { kind: FileKind::Dir, uid: 0, gid: 0, mode: 0o755 });
            }
            Ok(())
        }

        fn mount_tmpfs(&self, path: &Path, flags: MsFlags, data: &str) -> nix::Result<()> {
            if let Some(fault) = self.record(Call::MountTmpfs { path: path.into(), flags, data: data.into() }) {
                return Err(fault.errno());
            }
            // The kernel gives the new tmpfs's root the owner and mode of the options.
            let mut root = FileInfo { kind: FileKind::Dir, uid: 0, gid: 0, mode: 0o1777 };
            for option in data.split(',') {
                match option.split_once('=') {
                    Some(("uid", v)) => root.uid = v.parse().unwrap_or(0),
                    Some(("gid", v)) => root.gid = v.parse().unwrap_or(0),
                    Some(("mode", v)) => root.mode = u32::from_str_radix(v, 8).unwrap_or(0o1777),
                    _ => {}
                }
            }
            lock(&self.files).insert(path.into(), root);
            Ok(())
        }

        fn remount(&self, path: &Path, flags: MsFlags) -> nix::Result<()> {
            match self.record(Call::Remount { path: path.into(), flags }) {
                Some(fault) => Err(fault.errno()),
                None => Ok(()),
            }
        }

        fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
            self.check(Call::Chown { path: path.into(), uid, gid })?;
            self.update(path, |f| (f.uid, f.gid) = (uid, gid))
        }

        fn lchown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
            self.check(Call::Lchown { path: path.into(), uid, gid })?;
            self.update(path, |f| (f.uid, f.gid) = (uid, gid))
        }

        fn chmod(&self, path: &Path, mode: u32) -> io::Result<()> {
            self.check(Call::Chmod { path: path.into(), mode })?;
            self.update(path, |f| f.mode = mode & 0o7777)
        }

        fn symlink(&self, target: &Path, path: &Path) -> io::Result<()> {
            self.check(Call::Symlink { target: target.into(), path: path.into() })?;
            lock(&self.files).insert(path.into(), FileInfo { kind: FileKind::Symlink, uid: 0, gid: 0, mode: 0o777 });
            Ok(())
        }

        fn remove_file(&self, path: &Path) -> io::Result<()> {
            self.check(Call::RemoveFile { path: path.into() })?;
            lock(&self.files).remove(path).map(drop).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
        }

        fn write_probe(&self, dir: &Path) -> io::Result<()> {
            self.check(Call::WriteProbe { dir: dir.into() })
        }

        fn run(
            &self,
            program: &str,
            args: &[&str],
            stdin: Option<&[u8]>,
            _deadline: Duration,
        ) -> Result<Output, CommandError> {
            let call = Call::Run {
                program: program.into(),
                args: args.iter().map(|a| a.to_string()).collect(),
                stdin: stdin.map(|s| String::from_utf8_lossy(s).into_owned()),
            };
            let line = call.command_line().unwrap_or_default();
            let output = |code: i32, stdout: String, stderr: String| Output {
                status: ExitStatus::from_raw(code << 8),
                stdout: stdout.into_bytes(),
                stderr: stderr.into_bytes(),
            };
            match self.record(call) {
                Some(Fault::Errno(e)) => {
                    Err(CommandError::Spawn { program: program.into(), source: io::Error::from_raw_os_error(e as i32) })
                }
                Some(Fault::Exit { code, stderr }) => Ok(output(code, String::new(), stderr)),
                None => {
                    let stdout = lock(&self.outputs).get_mut(&line).and_then(next).unwrap_or_default();
                    Ok(output(0, stdout, String::new()))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use nix::errno::Errno;

    use super::*;

    #[test]
    fn the_recorder_fails_the_nth_call_and_repeats_the_last_scripted_answer() {
        let rec = Recorder::new();
        rec.output("ipset list -n", "a\n").output("ipset list -n", "b\n").fail_call(1, Fault::Errno(Errno::EIO));
        let run = || rec.run("ipset", &["list", "-n"], None, Duration::from_secs(1));
        assert_eq!(run().unwrap().stdout, b"a\n");
        assert!(matches!(run(), Err(CommandError::Spawn { .. })), "the second call fails");
        assert_eq!(run().unwrap().stdout, b"b\n");
        assert_eq!(run().unwrap().stdout, b"b\n");
        assert_eq!(rec.commands(), ["ipset list -n"; 4]);
        rec.fail_run("ipset", "nope");
        let out = run().unwrap();
        assert_eq!((out.status.code(), out.stderr.as_slice()), (Some(1), b"nope".as_slice()));
    }

    #[test]
    fn the_recorder_keeps_owner_and_mode_as_chown_chmod_and_tmpfs_options_set_them() {
        let rec = Recorder::new();
        rec.create_dir_all(Path::new("/a/b")).unwrap();
        assert_eq!(rec.stat(Path::new("/a")).unwrap().kind, FileKind::Dir);
        rec.chown(Path::new("/a/b"), 7, 8).unwrap();
        rec.chmod(Path::new("/a/b"), 0o700).unwrap();
        assert_eq!(rec.stat(Path::new("/a/b")).unwrap(), FileInfo { kind: FileKind::Dir, uid: 7, gid: 8, mode: 0o700 });
        rec.mount_tmpfs(Path::new("/a/b"), MsFlags::empty(), "size=1m,mode=1777,uid=1,gid=2").unwrap();
        assert_eq!(
            rec.stat(Path::new("/a/b")).unwrap(),
            FileInfo { kind: FileKind::Dir, uid: 1, gid: 2, mode: 0o1777 }
        );
        assert_eq!(rec.lstat(Path::new("/nope")).unwrap_err().raw_os_error(), Some(libc::ENOENT));
        assert_eq!(rec.changes().len(), 4, "{:?}", rec.calls());
    }
}
