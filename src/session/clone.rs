//! The clone stage: `repo.url` at `repo.branch` into `repo.dest`, as the agent user, through the
//! firewall, authenticated by the credential helper, with a timeout and progress in the boot log.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::sys::command::{self, CommandError, Options};

/// git's argv for the clone: options, then `--`, so the URL can never be read as one.
pub(crate) fn clone_args(url: &str, dest: &Path, branch: Option<&str>, depth: Option<u32>) -> Vec<String> {
    let mut args = vec!["clone".to_string(), "--progress".into()];
    if let Some(b) = branch {
        args.extend(["--branch".into(), b.into(), "--single-branch".into()]);
    }
    if let Some(d) = depth {
        args.extend(["--depth".into(), d.to_string()]);
    }
    args.extend(["--".into(), url.into(), dest.display().to_string()]);
    args
}

/// The boot's `clone` stage: `repo.url` at `repo.branch` into `repo.dest`, as the agent, with
/// the credential helper, through the firewall (after the lockdown, like everything the agent
/// does; before the readiness probes). git's progress goes to `progress`.
///
/// Where `repo.dest` already holds a clone of the same remote (a workspace on a volume, after
/// a restart), it is kept as it is, uncommitted work included, and only fetched; a clone of
/// another remote there fails the stage.
pub(crate) fn stage(
    repo: &crate::config::Repo,
    url: &str,
    user: &crate::session::users::AgentUser,
    progress: impl FnMut(&str),
) -> crate::fix::StageResult<()> {
    use crate::fix::Problem;
    let fix = "check REPO_URL and that GH_PAT can read the repository (fine-grained tokens: Contents); the host must \
               be in the allowlist";
    if repo.dest.join(".git").exists() {
        let origin = git(user, &repo.dest, &["config", "--get", "remote.origin.url"], repo.timeout.0).map_err(|e| {
            Problem::new(format!("{} holds a git repository whose remote cannot be read: {e}", repo.dest.display()))
        })?;
        if !same_remote(origin.trim(), url) {
            return Err(Problem::new(format!(
                "{} already holds a clone of {}, not of {url}",
                repo.dest.display(),
                origin.trim()
            ))
            .with_fix("move the old workspace away, or set repo.dest (or REPO_URL) to match it"));
        }
        let mut cmd = git_command(user, &repo.dest);
        cmd.args(["fetch", "--progress", "--prune", "origin"]);
        run(cmd, repo.timeout.0, progress)
            .map_err(|e| Problem::new(e.replace("git clone failed", "git fetch failed")).with_fix(fix))?;
        return Ok(((), format!("{url}: the clone in {} was kept as it is and fetched", repo.dest.display())));
    }
    let mut cmd = git_command(user, repo.dest.parent().unwrap_or(Path::new("/")));
    cmd.args(clone_args(url, &repo.dest, repo.branch.as_deref(), repo.depth));
    run(cmd, repo.timeout.0, progress).map_err(|e| Problem::new(e).with_fix(fix))?;
    let branch = repo.branch.as_deref().unwrap_or("the default branch");
    Ok(((), format!("{url} ({branch}) into {}", repo.dest.display())))
}

/// git as the agent, in `dir`, with the agent's HOME (its credential helper) and no prompt.
fn git_command(user: &crate::session::users::AgentUser, dir: &Path) -> Command {
    use crate::session::users::unprivileged_command;
    let mut cmd = unprivileged_command("git", user);
    cmd.envs([
        ("HOME", user.home.display().to_string()),
        ("GIT_TERMINAL_PROMPT", "0".to_string()),
        ("LANG", "C.UTF-8".to_string()),
    ])
    .current_dir(dir);
    cmd
}

/// A short git command as the agent in `dir`: its stdout, or what went wrong.
fn git(
    user: &crate::session::users::AgentUser,
    dir: &Path,
    args: &[&str],
    deadline: Duration,
) -> Result<String, String> {
    let mut cmd = git_command(user, dir);
    cmd.args(args);
    match command::output(cmd, Options::new(deadline)) {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(out) => Err(format!(
            "git {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(crate::fix::error_chain(&e)),
    }
}

/// Whether two repository URLs name the same remote: case of scheme and host aside, and a
/// trailing `/` or `.git`.
pub(crate) fn same_remote(a: &str, b: &str) -> bool {
    fn norm(url: &str) -> String {
        let url = url.trim().trim_end_matches('/');
        let url = url.strip_suffix(".git").unwrap_or(url);
        match url.split_once("://") {
            Some((scheme, rest)) => {
                let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
                format!("{}://{}/{path}", scheme.to_ascii_lowercase(), host.to_ascii_lowercase())
            }
            None => url.to_string(),
        }
    }
    norm(a) == norm(b)
}

/// Runs `cmd` (already set up to run as the agent) within `timeout`, as its own process group
/// (see `command`); git's progress lines go to `progress`. On failure, the error names what
/// happened with the last lines git wrote.
pub(crate) fn run(cmd: Command, timeout: Duration, mut progress: impl FnMut(&str)) -> Result<(), String> {
    let mut tail: Vec<String> = Vec::new();
    let mut last_shown = Instant::now() - Duration::from_secs(1);
    let mut last_phase = String::new();
    let mut on_line = |line: &str| {
        // Throttled: a new phase at once, the same phase's percentages once a second.
        let phase = line.split(':').next().unwrap_or("").to_string();
        if phase != last_phase || last_shown.elapsed() >= Duration::from_secs(1) || line.contains("done") {
            progress(line);
            last_shown = Instant::now();
            last_phase = phase;
        }
        tail.push(line.to_string());
        if tail.len() > 6 {
            tail.remove(0);
        }
    };
    let result = command::output(cmd, Options { on_stderr_line: Some(&mut on_line), ..Options::new(timeout) });
    let last = || tail.iter().rev().take(3).rev().map(String::as_str).collect::<Vec<_>>().join(" | ");
    match result {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!("git clone failed ({}): {}", out.status, last())),
        Err(CommandError::TimedOut { .. }) => {
            let seen = if tail.is_empty() { String::new() } else { format!("; git's last words: {}", last()) };
            Err(format!(
                "the clone did not finish within {} (git and its helpers were killed){seen}",
                humantime::format_duration(timeout)
            ))
        }
        Err(e) => Err(crate::fix::error_chain(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remotes_are_the_same_whatever_the_case_of_the_host_and_a_trailing_slash_or_dot_git() {
        assert!(same_remote("https://GitHub.com/o/r.git", "https://github.com/o/r"));
        assert!(same_remote("https://github.com/o/r/", "https://github.com/o/r.git"));
        assert!(same_remote("git@github.com:o/r.git", "git@github.com:o/r"));
        assert!(!same_remote("https://github.com/o/r.git", "https://github.com/o/other.git"));
        assert!(!same_remote("https://github.com/O/r.git", "https://github.com/o/r.git"), "paths keep their case");
        assert!(!same_remote("https://github.com/o/r.git", "https://gitlab.com/o/r.git"));
    }

    #[test]
    fn clone_arguments_end_with_a_double_dash_before_the_url() {
        let args = clone_args("https://github.com/o/r.git", Path::new("/workspace/repo"), Some("dev"), Some(1));
        assert_eq!(
            args,
            [
                "clone",
                "--progress",
                "--branch",
                "dev",
                "--single-branch",
                "--depth",
                "1",
                "--",
                "https://github.com/o/r.git",
                "/workspace/repo"
            ]
        );
    }
}
