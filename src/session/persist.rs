//! The boot's `persist` stage: the `agent.persist` paths of the agent's home kept on a volume,
//! so what the agent keeps there (Claude Code's sessions, for `--resume`) survives a restart.
//!
//! Each path `~/P` is a directory `<agent.persist_volume>/.cordon/persist/P`, bind-mounted on
//! `~/P` by root before anything runs as the agent. A bind mount, not a symlink: the agent
//! cannot repoint a mount, while a symlink in a directory it owns (its home) it can replace.
//!
//! The volume is the agent's to write, so every directory on it is opened one component at a
//! time without following a symlink (`sys::nofollow`), and the mount is made between the
//! opened descriptors. `.cordon`, `.cordon/persist` and any directory between it and a
//! persisted one are root's (0755): only root can make a root-owned directory, so a chain of
//! them is one the agent did not build. The agent can rename `.cordon` away (it owns the
//! volume's top) and put its own in place, symlinks and all; the next boot then finds
//! `.cordon` not root's and fails, touching nothing. Only the persisted directories are the
//! agent's (0700), and root never looks inside them.

use std::path::{Path, PathBuf};

use crate::config::{Agent, ConfigPath};
use crate::fix::{Problem, StageResult};
use crate::session::users::AgentUser;
use crate::sys::nofollow::{self, Dir, NewDir};

/// Where the persisted directories live on the volume.
pub const STORE: [&str; 2] = [".cordon", "persist"];

/// What the stage does: bind `source` (on the volume) on `target` (in the home), for each
/// path, in the configured order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub volume: PathBuf,
    /// The paths relative to the home (and to the store).
    pub paths: Vec<PathBuf>,
}

impl Plan {
    /// The plan of `agent.persist`; None when it lists nothing.
    pub fn of(agent: &Agent) -> Option<Plan> {
        let volume = agent.persist_volume.clone()?;
        let paths: Vec<PathBuf> = agent
            .persist
            .iter()
            .filter_map(|p| match p {
                ConfigPath::Home(rel) if !rel.as_os_str().is_empty() => Some(rel.clone()),
                _ => None,
            })
            .collect();
        (!paths.is_empty()).then_some(Plan { volume, paths })
    }

    /// The directory on the volume that holds `~/rel`.
    pub fn source(&self, rel: &Path) -> PathBuf {
        STORE.iter().fold(self.volume.clone(), |p, c| p.join(c)).join(rel)
    }

    /// Where each persisted directory appears: the mounts the read-only root must leave alone.
    pub fn targets(&self, home: &Path) -> Vec<PathBuf> {
        self.paths.iter().map(|rel| home.join(rel)).collect()
    }
}

const ROOT_DIR: NewDir = NewDir { uid: 0, gid: 0, mode: 0o755 };

/// Opens (creating it root's when missing) a directory of the chain that must be root's.
fn root_dir(parent: &Dir, name: &std::ffi::OsStr, shown: &Path) -> Result<Dir, String> {
    let dir = nofollow::open_child(parent, name, Some(ROOT_DIR)).map_err(|e| format!("{}: {e}", shown.display()))?;
    if dir.uid != 0 || dir.mode & 0o022 != 0 {
        return Err(format!(
            "{} is owned by uid {} with mode {:04o}; cordon makes it root's, 0755, so it was made or replaced by \
             someone else (the agent?)",
            shown.display(),
            dir.uid,
            dir.mode
        ));
    }
    Ok(dir)
}

