//! Directories opened one component at a time without following a symlink, and bind mounts
//! made between such descriptors: for root working in directories the agent can write (a
//! volume it fills, its home), where a path checked first and used later could be repointed in
//! between, and a symlink anywhere would make root act on a place the agent chose.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path};

use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, fstat, mkdirat};

/// The owner and mode a directory gets when [`Walk`] creates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewDir {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// A directory opened without following symlinks, with what `fstat` says of it.
#[derive(Debug)]
pub struct Dir {
    pub fd: OwnedFd,
    pub uid: u32,
    pub mode: u32,
}

const DIR_FLAGS: OFlag = OFlag::O_DIRECTORY.union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC).union(OFlag::O_RDONLY);

fn describe(e: nix::errno::Errno, parent: &Dir, name: &OsStr) -> io::Error {
    let shown = name.to_string_lossy();
    // O_NOFOLLOW on a symlink is ELOOP, unless O_DIRECTORY refused it first with ENOTDIR, as it
    // does for anything not a directory (open(2)): lstat tells which.
    let symlink = || {
        nix::sys::stat::fstatat(parent.fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
    };
    match e {
        nix::errno::Errno::ELOOP => io::Error::other(format!("`{shown}` is a symlink")),
        nix::errno::Errno::ENOTDIR if symlink() => io::Error::other(format!("`{shown}` is a symlink")),
        nix::errno::Errno::ENOTDIR => io::Error::other(format!("`{shown}` is not a directory")),
        e => io::Error::from(e),
    }
}

fn stat_dir(fd: OwnedFd) -> io::Result<Dir> {
    let st = fstat(fd.as_fd())?;
    Ok(Dir { fd, uid: st.st_uid, mode: st.st_mode & 0o7777 })
}

/// Opens the absolute `path` from `/`, one component at a time, refusing a symlink at every
/// step (`..` and `.` are refused too).
pub fn open_abs(path: &Path) -> io::Result<Dir> {
    let root = nix::fcntl::open("/", DIR_FLAGS, Mode::empty())?;
    let rel = path.strip_prefix("/").map_err(|_| io::Error::other(format!("{} is not absolute", path.display())))?;
    open_below(stat_dir(root)?, rel, None)
}

/// Opens `rel` below `dir`, one component at a time, refusing a symlink at every step. A
/// missing component is created with `create`'s owner and mode when given (mkdirat, then
/// fchown on the opened descriptor, so the new directory is never reached by name twice).
pub fn open_below(dir: Dir, rel: &Path, create: Option<NewDir>) -> io::Result<Dir> {
    let mut dir = dir;
    for c in rel.components() {
        let Component::Normal(name) = c else {
            return Err(io::Error::other(format!("`{}` has a `..`, `.` or root component", rel.display())));
        };
        dir = open_child(&dir, name, create)?;
    }
    Ok(dir)
}

/// Opens (or creates, see [`open_below`]) the directory `name` in `dir`.
pub fn open_child(dir: &Dir, name: &OsStr, create: Option<NewDir>) -> io::Result<Dir> {
    match openat(dir.fd.as_fd(), name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => stat_dir(fd),
        Err(nix::errno::Errno::ENOENT) if create.is_some() => make_child(dir, name, create.expect("checked")),
        Err(e) => Err(describe(e, dir, name)),
    }
}

/// Creates the directory `name` in `dir` with `new`'s owner and mode, after an open found it
/// missing.
fn make_child(dir: &Dir, name: &OsStr, new: NewDir) -> io::Result<Dir> {
    match mkdirat(dir.fd.as_fd(), name, Mode::from_bits_truncate(new.mode)) {
        Ok(()) => {}
        // Someone else made it between our open and our mkdir: open what is there and let the
        // caller judge its owner. Chowning it would make a directory the agent planted look
        // like one root made (the check persist's root_dir relies on).
        Err(nix::errno::Errno::EEXIST) => {
            let fd = openat(dir.fd.as_fd(), name, DIR_FLAGS, Mode::empty()).map_err(|e| describe(e, dir, name))?;
            return stat_dir(fd);
        }
        Err(e) => return Err(describe(e, dir, name)),
    }
    let fd = openat(dir.fd.as_fd(), name, DIR_FLAGS, Mode::empty()).map_err(|e| describe(e, dir, name))?;
    nix::unistd::fchown(fd.as_fd(), Some(new.uid.into()), Some(new.gid.into()))?;
    // mkdirat's mode went through the umask.
    nix::sys::stat::fchmod(fd.as_fd(), Mode::from_bits_truncate(new.mode))?;
    stat_dir(fd)
}

/// Gives the opened directory to `uid:gid` with `mode`, through its descriptor.
pub fn set_owner(dir: &Dir, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    nix::unistd::fchown(dir.fd.as_fd(), Some(uid.into()), Some(gid.into()))?;
    nix::sys::stat::fchmod(dir.fd.as_fd(), Mode::from_bits_truncate(mode))?;
    Ok(())
}

/// Bind-mounts the directory `source` on the directory `target`, both named by their open
/// descriptors through /proc/self/fd (proc(5)): mount(2) resolves those magic links to the
/// very directories opened, so no name is looked up again between the checks and the mount.
pub fn bind_dirs(source: &Dir, target: &Dir) -> io::Result<()> {
    let src = format!("/proc/self/fd/{}", source.fd.as_raw_fd());
    let dst = format!("/proc/self/fd/{}", target.fd.as_raw_fd());
    nix::mount::mount(Some(src.as_str()), dst.as_str(), None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_directory_someone_else_made_in_the_race_window_keeps_its_owner() {
        let me = nix::unistd::geteuid().as_raw();
        let tmp = std::env::temp_dir().join(format!("cordon-nofollow-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(tmp.join("planted")).unwrap();
        // As root, the planter is another uid; otherwise it is this test's own uid, and the
        // chown to root that must not happen would fail with EPERM instead.
        let planter = if me == 0 { 1000 } else { me };
        std::os::unix::fs::chown(tmp.join("planted"), Some(planter), Some(planter)).unwrap();
        let parent = open_abs(&tmp).unwrap();
        // The agent's mkdir landed between open_child's ENOENT and its mkdirat.
        let roots = NewDir { uid: 0, gid: 0, mode: 0o755 };
        let dir = make_child(&parent, OsStr::new("planted"), roots).unwrap();
        assert_eq!(dir.uid, planter, "the caller sees the planter's uid");
        assert_eq!(std::fs::metadata(tmp.join("planted")).unwrap().uid(), planter, "not chowned to root");
        // Positive control: a directory nobody made is created with the owner and mode asked.
        let mine = NewDir { uid: me, gid: nix::unistd::getegid().as_raw(), mode: 0o750 };
        let made = open_child(&parent, OsStr::new("new"), Some(mine)).unwrap();
        assert_eq!((made.uid, made.mode), (me, 0o750));
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
