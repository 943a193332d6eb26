//! Claude Code extras of the system cordon replaces, each off unless configured (`[claude]`),
//! all run as the agent, behind the firewall:
//! - plugins, installed by the `plugins` stage before the agent's first start;
//! - a status line (model, context use, session) and a Stop hook that names the tmux session
//!   after the task once: scripts shipped in the image ([`SCRIPTS_DIR`]), referenced by the
//!   settings template (`config/claude-settings.json`), which [`render_settings`] trims of
//!   what is not turned on.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::config::Claude;
use crate::fix::StageResult;
use crate::session::devcontainer::Note;
use crate::session::users::{AgentUser, find_program, unprivileged_command};
use crate::sys::command::{self, Options};

/// Where the image installs the scripts the settings template refers to.
pub const SCRIPTS_DIR: &str = "/usr/local/lib/cordon";
/// The status-line command's script, as the template names it.
pub const STATUS_LINE: &str = "/usr/local/lib/cordon/claude-statusline.sh";
/// The Stop hook's script, as the template names it.
pub const NAME_SESSION: &str = "/usr/local/lib/cordon/claude-name-session.sh";

/// Where the plugins installed so far are recorded, relative to the home: one per line, so a
/// home kept across restarts (`agent.persist = ["~/.claude"]`) installs each once.
pub const INSTALLED: &str = ".claude/cordon-plugins";

/// The agent's `~/.claude/settings.json` from the template: `statusLine` only with
/// `claude.status_line`, the Stop hook running [`NAME_SESSION`] only with
/// `claude.name_session`; everything else as the template has it.
pub fn render_settings(template: &str, config: &Claude) -> Result<String, String> {
    let mut v: Value =
        serde_json::from_str(template).map_err(|e| format!("the Claude Code settings template is not JSON: {e}"))?;
    let top = v.as_object_mut().ok_or("the Claude Code settings template is not a JSON object")?;
    if !config.status_line {
        top.remove("statusLine");
    }
    if !config.name_session
        && let Some(hooks) = top.get_mut("hooks").and_then(Value::as_object_mut)
    {
        if let Some(stop) = hooks.get_mut("Stop").and_then(Value::as_array_mut) {
            let names_session = |group: &Value| {
                group["hooks"].as_array().is_some_and(|hs| hs.iter().any(|h| h["command"] == NAME_SESSION))
            };
            stop.retain(|group| !names_session(group));
            if stop.is_empty() {
                hooks.remove("Stop");
            }
        }
        if hooks.is_empty() {
            top.remove("hooks");
        }
    }
    Ok(serde_json::to_string_pretty(&v).expect("JSON value") + "\n")
}

/// Whether the `plugins` stage applies, or why it is skipped.
pub fn applies(config: &Claude) -> Result<(), String> {
    if config.plugins.is_empty() && config.marketplaces.is_empty() {
        return Err("no claude.plugins".into());
    }
    Ok(())
}

/// The plugins not yet recorded in `installed` (the record's text), in configured order.
pub fn to_install<'a>(config: &'a Claude, installed: &str) -> Vec<&'a str> {
    let done: Vec<&str> = installed.lines().map(str::trim).collect();
    config.plugins.iter().map(String::as_str).filter(|p| !done.contains(p)).collect()
}

/// What happened to one `claude plugin` command.
enum Outcome {
    Ok,
    Failed(String),
}

/// Runs `claude plugin ARGS` as the agent in its home, its output lines to `progress`.
fn run_claude(
    args: &[&str],
    user: &AgentUser,
    env: &[(String, String)],
    timeout: Duration,
    note: &mut dyn FnMut(Note),
) -> Outcome {
    use std::os::unix::process::CommandExt;
    let mut cmd = unprivileged_command("claude", user);
    cmd.arg("plugin").args(args).envs(env.iter().map(|(k, v)| (k, v))).current_dir(&user.home);
    // SAFETY: dup2 only, between fork and exec (after the privileges are dropped).
    unsafe {
        cmd.pre_exec(crate::sys::stdout_to_stderr);
    }
    let shown = format!("claude plugin {}", args.join(" "));
    let mut tail: Vec<String> = Vec::new();
    let mut on_line = |l: &str| {
        note(Note::Progress(format!("{shown}: {l}")));
        tail.push(l.to_string());
        if tail.len() > 3 {
            tail.remove(0);
        }
    };
    let result = command::output(cmd, Options { on_stderr_line: Some(&mut on_line), ..Options::new(timeout) });
    match result {
        Ok(out) if out.status.success() => Outcome::Ok,
        Ok(out) => Outcome::Failed(format!(
            "`{shown}` failed (exit status {}){}",
            crate::sys::exit_code(out.status),
            if tail.is_empty() { String::new() } else { format!(": {}", tail.join(" / ")) }
        )),
        Err(e) => Outcome::Failed(format!("`{shown}`: {}", crate::fix::error_chain(&e))),
    }
}

/// Runs `sh -c SCRIPT sh ARGS...` as the agent (reading and writing its own files as itself:
/// root following a symlink the agent left in its home is what this avoids).
fn as_agent(script: &str, args: &[&str], user: &AgentUser) -> Result<String, String> {
    let mut cmd = unprivileged_command("/bin/sh", user);
    cmd.args(["-c", script, "sh"]).args(args).current_dir(&user.home);
    match command::output(cmd, Options::new(Duration::from_secs(10))) {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(out) => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        Err(e) => Err(crate::fix::error_chain(&e)),
    }
}

