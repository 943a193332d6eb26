//! Users and owners, resolved through the passwd and group databases (NSS), and how a command
//! is made to run as the agent user.

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
pub(crate) enum UserError {
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

/// The agent user of `agent.user` with its `agent.groups`, for the boot.
pub(crate) fn agent(config: &crate::config::Agent) -> Result<AgentUser, crate::fix::Problem> {
    resolve_agent_with_groups(&config.user, &config.groups).map_err(|e| {
        crate::fix::Problem::new(crate::fix::error_chain(&e))
            .with_fix("create the agent user in the image (useradd), or set agent.user")
    })
}

/// The agent user with its configured supplementary groups.
pub(crate) fn resolve_agent_with_groups(name: &str, groups: &[String]) -> Result<AgentUser, UserError> {
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

pub(crate) fn resolve_agent(name: &str) -> Result<AgentUser, UserError> {
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
pub(crate) fn resolve_owner(owner: &Owner, agent: &AgentUser) -> Result<(u32, u32), UserError> {
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
pub(crate) const AGENT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Where `program` is found, as a shell finds it: as given when it contains a `/`, else the
/// first executable file of that name on [`AGENT_PATH`], else the first file of that name
/// (whose exec then fails with "Permission denied", status 126, rather than "not found").
/// None: nothing of that name exists (status 127).
pub(crate) fn find_program(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return Path::new(program).exists().then(|| PathBuf::from(program));
    }
    let candidates: Vec<PathBuf> =
        AGENT_PATH.split(':').map(|d| Path::new(d).join(program)).filter(|p| p.is_file()).collect();
    let executable = |p: &&PathBuf| p.metadata().is_ok_and(|m| m.permissions().mode() & 0o111 != 0);
    candidates.iter().find(executable).or(candidates.first()).cloned()
}

/// Why the agent could not be started: the message names the program and the reason, and the
/// status is the shell's (126: found but not executable; 127: not found, which includes a
/// missing `#!` interpreter, as exec reports it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartError {
    pub message: String,
    pub status: i32,
}

impl StartError {
    /// The agent program does not exist (on the agent's PATH, for a bare name).
    pub fn not_found(program: &str) -> StartError {
        let reason = if program.contains('/') {
            "No such file or directory".to_string()
        } else {
            format!("not found on the agent's PATH ({AGENT_PATH})")
        };
        StartError::new(program, &reason, 127)
    }

    /// From the error of exec'ing `program`.
    pub fn from_exec(program: &str, e: &std::io::Error) -> StartError {
        if e.kind() != std::io::ErrorKind::NotFound {
            return StartError::new(program, &e.to_string(), 126);
        }
        // ENOENT for a file that exists: the kernel could not find its interpreter.
        let reason = match find_program(program).as_deref().and_then(interpreter) {
            Some(interp) => format!("its interpreter `{interp}` (from its #! line) is missing: {e}"),
            None => e.to_string(),
        };
        StartError::new(program, &reason, 127)
    }

    fn new(program: &str, reason: &str, status: i32) -> StartError {
        StartError { message: format!("cannot start the agent `{program}`: {reason} (exit status {status})"), status }
    }

    /// What to do about it.
    pub fn hint(&self) -> String {
        if self.status == 126 {
            "make agent.command's program executable for the agent user (chmod 755), or point agent.command at one that is".into()
        } else {
            "install the agent (and its #! interpreter) in the image, or set agent.command to a program on the agent's PATH".into()
        }
    }
}

/// The interpreter a `#!` script names, if `path` is one.
fn interpreter(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let n = std::fs::File::open(path).and_then(|mut f| f.read(&mut head)).ok()?;
    let line = head[..n].strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n').unwrap_or(line.len())];
    let interp = String::from_utf8_lossy(line).split_whitespace().next()?.to_string();
    Some(interp)
}

/// A command that runs `program` as `user` with an empty signal mask, every signal at its
/// default disposition, no inherited descriptors beyond stdio, an environment of [`AGENT_PATH`]
/// alone (the caller adds the rest), and every privilege dropped before exec. `program` is
/// looked up on that PATH.
pub(crate) fn unprivileged_command(program: impl AsRef<std::ffi::OsStr>, user: &AgentUser) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    cmd.env_clear().env("PATH", AGENT_PATH).stdin(std::process::Stdio::null());
    let (uid, gid) = (user.uid, user.gid);
    let mut groups = vec![gid];
    groups.extend(user.groups.iter().filter(|g| **g != gid));
    sys::drop_to_user_at_exec(&mut cmd, uid, gid, groups);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_run_as_the_agent_get_the_agents_path_and_nothing_else() {
        let user = AgentUser {
            name: "agent".into(),
            uid: 4242,
            gid: 4242,
            home: "/home/agent".into(),
            shell: "/bin/bash".into(),
            groups: vec![],
        };
        let cmd = unprivileged_command("git", &user);
        let env: Vec<_> = cmd.get_envs().filter_map(|(k, v)| Some((k.to_str()?, v?.to_str()?))).collect();
        assert_eq!(env, [("PATH", AGENT_PATH)]);
    }

    #[test]
    fn start_errors_name_the_program_the_reason_and_the_shell_status() {
        let dir = std::env::temp_dir().join(format!("cordon-start-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("agent");
        std::fs::write(&script, "#!/nonexistent/interp -x\n").unwrap();
        let program = script.display().to_string();

        let e = StartError::from_exec(&program, &std::io::Error::from_raw_os_error(nix::errno::Errno::ENOENT as i32));
        assert_eq!(e.status, 127);
        assert_eq!(
            e.message,
            format!(
                "cannot start the agent `{program}`: its interpreter `/nonexistent/interp` (from its #! line) is missing: \
                 No such file or directory (os error 2) (exit status 127)"
            )
        );
        let e = StartError::from_exec(&program, &std::io::Error::from_raw_os_error(nix::errno::Errno::EACCES as i32));
        assert_eq!(
            (e.status, e.message),
            (126, format!("cannot start the agent `{program}`: Permission denied (os error 13) (exit status 126)"))
        );
        assert!(StartError::not_found("no-such-agent").message.contains("not found on the agent's PATH"));
        assert_eq!(StartError::not_found("/no/such").status, 127);
        // A file without the x bit is found (its exec fails with 126), not "not found".
        assert_eq!(find_program(&program), Some(script.clone()));
        assert_eq!(find_program("/no/such/agent"), None);
        assert_eq!(find_program("sh").map(|p| p.is_absolute()), Some(true));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
