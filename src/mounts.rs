//! Filesystem lockdown: tmpfs mounts (or verification of the runtime's), symlinks the tmpfs
//! hid, the state directory, and the read-only root. Each part is a plan built from
//! `/proc/self/mountinfo` and the configuration (pure, table-tested), then applied in one place.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use crate::sys::effects::{Effects, FileKind};

/// One line of `/proc/self/mountinfo` (proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub mount_point: PathBuf,
    /// Per-mount options: `rw`/`ro`, `nosuid`, `nodev`, `noexec`, atime flags.
    pub options: Vec<String>,
    pub fstype: String,
    /// Superblock options, e.g. tmpfs `size=` and `mode=`.
    pub super_options: Vec<String>,
}

impl MountInfo {
    pub fn has(&self, option: &str) -> bool {
        self.options.iter().any(|o| o == option)
    }

    pub fn read_only(&self) -> bool {
        self.has("ro")
    }

    /// The tmpfs size in bytes, when the superblock states one.
    pub fn tmpfs_size(&self) -> Option<u64> {
        let v = self.super_options.iter().find_map(|o| o.strip_prefix("size="))?;
        let (digits, shift) = match v.as_bytes().last()? {
            b'k' | b'K' => (&v[..v.len() - 1], 10),
            b'm' | b'M' => (&v[..v.len() - 1], 20),
            b'g' | b'G' => (&v[..v.len() - 1], 30),
            _ => (v, 0),
        };
        digits.parse::<u64>().ok().map(|n| n << shift)
    }

    /// Per-mount flags that a bind remount must carry over: in a user namespace or a container
    /// they can be locked, and dropping one makes the remount fail with EPERM.
    fn kept_flags(&self) -> MsFlags {
        let mut flags = MsFlags::empty();
        for (name, flag) in [
            ("nosuid", MsFlags::MS_NOSUID),
            ("nodev", MsFlags::MS_NODEV),
            ("noexec", MsFlags::MS_NOEXEC),
            ("noatime", MsFlags::MS_NOATIME),
            ("nodiratime", MsFlags::MS_NODIRATIME),
            ("relatime", MsFlags::MS_RELATIME),
            ("strictatime", MsFlags::MS_STRICTATIME),
        ] {
            if self.has(name) {
                flags |= flag;
            }
        }
        flags
    }
}

/// Decodes the octal escapes (`\040` for a space) the kernel uses in mountinfo paths.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(MountInfo {
                mount_point: PathBuf::from(unescape(l.get(4)?)),
                options: l.get(5)?.split(',').map(String::from).collect(),
                fstype: r.first()?.to_string(),
                super_options: r.get(2).map(|o| o.split(',').map(String::from).collect()).unwrap_or_default(),
            })
        })
        .collect()
}

pub fn read_mountinfo(sys: &dyn Effects) -> io::Result<Vec<MountInfo>> {
    Ok(parse_mountinfo(&sys.read_mountinfo()?))
}

/// The mount that `path` is on: the last (topmost) mount whose mount point is its longest
/// prefix.
pub fn mount_of<'a>(mounts: &'a [MountInfo], path: &Path) -> Option<&'a MountInfo> {
    mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| path.starts_with(&m.mount_point))
        .max_by_key(|(i, m)| (m.mount_point.components().count(), *i))
        .map(|(_, m)| m)
}

/// The topmost mount exactly at `path`.
pub fn mount_at<'a>(mounts: &'a [MountInfo], path: &Path) -> Option<&'a MountInfo> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