/// The boot's `plugins` stage: adds the marketplaces, then installs each plugin not yet
/// recorded in [`INSTALLED`], as the agent with its environment, behind the proven firewall.
/// A failure is a warning in the boot log and the boot goes on: the agent works without a
/// plugin, and a failed one is tried again on the next boot.
pub fn stage(
    config: &Claude,
    user: &AgentUser,
    env: &[(String, String)],
    note: &mut dyn FnMut(Note),
) -> StageResult<()> {
    if find_program("claude").is_none() {
        note(Note::Warn("claude.plugins: `claude` is not on the agent's PATH; no plugin was installed".into()));
        return Ok(((), "claude not found: nothing installed".into()));
    }
    let record = home_file(user, INSTALLED);
    let installed = as_agent("cat -- \"$1\" 2>/dev/null || true", &[&record], user).unwrap_or_default();
    let timeout = config.plugin_timeout.0;
    let mut failed = Vec::new();
    for m in &config.marketplaces {
        if let Outcome::Failed(why) = run_claude(&["marketplace", "add", m], user, env, timeout, note) {
            note(Note::Warn(why));
        }
    }
    let todo = to_install(config, &installed);
    let mut done = Vec::new();
    for p in &todo {
        match run_claude(&["install", p], user, env, timeout, note) {
            Outcome::Ok => {
                let write = "mkdir -p -- \"$(dirname -- \"$1\")\" && printf '%s\\n' \"$2\" >> \"$1\"";
                if let Err(e) = as_agent(write, &[&record, p], user) {
                    note(Note::Warn(format!("claude.plugins: cannot record `{p}` as installed in ~/{INSTALLED}: {e}")));
                }
                done.push(*p);
            }
            Outcome::Failed(why) => {
                note(Note::Warn(why));
                failed.push(*p);
            }
        }
    }
    let earlier = config.plugins.len() - todo.len();
    let mut detail = format!("installed {}", if done.is_empty() { "none".into() } else { done.join(", ") });
    if !failed.is_empty() {
        detail.push_str(&format!("; FAILED {} (see the warnings; tried again next boot)", failed.join(", ")));
    }
    if earlier > 0 {
        detail.push_str(&format!("; {earlier} installed on an earlier boot"));
    }
    Ok(((), detail))
}

fn home_file(user: &AgentUser, rel: &str) -> String {
    Path::new(&user.home).join(rel).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> String {
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/claude-settings.json")).unwrap()
    }

    #[test]
    fn the_template_refers_to_the_shipped_status_line_and_stop_hook_scripts() {
        let v: Value = serde_json::from_str(&template()).unwrap();
        assert_eq!(v["statusLine"]["command"], STATUS_LINE);
        assert_eq!(v["hooks"]["Stop"][0]["hooks"][0]["command"], NAME_SESSION);
        for script in [STATUS_LINE, NAME_SESSION] {
            let name = Path::new(script).file_name().unwrap();
            assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join("config").join(name).is_file(), "{script} is shipped");
        }
    }

    #[test]
    fn the_status_line_and_the_session_namer_are_off_unless_configured() {
        let off: Value = serde_json::from_str(&render_settings(&template(), &Claude::default()).unwrap()).unwrap();
        assert!(off.get("statusLine").is_none(), "{off}");
        assert!(off.get("hooks").is_none(), "{off}");
        assert_eq!(off["permissions"]["defaultMode"], "bypassPermissions", "the rest is kept");

        let on = Claude { status_line: true, name_session: true, ..Claude::default() };
        let on: Value = serde_json::from_str(&render_settings(&template(), &on).unwrap()).unwrap();
        assert_eq!(on["statusLine"]["command"], STATUS_LINE);
        assert_eq!(on["hooks"]["Stop"][0]["hooks"][0]["command"], NAME_SESSION);
    }

    #[test]
    fn other_stop_hooks_of_an_operators_template_are_kept() {
        let t = format!(
            r#"{{"hooks": {{"Stop": [{{"hooks": [{{"type": "command", "command": "{NAME_SESSION}"}}]}},
                {{"hooks": [{{"type": "command", "command": "/opt/notify.sh"}}]}}]}}}}"#
        );
        let v: Value = serde_json::from_str(&render_settings(&t, &Claude::default()).unwrap()).unwrap();
        assert_eq!(v["hooks"]["Stop"].as_array().unwrap().len(), 1);
        assert_eq!(v["hooks"]["Stop"][0]["hooks"][0]["command"], "/opt/notify.sh");
        assert!(render_settings("[1]", &Claude::default()).is_err());
    }

    #[test]
    fn plugins_recorded_as_installed_are_not_installed_again() {
        let c = Claude { plugins: vec!["a@m".into(), "b@m".into(), "c@m".into()], ..Claude::default() };
        assert_eq!(to_install(&c, ""), ["a@m", "b@m", "c@m"]);
        assert_eq!(to_install(&c, "b@m\na@m\n"), ["c@m"]);
        assert!(applies(&Claude::default()).is_err());
        assert!(applies(&c).is_ok());
    }
}