/// Opens the persisted directory for `rel` on the volume, making every missing part: root's
/// chain down to it, the directory itself the agent's.
fn open_source(plan: &Plan, rel: &Path, user: &AgentUser) -> Result<Dir, String> {
    let volume = nofollow::open_abs(&plan.volume).map_err(|e| format!("{}: {e}", plan.volume.display()))?;
    let mut shown = plan.volume.clone();
    let mut dir = volume;
    let names: Vec<&std::ffi::OsStr> = STORE.iter().map(std::ffi::OsStr::new).chain(rel.iter()).collect();
    let (leaf, chain) = names.split_last().expect("rel is not empty");
    for name in chain {
        shown.push(name);
        dir = root_dir(&dir, name, &shown)?;
    }
    shown.push(leaf);
    let agent_dir = NewDir { uid: user.uid, gid: user.gid, mode: 0o700 };
    let leaf = nofollow::open_child(&dir, leaf, Some(agent_dir)).map_err(|e| format!("{}: {e}", shown.display()))?;
    if leaf.uid != user.uid {
        // Root's (an earlier config kept a path below it): the agent's from now on.
        nofollow::set_owner(&leaf, user.uid, user.gid, 0o700).map_err(|e| format!("{}: {e}", shown.display()))?;
    }
    Ok(leaf)
}

/// The boot's `persist` stage. Returns where the persisted directories appear in the home.
pub fn stage(plan: &Plan, user: &AgentUser) -> StageResult<Vec<PathBuf>> {
    let fix = |source: &Path| {
        format!(
            "cordon keeps {} root's and refuses symlinks on the volume; look at it as root, move it aside (cordon \
             recreates the chain, the agent's files are in the directories below it) and restart",
            source.display()
        )
    };
    // The volume's own path is the operator's: when it is missing, say that, not "move aside".
    nofollow::open_abs(&plan.volume).map_err(|e| {
        Problem::new(format!("cannot open agent.persist_volume {}: {e}", plan.volume.display())).with_fix(
            "agent.persist_volume must be an existing directory on the volume, reached without a symlink: create it, \
             or mount the volume there",
        )
    })?;
    let mut shown = Vec::new();
    for rel in &plan.paths {
        let source = plan.source(rel);
        let src = open_source(plan, rel, user).map_err(|e| {
            Problem::new(format!("cannot persist ~/{} on {}: {e}", rel.display(), plan.volume.display()))
                .with_fix(fix(&source))
        })?;
        let agent_dir = NewDir { uid: user.uid, gid: user.gid, mode: 0o700 };
        let home = nofollow::open_abs(&user.home);
        let target = home.and_then(|h| nofollow::open_below(h, rel, Some(agent_dir))).map_err(|e| {
            Problem::new(format!("cannot make ~/{} in {}: {e}", rel.display(), user.home.display()))
                .with_fix("the agent's home must be a directory cordon can write (a tmpfs, by default)")
        })?;
        nofollow::bind_dirs(&src, &target).map_err(|e| {
            Problem::caused_by(format!("cannot bind-mount {} on ~/{}", source.display(), rel.display()), &e)
                .with_fix("cordon needs CAP_SYS_ADMIN to mount (as for its tmpfs mounts)")
        })?;
        shown.push(format!("~/{}", rel.display()));
    }
    let detail =
        format!("{} kept on {}", shown.join(", "), STORE.iter().fold(plan.volume.clone(), |p, c| p.join(c)).display());
    Ok((plan.targets(&user.home), detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_home_path_lives_under_the_volumes_cordon_store_and_appears_at_its_home_path() {
        let mut agent = Agent::default();
        assert_eq!(Plan::of(&agent), None, "nothing to persist");
        agent.persist = vec!["~/.claude".parse().unwrap(), "~/.local/share/x".parse().unwrap()];
        agent.persist_volume = Some("/workspace".into());
        let plan = Plan::of(&agent).unwrap();
        assert_eq!(plan.source(Path::new(".claude")), Path::new("/workspace/.cordon/persist/.claude"));
        assert_eq!(plan.source(Path::new(".local/share/x")), Path::new("/workspace/.cordon/persist/.local/share/x"));
        assert_eq!(
            plan.targets(Path::new("/home/agent")),
            [PathBuf::from("/home/agent/.claude"), PathBuf::from("/home/agent/.local/share/x")]
        );
    }
}
