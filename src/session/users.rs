//! Users and owners, resolved through the passwd and group databases (NSS), and how a command
//! is made to run as the agent user.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Group, User};

use crate::config::Owner;
use crate::sys;

/// The unprivileged user the agent runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: PathBuf,
    /// Supplementary groups (`agent.groups`), resolved.
    pub groups: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("user `{0}` does not exist in /etc/passwd")]
    NoSuchUser(String),
    #[error("group `{0}` does not exist in /etc/group")]
    NoSuchGroup(String),
    #[error("the agent user `{0}` has uid 0; it must be an unprivileged user")]
    AgentIsRoot(String),
    #[error("cannot look up `{name}`")]
    Lookup {
        name: String,
        #[source]
        source: nix::Error,
    },
}

fn lookup_user(name: &str) -> Result<Option<User>, UserError> {
    let found = match name.parse::<u32>() {
        Ok(uid) => User::from_uid(uid.into()),
        Err(_) => User::from_name(name),
    };
    found.map_err(|source| UserError::Lookup { name: name.into(), source })
}

/// The agent user with its configured supplementary groups.
pub fn resolve_agent_with_groups(name: &str, groups: &[String]) -> Result<AgentUser, UserError> {
    let mut user = resolve_agent(name)?;
    for g in groups {
        user.groups.push(resolve_group(g)?);
    }
    Ok(user)
}

/// A group name or gid as a gid.
fn resolve_group(group: &str) -> Result<u32, UserError> {
    match group.parse::<u32>() {
        Ok(n) => Ok(n),
        Err(_) => Ok(Group::from_name(group)
            .map_err(|source| UserError::Lookup { name: group.into(), source })?
            .ok_or_else(|| UserError::NoSuchGroup(group.into()))?
            .gid
            .as_raw()),
    }
}

pub fn resolve_agent(name: &str) -> Result<AgentUser, UserError> {
    let user = lookup_user(name)?.ok_or_else(|| UserError::NoSuchUser(name.into()))?;
    if user.uid.is_root() {
        return Err(UserError::AgentIsRoot(name.into()));
    }
    Ok(AgentUser {
        name: user.name,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        home: user.dir,
        shell: user.shell,
        groups: vec![],
    })
}

/// The uid and gid an [`Owner`] stands for. A numeric user that is not in passwd is taken as
/// is (its group defaults to the same number), as runtimes that map arbitrary uids expect.
pub fn resolve_owner(owner: &Owner, agent: &AgentUser) -> Result<(u32, u32), UserError> {
    match owner {
        Owner::Agent => Ok((agent.uid, agent.gid)),
        Owner::Root => Ok((0, 0)),
        Owner::User { user, group } => {
            let (uid, primary) = match lookup_user(user)? {
                Some(u) => (u.uid.as_raw(), u.gid.as_raw()),
                None => match user.parse::<u32>() {
                    Ok(n) => (n, n),
                    Err(_) => return Err(UserError::NoSuchUser(user.clone())),
                },
            };
            let gid = match group {
                None => primary,
                Some(g) => resolve_group(g)?,
            };
            Ok((uid, gid))
        }
    }
}

/// PATH for the agent: no user-writable directory first.
pub const AGENT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Where `program` is found: as given when it contains a `/`, else on [`AGENT_PATH`].
pub fn find_program(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.contains('/') {
        return executable(Path::new(program)).then(|| PathBuf::from(program));
    }
    AGENT_PATH.split(':').map(|d| Path::new(d).join(program)).find(|p| executable(p))
}

/// A command that runs `program` as `user` with an empty signal mask, no inherited
/// descriptors beyond stdio, an empty environment, and every privilege dropped before exec.
pub fn unprivileged_command(program: impl AsRef<std::ffi::OsStr>, user: &AgentUser) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    cmd.env_clear().stdin(std::process::Stdio::null());
    let (uid, gid) = (user.uid, user.gid);
    let mut groups = vec![gid];
    groups.extend(user.groups.iter().filter(|g| **g != gid));
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // syscalls (sigprocmask, close_range, prctl, set*id, capset); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            sys::unblock_all_signals()?;
            sys::cloexec_from_3()?;
            sys::drop_privileges(uid, gid, &groups)
        });
    }
    cmd
}
