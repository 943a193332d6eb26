//! The credentials stage: what the agent needs to use git, gh, npm and Claude Code without a
//! token in its environment, in argv, in a URL or in `.git/config`. Every file is written on the
//! home tmpfs, owned by the agent, mode 0600; `GH_PAT` lives in exactly one of them
//! (`~/.config/cordon/github-token`), read by `cordon git-credential` when git asks.

use std::io::{BufRead, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::config::secrets::Secret;
use crate::session::users::AgentUser;

/// Where the token lives, relative to the agent's home.
pub const TOKEN_FILE: &str = ".config/cordon/github-token";

/// The files of the agent's home that the credentials stage writes as root, relative to the
/// home. No `agent.persist` path may hold one (but as its direct child, like
/// `.claude/settings.json` in `~/.claude`): a directory on the volume is the agent's to fill
/// with symlinks, and root must not follow one.
pub const BOOT_WRITTEN: [&str; 6] =
    [".gitconfig", TOKEN_FILE, ".config/gh/hosts.yml", ".npmrc", ".claude.json", ".claude/settings.json"];

/// A credential host: scheme and host name. `github.com` means HTTPS only.
pub fn parse_host(entry: &str) -> (&str, &str) {
    match entry.split_once("://") {
        Some((scheme, host)) => (scheme, host.trim_end_matches('/')),
        None => ("https", entry),
    }
}

/// `~/.gitconfig`: identity, the credential helper, and SSH-style GitHub URLs rewritten to HTTPS
/// (there is no SSH key, and port 22 is closed).
pub fn render_gitconfig(config: &Config, cordon: &Path) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let hosts: String = config.git.credential_hosts.iter().map(|h| format!(" --host {h}")).collect();
    let mut out = format!(
        "# Written by cordon at boot.\n[user]\n\tname = \"{}\"\n\temail = \"{}\"\n[credential]\n\thelper = \"{} git-credential{hosts}\"\n\tuseHttpPath = false\n",
        esc(&config.git.user_name),
        esc(&config.git.user_email),
        cordon.display()
    );
    out.push_str("[url \"https://github.com/\"]\n\tinsteadOf = git@github.com:\n\tinsteadOf = ssh://git@github.com/\n");
    out
}

/// `~/.config/gh/hosts.yml`, so `gh` works without GH_TOKEN in the environment.
pub fn render_gh_hosts(token: &Secret) -> String {
    format!("github.com:\n    oauth_token: {}\n    git_protocol: https\n", token.expose())
}

/// `~/.npmrc` lines for GitHub Packages scopes.
pub fn render_npmrc(scopes: &[String], token: &Secret) -> String {
    let mut out = String::new();
    for scope in scopes {
        out.push_str(&format!("{scope}:registry=https://npm.pkg.github.com\n"));
    }
    out.push_str(&format!("//npm.pkg.github.com/:_authToken={}\n", token.expose()));
    out
}

/// `~/.claude.json`: onboarding done, the work directory trusted, so Claude Code starts straight
/// into the session.
pub fn render_claude_json(workdir: &Path) -> String {
    let mut projects = serde_json::Map::new();
    projects.insert(
        workdir.display().to_string(),
        serde_json::json!({ "hasTrustDialogAccepted": true, "hasCompletedProjectOnboarding": true }),
    );
    serde_json::to_string_pretty(&serde_json::json!({
        "hasCompletedOnboarding": true,
        "projects": projects,
    }))
    .expect("static JSON")
}

/// Whether the agent is Claude Code (its program's file name is `claude`).
pub fn is_claude(argv0: &str) -> bool {
    Path::new(argv0).file_name().is_some_and(|n| n == "claude")
}

/// Writes `text` to `home/rel` as the agent's, mode 0600, creating agent-owned directories.
fn write_private(home: &Path, rel: &str, text: &str, user: &AgentUser) -> std::io::Result<PathBuf> {
    let path = home.join(rel);
    let mut dir = home.to_path_buf();
    for part in Path::new(rel).parent().into_iter().flat_map(Path::components) {
        dir.push(part);
        if !dir.exists() {
            std::fs::create_dir(&dir)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
            std::os::unix::fs::chown(&dir, Some(user.uid), Some(user.gid))?;
        }
    }
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
    f.write_all(text.as_bytes())?;
    std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))?;
    Ok(path)
}

/// Writes every credential file; returns a one-line summary (no values).
pub fn write_all(
    config: &Config,
    user: &AgentUser,
    gh_pat: Option<&Secret>,
    workdir: &Path,
    cordon: &Path,
) -> std::io::Result<String> {
    let home = &user.home;
    let mut wrote = vec![".gitconfig"];
    write_private(home, ".gitconfig", &render_gitconfig(config, cordon), user)?;
    if let Some(token) = gh_pat {
        write_private(home, TOKEN_FILE, token.expose(), user)?;
        write_private(home, ".config/gh/hosts.yml", &render_gh_hosts(token), user)?;
        wrote.extend(["git credential helper token", "gh hosts.yml"]);
        if !config.git.npm_scopes.is_empty() {
            write_private(home, ".npmrc", &render_npmrc(&config.git.npm_scopes, token), user)?;
            wrote.push(".npmrc");
        }
    }
    if is_claude(&config.agent.command[0]) {
        write_private(home, ".claude.json", &render_claude_json(workdir), user)?;
        wrote.push(".claude.json");
        let template = Path::new("/etc/cordon/claude-settings.json");
        if let Ok(template) = std::fs::read_to_string(template) {
            let settings =
                crate::session::claude::render_settings(&template, &config.claude).map_err(std::io::Error::other)?;
            write_private(home, ".claude/settings.json", &settings, user)?;
            wrote.push(".claude/settings.json");
        }
    }
    Ok(format!("wrote {} for {}", wrote.join(", "), user.name))
}