/// A tmpfs as configured, with owner resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TmpfsSpec {
    pub path: PathBuf,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TmpfsStep {
    /// Nothing is mounted there: mount a tmpfs.
    Mount(TmpfsSpec),
    /// The runtime already provides a tmpfs there: verify it and set owner and mode, adding
    /// `nosuid`/`nodev` where they are missing.
    Adopt { spec: TmpfsSpec, missing: Vec<&'static str>, size: Option<u64> },
}

impl fmt::Display for TmpfsStep {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            TmpfsStep::Mount(s) => write!(
                f,
                "mount tmpfs {} size={} mode={:04o} uid={} gid={} nosuid,nodev",
                s.path.display(),
                s.size,
                s.mode,
                s.uid,
                s.gid
            ),
            TmpfsStep::Adopt { spec: s, .. } => write!(
                f,
                "verify runtime tmpfs {} and set mode={:04o} uid={} gid={}",
                s.path.display(),
                s.mode,
                s.uid,
                s.gid
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{path} is already a {fstype} mount, not a tmpfs")]
    NotTmpfs { path: PathBuf, fstype: String },
    #[error("the runtime's tmpfs at {path} is read-only")]
    ReadOnlyTmpfs { path: PathBuf },
    #[error("failed to create directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to mount tmpfs at {path}")]
    MountTmpfs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("failed to set owner and mode of {path}")]
    Chown {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("tmpfs at {path} did not come up as expected: {what}")]
    Verify { path: PathBuf, what: String },
    #[error("failed to create symlink {path} -> {target}")]
    Symlink {
        path: PathBuf,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} exists and is not a symlink; refusing to replace it")]
    LinkOccupied { path: PathBuf },
    #[error("failed to read /proc/self/mountinfo")]
    Mountinfo(#[source] io::Error),
    #[error("failed to remount {path} read-only")]
    Remount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{path} is still writable after the read-only remount")]
    StillWritable { path: PathBuf },
    #[error("a write to / did not fail with EROFS: {0}")]
    RootWritable(String),
}

impl crate::fix::Fix for FsError {
    fn fix(&self) -> Option<String> {
        self.hint()
    }
}

impl FsError {
    /// What the operator can do about it.
    pub fn hint(&self) -> Option<String> {
        let perm = |e: &nix::Error| *e == nix::Error::EPERM;
        match self {
            FsError::Remount { source, path } if perm(source) => Some(format!(
                "remounting {} read-only needs CAP_SYS_ADMIN: run with --cap-add SYS_ADMIN, or let the runtime make the \
                 root read-only (docker --read-only, Kubernetes readOnlyRootFilesystem: true)",
                path.display()
            )),
            FsError::MountTmpfs { source, path } if perm(source) => Some(format!(
                "mounting needs CAP_SYS_ADMIN: run the container with --cap-add SYS_ADMIN (and an AppArmor profile that \
                 allows mounts), or let the runtime provide the mounts (docker --read-only --tmpfs {}:size=...,mode=...) \
                 and cordon will verify them instead",
                path.display()
            )),
            FsError::CreateDir { path, .. } => Some(format!(
                "the directory cannot be created (read-only image?): create {} in the image, or provide it from the runtime",
                path.display()
            )),
            FsError::NotTmpfs { path, .. } => Some(format!(
                "remove {} from [[tmpfs]] if the mount there (a volume?) is intended, and list it in filesystem.writable",
                path.display()
            )),
            FsError::ReadOnlyTmpfs { path } => Some(format!("mount {} read-write in the runtime", path.display())),
            _ => None,
        }
    }
}

/// Decides, per configured tmpfs, whether to mount or to adopt the runtime's.
pub fn plan_tmpfs(specs: Vec<TmpfsSpec>, mounts: &[MountInfo]) -> Result<Vec<TmpfsStep>, FsError> {
    specs
        .into_iter()
        .map(|spec| match mount_at(mounts, &spec.path) {
            None => Ok(TmpfsStep::Mount(spec)),
            Some(m) if m.fstype != "tmpfs" => Err(FsError::NotTmpfs { path: spec.path, fstype: m.fstype.clone() }),
            Some(m) if m.read_only() => Err(FsError::ReadOnlyTmpfs { path: spec.path }),
            Some(m) => Ok(TmpfsStep::Adopt {
                missing: ["nosuid", "nodev"].into_iter().filter(|o| !m.has(o)).collect(),
                size: m.tmpfs_size(),
                spec,
            }),
        })
        .collect()
}

/// Applies the tmpfs plan. Returns warnings (defence-in-depth flags that could not be added to
/// a runtime's tmpfs).
pub fn apply_tmpfs(steps: &[TmpfsStep], sys: &dyn Effects) -> Result<Vec<String>, FsError> {
    let mut warnings = Vec::new();
    for step in steps {
        match step {
            TmpfsStep::Mount(s) => {
                sys.create_dir_all(&s.path).map_err(|source| FsError::CreateDir { path: s.path.clone(), source })?;
                let data = format!("size={},mode={:o},uid={},gid={}", s.size, s.mode, s.uid, s.gid);
                sys.mount_tmpfs(&s.path, MsFlags::MS_NOSUID | MsFlags::MS_NODEV, &data)
                    .map_err(|source| FsError::MountTmpfs { path: s.path.clone(), source })?;
            }
            TmpfsStep::Adopt { spec: s, missing, .. } => {
                if !missing.is_empty() {
                    let mounts = read_mountinfo(sys).map_err(FsError::Mountinfo)?;
                    let kept = mount_at(&mounts, &s.path).map(MountInfo::kept_flags).unwrap_or(MsFlags::empty());
                    let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | kept | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
                    if let Err(e) = sys.remount(&s.path, flags) {
                        warnings.push(format!(
                            "the runtime's tmpfs at {} lacks {} and cannot be remounted with it ({e}); \
                             add the options in the runtime (e.g. --tmpfs {}:nosuid,nodev)",
                            s.path.display(),
                            missing.join(","),
                            s.path.display()
                        ));
                    }
                }
                sys.chown(&s.path, s.uid, s.gid)
                    .and_then(|_| sys.chmod(&s.path, s.mode))
                    .map_err(|source| FsError::Chown { path: s.path.clone(), source })?;
            }
        }
    }
    verify_tmpfs(steps, &read_mountinfo(sys).map_err(FsError::Mountinfo)?, sys)?;
    Ok(warnings)
}

/// Checks that each tmpfs is in place with the configured owner and mode (and, for those cordon
/// mounted, size and nosuid,nodev).
fn verify_tmpfs(steps: &[TmpfsStep], mounts: &[MountInfo], sys: &dyn Effects) -> Result<(), FsError> {
    for step in steps {
        let (spec, ours) = match step {
            TmpfsStep::Mount(s) => (s, true),
            TmpfsStep::Adopt { spec, .. } => (spec, false),
        };
        let bad = |what: String| FsError::Verify { path: spec.path.clone(), what };
        let m = mount_at(mounts, &spec.path).ok_or_else(|| bad("no mount there".into()))?;
        if m.fstype != "tmpfs" || m.read_only() {
            return Err(bad(format!("{} {}", m.fstype, m.options.join(","))));
        }
        if ours && (!m.has("nosuid") || !m.has("nodev") || m.tmpfs_size() != Some(spec.size)) {
            return Err(bad(format!("options {} {}", m.options.join(","), m.super_options.join(","))));
        }
        let meta = sys.stat(&spec.path).map_err(|e| bad(e.to_string()))?;
        if meta.uid != spec.uid || meta.gid != spec.gid || meta.mode != spec.mode {
            return Err(bad(format!("owner {}:{} mode {:04o}", meta.uid, meta.gid, meta.mode)));
        }
    }
    Ok(())
}

/// Creates `path -> target`, replacing an existing symlink. Missing parent directories are
/// created owned like their nearest existing ancestor (on a tmpfs owned by the agent, the agent).
pub fn make_link(path: &Path, target: &Path, sys: &dyn Effects) -> Result<(), FsError> {
    let err = |source| FsError::Symlink { path: path.into(), target: target.into(), source };
    if let Some(parent) = path.parent() {
        let mut ancestor = parent;
        while sys.stat(ancestor).is_err() {
            ancestor = ancestor.parent().unwrap_or(Path::new("/"));
        }
        let meta = sys.stat(ancestor).map_err(err)?;
        sys.create_dir_all(parent).map_err(err)?;
        let mut dir = parent;
        while dir != ancestor {
            sys.chown(dir, meta.uid, meta.gid).map_err(err)?;
            dir = dir.parent().unwrap_or(ancestor);
        }
    }
    match sys.lstat(path) {
        Ok(m) if m.kind == FileKind::Symlink => sys.remove_file(path).map_err(err)?,
        Ok(_) => return Err(FsError::LinkOccupied { path: path.into() }),
        Err(_) => {}
    }
    sys.symlink(target, path).map_err(err)?;
    let owner = sys.stat(path.parent().unwrap_or(Path::new("/"))).map_err(err)?;
    sys.lchown(path, owner.uid, owner.gid).map_err(err)
}

/// Makes sure the state directory exists on a writable tmpfs that will survive the read-only
/// root: the runtime's (`/run` on Fly, `--tmpfs /run` in Docker) or a small one of cordon's.
///
/// Without the right to mount (no CAP_SYS_ADMIN, or an AppArmor profile that denies mounts)
/// on a root that is still writable, the directory stays on the root filesystem and a warning
/// is returned: the boot then fails at a later stage that needs the same right, and the state
/// directory is what lets `cordon status` and `cordon attach` say so.
pub fn prepare_state_dir(dir: &Path, sys: &dyn Effects) -> Result<Option<String>, FsError> {
    sys.create_dir_all(dir).map_err(|source| FsError::CreateDir { path: dir.into(), source })?;
    let mounts = read_mountinfo(sys).map_err(FsError::Mountinfo)?;
    let on_tmpfs = mount_of(&mounts, dir).is_some_and(|m| m.fstype == "tmpfs" && !m.read_only());
    let mut warning = None;
    if !on_tmpfs {
        // 16 MiB holds years of boot logs; the size cap keeps a runaway writer from eating RAM.
        let mounted =
            sys.mount_tmpfs(dir, MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, "size=16m,mode=755");
        match mounted {
            Ok(()) => {}
            Err(nix::Error::EPERM) => {
                warning = Some(format!(
                    "no permission to mount a tmpfs at {}, so it is a directory on the root filesystem; \
                     a read-only root needs that permission too",
                    dir.display()
                ))
            }
            Err(source) => return Err(FsError::MountTmpfs { path: dir.into(), source }),
        }
    }
    sys.chown(dir, 0, 0)
        .and_then(|_| sys.chmod(dir, 0o755))
        .map_err(|source| FsError::Chown { path: dir.into(), source })?;
    Ok(warning)
}

/// Filesystems that are memory, kernel interfaces or devices: never remounted read-only (their
/// writability is their purpose, or they are not "the root" at all).
const NOT_ROOT_FSTYPES: [&str; 18] = [
    "tmpfs",
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "mqueue",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "bpf",
    "pstore",
    "fusectl",
    "configfs",
    "hugetlbfs",
    "binfmt_misc",
    "nsfs",
];

/// Kernel interface trees left as they are.
const NOT_ROOT_TREES: [&str; 3] = ["/proc", "/sys", "/dev"];

/// One mount to make read-only, with the per-mount flags it keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemountRo {
    pub path: PathBuf,
    pub keep: MsFlags,
}

/// Every mount that is part of the root: on disk, not under a kernel tree, and not under a
/// path that stays writable (the tmpfs mounts, volumes, the state directory). A mount covered
/// by a later one at its own path or above it is unreachable and left alone (mountinfo lists
/// mounts in the order they were made). Mounts already read-only are left out.
pub fn plan_readonly(mounts: &[MountInfo], writable: &[PathBuf]) -> Vec<RemountRo> {
    let mut plan: Vec<RemountRo> = Vec::new();
    for (i, m) in mounts.iter().enumerate() {
        let shadowed = mounts[i + 1..].iter().any(|later| m.mount_point.starts_with(&later.mount_point));
        let exempt = NOT_ROOT_FSTYPES.contains(&m.fstype.as_str())
            || NOT_ROOT_TREES.iter().any(|t| m.mount_point.starts_with(t))
            || writable.iter().any(|w| m.mount_point.starts_with(w));
        if !shadowed && !exempt && !m.read_only() {
            plan.push(RemountRo { path: m.mount_point.clone(), keep: m.kept_flags() });
        }
    }
    plan
}

/// What the read-only remount did.
#[derive(Debug, Default)]
pub struct ReadonlyOutcome {
    pub remounted: Vec<RemountRo>,
    /// File bind mounts left writable, with why that is safe.
    pub warnings: Vec<String>,
}

/// Remounts each planned mount read-only with `MS_BIND|MS_REMOUNT|MS_RDONLY`, which changes
/// only this mount, never the superblock (a plain `remount,ro` of a bind-shared superblock
/// would make the host's root read-only too when run in a mount namespace).
///
/// Without CAP_SYS_ADMIN (the runtime made the root read-only: Docker `--read-only`, Kubernetes
/// `readOnlyRootFilesystem`) the runtime's own read-write file bind mounts (resolv.conf, hosts,
/// hostname) cannot be remounted; a regular file owned by root and writable by nobody else is
/// left as it is, with a warning, since the agent cannot write it. Anything else fails closed.
pub fn apply_readonly(plan: &[RemountRo], sys: &dyn Effects) -> Result<ReadonlyOutcome, FsError> {
    let mut outcome = ReadonlyOutcome::default();
    for r in plan {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | r.keep;
        match sys.remount(&r.path, flags) {
            Ok(()) => outcome.remounted.push(r.clone()),
            Err(nix::Error::EPERM) if root_only_file(&r.path, sys) => outcome.warnings.push(format!(
                "{} stays a writable bind mount of the runtime's (no CAP_SYS_ADMIN to remount it); it is a root-owned file \
                 nobody else may write",
                r.path.display()
            )),
            Err(source) => return Err(FsError::Remount { path: r.path.clone(), source }),
        }
    }
    Ok(outcome)
}

fn root_only_file(path: &Path, sys: &dyn Effects) -> bool {
    sys.stat(path).is_ok_and(|m| m.kind == FileKind::File && m.uid == 0 && m.mode & 0o022 == 0)
}

/// Proves the root is read-only: every planned mount shows `ro`, and creating a file in `/`
/// fails with EROFS.
pub fn verify_readonly(plan: &[RemountRo], sys: &dyn Effects) -> Result<(), FsError> {
    let mounts = read_mountinfo(sys).map_err(FsError::Mountinfo)?;
    for r in plan {
        if mount_at(&mounts, &r.path).is_none_or(|m| !m.read_only()) {
            return Err(FsError::StillWritable { path: r.path.clone() });
        }
    }
    match sys.write_probe(Path::new("/")) {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => Ok(()),
        Err(e) => Err(FsError::RootWritable(format!("it failed with {e} instead"))),
        Ok(()) => Err(FsError::RootWritable("it succeeded".into())),
    }
}

/// The boot's `filesystem` stage: a tmpfs for everything the agent writes (mounted, or the
/// runtime's adopted), then the configured links. Before anything is written there (credentials,
/// the clone), while the root can still take new mount points. Returns the tmpfs paths.
pub fn filesystem(
    config: &crate::config::Config,
    user: &crate::session::users::AgentUser,
    warn: &mut dyn FnMut(String),
    sys: &dyn Effects,
) -> crate::fix::StageResult<Vec<PathBuf>> {
    use crate::fix::Problem;
    let fs_error = |e: FsError| Problem::from_fix(&e);
    let mut specs = Vec::new();
    for m in &config.tmpfs.0 {
        let (uid, gid) = crate::session::users::resolve_owner(&m.owner_for(&user.home), user).map_err(|e| {
            Problem::new(crate::fix::error_chain(&e)).with_fix(format!("fix the owner of tmpfs {}", m.path))
        })?;
        specs.push(TmpfsSpec { path: m.path.resolve(&user.home), size: m.size.0, mode: m.mode.0, uid, gid });
    }
    let paths = specs.iter().map(|s| s.path.clone()).collect();
    let plan =
        plan_tmpfs(specs, &read_mountinfo(sys).map_err(|e| fs_error(FsError::Mountinfo(e)))?).map_err(fs_error)?;
    for step in &plan {
        tracing::debug!(%step, "tmpfs");
    }
    for warning in apply_tmpfs(&plan, sys).map_err(fs_error)? {
        warn(warning);
    }
    for link in &config.filesystem.links {
        make_link(&link.path.resolve(&user.home), &link.target, sys).map_err(fs_error)?;
    }
    let adopted = plan.iter().filter(|s| matches!(s, TmpfsStep::Adopt { .. })).count();
    let detail = format!(
        "{} tmpfs mounted, {adopted} provided by the runtime, {} links",
        plan.len() - adopted,
        config.filesystem.links.len()
    );
    Ok((paths, detail))
}

/// The boot's `readonly_root` stage: every mount of the root read-only but `writable` (the
/// tmpfs mounts, the configured writable mounts, the state directory), per mount point, then
/// proven with a write that must fail. After everything the boot writes outside the tmpfs
/// mounts, before anything the agent influences runs.
pub fn readonly_root(
    writable: &[PathBuf],
    warn: &mut dyn FnMut(String),
    sys: &dyn Effects,
) -> crate::fix::StageResult<(), FsError> {
    let plan = plan_readonly(&read_mountinfo(sys).map_err(FsError::Mountinfo)?, writable);
    let done = apply_readonly(&plan, sys)?;
    verify_readonly(&done.remounted, sys)?;
    for w in done.warnings {
        warn(w);
    }
    Ok(((), format!("{} mounts read-only, write to / fails with EROFS", done.remounted.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCKER: &str = "\
412 345 0:77 / / rw,relatime master:200 - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
413 412 0:80 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
414 412 0:81 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
415 414 0:82 / /dev/pts rw,nosuid,noexec,relatime - devpts devpts rw,gid=5,mode=620
417 412 0:84 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro
420 412 254:1 /docker/containers/abc/resolv.conf /etc/resolv.conf rw,relatime - ext4 /dev/vda rw
421 412 254:1 /docker/containers/abc/hostname /etc/hostname rw,relatime - ext4 /dev/vda rw
423 412 0:90 / /workspace rw,nosuid,nodev,noexec,relatime - tmpfs tmpfs rw,size=524288k
424 412 254:1 /vol /data\\040dir rw,nosuid,relatime - ext4 /dev/vda rw
425 412 254:1 /ro /opt/tools ro,relatime - ext4 /dev/vda rw
";

    fn spec(path: &str) -> TmpfsSpec {
        TmpfsSpec { path: path.into(), size: 1 << 20, mode: 0o755, uid: 7, gid: 7 }
    }

    #[test]
    fn mountinfo_parses_options_types_sizes_and_escapes() {
        let m = parse_mountinfo(DOCKER);
        assert_eq!(m.len(), 10);
        let ws = mount_at(&m, Path::new("/workspace")).unwrap();
        assert_eq!(ws.fstype, "tmpfs");
        assert!(ws.has("nosuid") && ws.has("nodev") && !ws.read_only());
        assert_eq!(ws.tmpfs_size(), Some(512 << 20));
        assert!(mount_at(&m, Path::new("/data dir")).is_some());
        assert_eq!(mount_of(&m, Path::new("/workspace/repo")).unwrap().mount_point, Path::new("/workspace"));
        assert_eq!(mount_of(&m, Path::new("/run/cordon")).unwrap().mount_point, Path::new("/"));
    }

    #[test]
    fn tmpfs_already_provided_by_the_runtime_is_adopted_not_mounted_over() {
        let m = parse_mountinfo(DOCKER);
        let plan = plan_tmpfs(vec![spec("/workspace"), spec("/tmp")], &m).unwrap();
        assert!(
            matches!(&plan[0], TmpfsStep::Adopt { missing, size: Some(s), .. } if missing.is_empty() && *s == 512 << 20)
        );
        assert_eq!(plan[1], TmpfsStep::Mount(spec("/tmp")));
    }

    #[test]
    fn runtime_tmpfs_missing_nodev_is_flagged_for_a_remount() {
        let m = parse_mountinfo("1 0 0:1 / /w rw,nosuid - tmpfs tmpfs rw\n");
        let plan = plan_tmpfs(vec![spec("/w")], &m).unwrap();
        assert!(matches!(&plan[0], TmpfsStep::Adopt { missing, .. } if missing == &["nodev"]));
    }

    #[test]
    fn a_volume_where_a_tmpfs_is_configured_is_an_error() {
        let m = parse_mountinfo(DOCKER);
        let err = plan_tmpfs(vec![spec("/etc/hostname")], &m).unwrap_err();
        assert!(matches!(err, FsError::NotTmpfs { ref fstype, .. } if fstype == "ext4"));
        assert!(err.hint().unwrap().contains("filesystem.writable"));
    }

    #[test]
    fn readonly_plan_covers_root_and_file_binds_but_not_memory_kernel_or_writable_paths() {
        let m = parse_mountinfo(DOCKER);
        let plan = plan_readonly(&m, &[PathBuf::from("/data dir")]);
        let paths: Vec<&Path> = plan.iter().map(|r| r.path.as_path()).collect();
        assert_eq!(paths, [Path::new("/"), Path::new("/etc/resolv.conf"), Path::new("/etc/hostname")]);
        assert_eq!(plan[0].keep, MsFlags::MS_RELATIME);
    }

    #[test]
    fn readonly_plan_skips_mounts_hidden_under_a_later_mount_above_them() {
        let text = "\
1 0 8:1 / / rw - ext4 /dev/sda rw
2 1 0:5 / /run rw,nosuid - tmpfs tmpfs rw
3 2 8:1 /x /run/data rw - ext4 /dev/sda rw
4 1 0:6 / /run rw,nosuid - tmpfs tmpfs rw
5 4 8:1 /y /run/kept rw - ext4 /dev/sda rw
";
        let plan = plan_readonly(&parse_mountinfo(text), &[]);
        let paths: Vec<&Path> = plan.iter().map(|r| r.path.as_path()).collect();
        assert_eq!(paths, [Path::new("/"), Path::new("/run/kept")]);
    }

    #[test]
    fn readonly_plan_keeps_locked_flags_and_counts_stacked_mounts_once() {
        let text = "1 0 8:1 / / rw,nosuid,nodev,noatime - ext4 /dev/sda rw\n2 1 8:1 / / rw,noexec - ext4 /dev/sda rw\n";
        let plan = plan_readonly(&parse_mountinfo(text), &[]);
        assert_eq!(plan, [RemountRo { path: "/".into(), keep: MsFlags::MS_NOEXEC }]);
        let first = &parse_mountinfo(text)[0];
        assert_eq!(first.kept_flags(), MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME);
    }

    // The stages against a recorder (`sys::effects::Recorder`): the exact effects of each plan,
    // and the error and fix of each failure, without root. tests/filesystem.rs proves them on
    // the real kernel.

    use crate::config::{ByteSize, Config, FileMode, Link, Owner, TmpfsMount};
    use crate::fix::Fix;
    use crate::session::users::AgentUser;
    use crate::sys::effects::{Call, Fault, FileKind, Recorder};
    use nix::errno::Errno;

    const ROOT_AND_TMP: &str = "\
1 0 8:1 / / rw,relatime - ext4 /dev/sda rw
2 1 0:5 / /tmp rw,nosuid,relatime - tmpfs tmpfs rw,size=524288k
";

    /// After the filesystem stage: /tmp has nodev, /workspace is cordon's tmpfs.
    const ROOT_TMP_AND_WORKSPACE: &str = "\
1 0 8:1 / / rw,relatime - ext4 /dev/sda rw
2 1 0:5 / /tmp rw,nosuid,nodev,relatime - tmpfs tmpfs rw,size=524288k
3 1 0:6 / /workspace rw,nosuid,nodev,relatime - tmpfs tmpfs rw,size=1024k,mode=755,uid=4242,gid=4242
";

    fn agent() -> AgentUser {
        AgentUser {
            name: "agent".into(),
            uid: 4242,
            gid: 4242,
            home: "/home/agent".into(),
            shell: "/bin/bash".into(),
            groups: vec![],
        }
    }

    /// /workspace (the agent's, 1 MiB, 0755) and /tmp (root's, 1777), and one link in the home.
    fn config() -> Config {
        let tmpfs = |path: &str, size, mode, owner| TmpfsMount {
            path: path.parse().unwrap(),
            size: ByteSize(size),
            mode: FileMode(mode),
            owner: Some(owner),
        };
        let mut config = Config::default();
        config.tmpfs.0 =
            vec![tmpfs("/workspace", 1 << 20, 0o755, Owner::Agent), tmpfs("/tmp", 512 << 20, 0o1777, Owner::Root)];
        config.filesystem.links =
            vec![Link { path: "~/.config/tool".parse().unwrap(), target: "/workspace/.tool".into() }];
        config
    }

    /// The image's files the stage touches: the root, the runtime's /tmp, the agent's home.
    fn image() -> Recorder {
        let rec = Recorder::new();
        rec.file("/", FileKind::Dir, 0, 0, 0o755)
            .file("/tmp", FileKind::Dir, 0, 0, 0o1777)
            .file("/home", FileKind::Dir, 0, 0, 0o755)
            .file("/home/agent", FileKind::Dir, 4242, 4242, 0o700);
        rec
    }

    fn filesystem_stage(rec: &Recorder) -> Result<(Vec<PathBuf>, String), crate::fix::Problem> {
        let mut warnings = Vec::new();
        let result = filesystem(&config(), &agent(), &mut |w| warnings.push(w), rec);
        assert!(warnings.is_empty(), "{warnings:?}");
        result
    }

    #[test]
    fn filesystem_stage_mounts_a_missing_tmpfs_adopts_the_runtimes_and_links_in_that_order() {
        let rec = image();
        // Planned, then re-read for the remount's flags, then read to verify.
        rec.mountinfo([ROOT_AND_TMP, ROOT_AND_TMP, ROOT_TMP_AND_WORKSPACE]);
        let (paths, detail) = filesystem_stage(&rec).unwrap();
        assert_eq!(paths, [PathBuf::from("/workspace"), PathBuf::from("/tmp")]);
        assert_eq!(detail, "1 tmpfs mounted, 1 provided by the runtime, 1 links");
        assert_eq!(
            rec.changes(),
            [
                Call::CreateDirAll { path: "/workspace".into() },
                Call::MountTmpfs {
                    path: "/workspace".into(),
                    flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    data: "size=1048576,mode=755,uid=4242,gid=4242".into(),
                },
                // The runtime's /tmp lacks nodev: added, keeping the flags it has.
                Call::Remount {
                    path: "/tmp".into(),
                    flags: MsFlags::MS_REMOUNT
                        | MsFlags::MS_BIND
                        | MsFlags::MS_NOSUID
                        | MsFlags::MS_RELATIME
                        | MsFlags::MS_NODEV,
                },
                Call::Chown { path: "/tmp".into(), uid: 0, gid: 0 },
                Call::Chmod { path: "/tmp".into(), mode: 0o1777 },
                // The link's missing parent is created owned like the home above it.
                Call::CreateDirAll { path: "/home/agent/.config".into() },
                Call::Chown { path: "/home/agent/.config".into(), uid: 4242, gid: 4242 },
                Call::Symlink { target: "/workspace/.tool".into(), path: "/home/agent/.config/tool".into() },
                Call::Lchown { path: "/home/agent/.config/tool".into(), uid: 4242, gid: 4242 },
            ]
        );
    }

    #[test]
    fn filesystem_stage_without_the_right_to_mount_fails_with_the_cap_sys_admin_fix_and_goes_no_further() {
        let rec = image();
        rec.mountinfo([ROOT_AND_TMP]).fail_when(|c| matches!(c, Call::MountTmpfs { .. }), Fault::Errno(Errno::EPERM));
        let e = filesystem_stage(&rec).unwrap_err();
        assert_eq!(e.to_string(), "failed to mount tmpfs at /workspace: EPERM: Operation not permitted");
        assert!(e.fix().unwrap().contains("--cap-add SYS_ADMIN"), "{e:?}");
        assert!(matches!(rec.changes().last(), Some(Call::MountTmpfs { .. })), "{:?}", rec.changes());
    }

    #[test]
    fn filesystem_stage_refuses_a_volume_where_a_tmpfs_is_configured_before_any_effect() {
        let rec = image();
        rec.mountinfo(["1 0 8:1 / / rw - ext4 /dev/sda rw\n2 1 8:1 /v /workspace rw - ext4 /dev/sda rw\n"]);
        let e = filesystem_stage(&rec).unwrap_err();
        assert_eq!(e.to_string(), "/workspace is already a ext4 mount, not a tmpfs");
        assert!(e.fix().unwrap().contains("filesystem.writable"), "{e:?}");
        assert_eq!(rec.changes(), []);
    }

    #[test]
    fn a_runtime_tmpfs_that_cannot_take_nodev_is_kept_with_a_warning() {
        let rec = image();
        rec.mountinfo([ROOT_AND_TMP, ROOT_AND_TMP, ROOT_TMP_AND_WORKSPACE])
            .fail_when(|c| matches!(c, Call::Remount { .. }), Fault::Errno(Errno::EPERM));
        let mut warnings = Vec::new();
        filesystem(&config(), &agent(), &mut |w| warnings.push(w), &rec).unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].starts_with("the runtime's tmpfs at /tmp lacks nodev"), "{warnings:?}");
        assert!(rec.changes().contains(&Call::Chmod { path: "/tmp".into(), mode: 0o1777 }));
    }

    #[test]
    fn filesystem_stage_fails_when_the_mounted_tmpfs_does_not_show_up() {
        let rec = image();
        rec.mountinfo([ROOT_AND_TMP]);
        let e = filesystem_stage(&rec).unwrap_err();
        assert_eq!(e.to_string(), "tmpfs at /workspace did not come up as expected: no mount there");
    }

    #[test]
    fn a_link_replaces_an_old_symlink_but_never_a_file() {
        let rec = image();
        rec.file("/home/agent/.gitconfig", FileKind::Symlink, 4242, 4242, 0o777);
        make_link(Path::new("/home/agent/.gitconfig"), Path::new("/workspace/.gitconfig"), &rec).unwrap();
        assert_eq!(
            rec.changes(),
            [
                Call::CreateDirAll { path: "/home/agent".into() },
                Call::RemoveFile { path: "/home/agent/.gitconfig".into() },
                Call::Symlink { target: "/workspace/.gitconfig".into(), path: "/home/agent/.gitconfig".into() },
                Call::Lchown { path: "/home/agent/.gitconfig".into(), uid: 4242, gid: 4242 },
            ]
        );
        let rec = image();
        rec.file("/home/agent/.bashrc", FileKind::File, 4242, 4242, 0o644);
        let e = make_link(Path::new("/home/agent/.bashrc"), Path::new("/x"), &rec).unwrap_err();
        assert!(matches!(e, FsError::LinkOccupied { .. }), "{e}");
        assert_eq!(rec.changes(), [Call::CreateDirAll { path: "/home/agent".into() }]);
    }

    #[test]
    fn the_state_dir_on_a_runtime_tmpfs_is_used_as_it_is() {
        let rec = Recorder::new();
        rec.mountinfo([ROOT_AND_TMP]);
        assert_eq!(prepare_state_dir(Path::new("/tmp/cordon"), &rec).unwrap(), None);
        assert_eq!(
            rec.changes(),
            [
                Call::CreateDirAll { path: "/tmp/cordon".into() },
                Call::Chown { path: "/tmp/cordon".into(), uid: 0, gid: 0 },
                Call::Chmod { path: "/tmp/cordon".into(), mode: 0o755 },
            ]
        );
    }

    #[test]
    fn the_state_dir_on_the_root_gets_a_small_tmpfs_of_its_own() {
        let rec = Recorder::new();
        rec.mountinfo([ROOT_AND_TMP]);
        assert_eq!(prepare_state_dir(Path::new("/run/cordon"), &rec).unwrap(), None);
        assert_eq!(
            rec.changes(),
            [
                Call::CreateDirAll { path: "/run/cordon".into() },
                Call::MountTmpfs {
                    path: "/run/cordon".into(),
                    flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                    data: "size=16m,mode=755".into(),
                },
                Call::Chown { path: "/run/cordon".into(), uid: 0, gid: 0 },
                Call::Chmod { path: "/run/cordon".into(), mode: 0o755 },
            ]
        );
    }

    #[test]
    fn the_state_dir_without_the_right_to_mount_stays_on_the_root_with_a_warning() {
        let rec = Recorder::new();
        rec.mountinfo([ROOT_AND_TMP]).fail_when(|c| matches!(c, Call::MountTmpfs { .. }), Fault::Errno(Errno::EPERM));
        let warning = prepare_state_dir(Path::new("/run/cordon"), &rec).unwrap().unwrap();
        assert!(warning.starts_with("no permission to mount a tmpfs at /run/cordon"), "{warning}");
        assert_eq!(rec.changes().last(), Some(&Call::Chmod { path: "/run/cordon".into(), mode: 0o755 }));
        // Any other mount failure is an error.
        let rec = Recorder::new();
        rec.mountinfo([ROOT_AND_TMP]).fail_when(|c| matches!(c, Call::MountTmpfs { .. }), Fault::Errno(Errno::ENODEV));
        let e = prepare_state_dir(Path::new("/run/cordon"), &rec).unwrap_err();
        assert!(matches!(e, FsError::MountTmpfs { source: Errno::ENODEV, .. }), "{e}");
    }

    const ROOT_WITH_BINDS: &str = "\
1 0 8:1 / / rw,relatime - ext4 /dev/sda rw
2 1 0:5 / /proc rw,nosuid,nodev,noexec - proc proc rw
3 1 8:1 /c/resolv.conf /etc/resolv.conf rw,nosuid - ext4 /dev/sda rw
4 1 0:6 / /workspace rw,nosuid,nodev - tmpfs tmpfs rw,size=1024k
5 1 8:1 /vol /data rw,noatime - ext4 /dev/sda rw
";

    fn readonly_after() -> String {
        ROOT_WITH_BINDS.replace(" / / rw,", " / / ro,").replace("/etc/resolv.conf rw,", "/etc/resolv.conf ro,")
    }

    fn readonly_stage(rec: &Recorder) -> (Result<(), FsError>, Vec<String>) {
        let mut warnings = Vec::new();
        let writable = [PathBuf::from("/workspace"), PathBuf::from("/data")];
        let result = readonly_root(&writable, &mut |w| warnings.push(w), rec).map(|((), detail)| {
            assert!(detail.ends_with("mounts read-only, write to / fails with EROFS"), "{detail}");
        });
        (result, warnings)
    }

    fn write_fails_with(rec: &Recorder, errno: Errno) {
        rec.fail_when(|c| matches!(c, Call::WriteProbe { .. }), Fault::Errno(errno));
    }

    #[test]
    fn readonly_root_remounts_each_mount_of_the_root_keeping_its_flags_then_proves_it_with_a_write() {
        let rec = Recorder::new();
        rec.mountinfo([ROOT_WITH_BINDS, &readonly_after()]);
        write_fails_with(&rec, Errno::EROFS);
        let (result, warnings) = readonly_stage(&rec);
        result.unwrap();
        assert!(warnings.is_empty());
        let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        assert_eq!(
            rec.changes(),
            [
                Call::Remount { path: "/".into(), flags: ro | MsFlags::MS_RELATIME },
                Call::Remount { path: "/etc/resolv.conf".into(), flags: ro | MsFlags::MS_NOSUID },
                Call::WriteProbe { dir: "/".into() },
            ]
        );
    }

    #[test]
    fn readonly_root_without_cap_sys_admin_fails_with_the_fix() {
        let rec = Recorder::new();
        rec.mountinfo([ROOT_WITH_BINDS]).fail_when(|c| matches!(c, Call::Remount { .. }), Fault::Errno(Errno::EPERM));
        rec.file("/", FileKind::Dir, 0, 0, 0o755);
        let e = readonly_stage(&rec).0.unwrap_err();
        assert_eq!(e.to_string(), "failed to remount / read-only");
        assert!(e.fix().unwrap().contains("--cap-add SYS_ADMIN"), "{e:?}");
        assert_eq!(rec.changes().len(), 1, "nothing after the failed remount: {:?}", rec.changes());
    }

    #[test]
    fn a_runtime_file_bind_that_cannot_be_remounted_stays_with_a_warning_only_when_nobody_else_may_write_it() {
        let eperm_on_resolv_conf = |mode| {
            let rec = Recorder::new();
            rec.mountinfo(
                [ROOT_WITH_BINDS.to_string(), ROOT_WITH_BINDS.replace(" / / rw,", " / / ro,")]
                    .iter()
                    .map(String::as_str),
            )
            .file("/etc/resolv.conf", FileKind::File, 0, 0, mode)
            .fail_when(
                |c| matches!(c, Call::Remount { path, .. } if path == Path::new("/etc/resolv.conf")),
                Fault::Errno(Errno::EPERM),
            );
            write_fails_with(&rec, Errno::EROFS);
            readonly_stage(&rec)
        };
        let (result, warnings) = eperm_on_resolv_conf(0o644);
        result.unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].starts_with("/etc/resolv.conf stays a writable bind mount"), "{warnings:?}");
        let (result, _) = eperm_on_resolv_conf(0o666);
        assert!(matches!(result, Err(FsError::Remount { source: Errno::EPERM, .. })), "{result:?}");
    }

    #[test]
    fn readonly_root_fails_when_a_write_to_the_root_does_not_fail_with_erofs() {
        let rec = Recorder::new();
        rec.mountinfo([ROOT_WITH_BINDS, &readonly_after()]);
        let e = readonly_stage(&rec).0.unwrap_err();
        assert_eq!(e.to_string(), "a write to / did not fail with EROFS: it succeeded");
        let rec = Recorder::new();
        rec.mountinfo([ROOT_WITH_BINDS, &readonly_after()]);
        write_fails_with(&rec, Errno::EACCES);
        let e = readonly_stage(&rec).0.unwrap_err();
        assert!(e.to_string().contains("it failed with Permission denied"), "{e}");
    }

    #[test]
    fn readonly_root_fails_when_a_mount_still_shows_rw_after_its_remount() {
        let rec = Recorder::new();
        rec.mountinfo([ROOT_WITH_BINDS]);
        write_fails_with(&rec, Errno::EROFS);
        let e = readonly_stage(&rec).0.unwrap_err();
        assert_eq!(e.to_string(), "/ is still writable after the read-only remount");
        assert!(!rec.changes().contains(&Call::WriteProbe { dir: "/".into() }));
    }
}