/// The boot's `credentials` stage: the agent's git identity and credential helper, gh, npm and
/// Claude Code files, 0600 on the home tmpfs. After the tmpfs mounts and the firewall; before the
/// read-only root and before the clone, which needs them.
pub fn stage(
    config: &Config,
    user: &AgentUser,
    gh_pat: Option<&Secret>,
    workdir: &Path,
) -> crate::fix::StageResult<()> {
    let summary = write_all(config, user, gh_pat, workdir, &crate::sys::cordon_exe()).map_err(|e| {
        crate::fix::Problem::caused_by(format_args!("cannot write the credential files in {}", user.home.display()), &e)
            .with_fix("the agent's home must be writable (a tmpfs, by default)")
    })?;
    Ok(((), summary))
}

/// `cordon git-credential <operation>`: git's credential helper protocol (gitcredentials(7)).
/// For `get` on a configured host it answers with the token from the agent's token file; any
/// other operation, or host, gets nothing (git then tries its other helpers, or fails).
pub fn helper(operation: &str, input: impl BufRead, hosts: &[String], home: &Path) -> Option<String> {
    if operation != "get" {
        return None;
    }
    let mut protocol = String::new();
    let mut host = String::new();
    for line in input.lines().map_while(Result::ok) {
        if line.is_empty() {
            break;
        }
        match line.split_once('=') {
            Some(("protocol", v)) => protocol = v.to_string(),
            Some(("host", v)) => host = v.to_string(),
            _ => {}
        }
    }
    let allowed = hosts
        .iter()
        .map(|h| parse_host(h))
        .any(|(s, h)| h.eq_ignore_ascii_case(&host) && (s == protocol || protocol == "https"));
    if !allowed {
        return None;
    }
    let token = std::fs::read_to_string(home.join(TOKEN_FILE)).ok()?;
    Some(format!("username=x-access-token\npassword={}\n", token.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitconfig_has_identity_helper_and_https_rewrites_but_no_secret() {
        let mut c = Config::default();
        c.git.user_name = "Robot \"R\"".into();
        let text = render_gitconfig(&c, Path::new("/usr/local/bin/cordon"));
        assert!(text.contains("name = \"Robot \\\"R\\\"\""), "{text}");
        assert!(text.contains("helper = \"/usr/local/bin/cordon git-credential --host github.com\""), "{text}");
        assert!(text.contains("insteadOf = git@github.com:"));
    }

    #[test]
    fn the_helper_answers_only_get_for_configured_hosts_and_protocols() {
        let dir = std::env::temp_dir().join(format!("cordon-cred-{}", std::process::id()));
        std::fs::create_dir_all(dir.join(".config/cordon")).unwrap();
        std::fs::write(dir.join(TOKEN_FILE), "ghp_token\n").unwrap();
        let hosts = vec!["github.com".to_string(), "http://git.example.com".to_string()];
        let ask = |op: &str, input: &str| helper(op, input.as_bytes(), &hosts, &dir);
        assert_eq!(
            ask("get", "protocol=https\nhost=github.com\n\n").unwrap(),
            "username=x-access-token\npassword=ghp_token\n"
        );
        assert!(ask("get", "protocol=http\nhost=github.com\n").is_none(), "github.com is HTTPS only");
        assert!(ask("get", "protocol=http\nhost=git.example.com\n").is_some());
        assert!(ask("get", "protocol=https\nhost=evil.example.net\n").is_none());
        assert!(ask("store", "protocol=https\nhost=github.com\npassword=x\n").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn claude_json_trusts_the_work_directory() {
        let v: serde_json::Value = serde_json::from_str(&render_claude_json(Path::new("/workspace/repo"))).unwrap();
        assert_eq!(v["hasCompletedOnboarding"], true);
        assert_eq!(v["projects"]["/workspace/repo"]["hasTrustDialogAccepted"], true);
        assert!(is_claude("claude") && is_claude("/usr/local/bin/claude") && !is_claude("/bin/sh"));
    }

    #[test]
    fn the_shipped_claude_settings_template_is_valid_json_for_an_unattended_agent() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/claude-settings.json");
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(v["permissions"]["defaultMode"], "bypassPermissions");
        assert_eq!(v["env"]["DISABLE_AUTOUPDATER"], "1", "the root is read-only: the updater cannot work");
    }

    #[test]
    fn npmrc_points_scopes_at_github_packages() {
        let text = render_npmrc(&["@acme".into()], &Secret::new("t0k"));
        assert_eq!(text, "@acme:registry=https://npm.pkg.github.com\n//npm.pkg.github.com/:_authToken=t0k\n");
    }
}
