//! The repository's own `devcontainer.json` lifecycle commands, run by the boot's
//! `devcontainer` stage: after the clone and the readiness probes (so behind the proven
//! firewall), before the agent, as the agent user, in the repository.
//!
//! What cordon acts on, of the devcontainer spec (containers.dev, "Lifecycle scripts"):
//! `onCreateCommand`, `updateContentCommand` and `postCreateCommand` once per workspace (a
//! marker in the workspace records that they ran), then `postStartCommand` on every boot, in
//! that order, each only if the one before succeeded; `containerEnv` and `remoteEnv` for their
//! environment. Every other key (`image`, `features`, `forwardPorts`, `postAttachCommand`...)
//! is reported once as ignored.
//!
//! The file is JSONC (comments, trailing commas), parsed by `jsonc-parser` with the JSON5
//! extensions it also knows turned off: what VS Code accepts, no more.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::fix::{Problem, StageResult};
use crate::session::users::{AgentUser, unprivileged_command};
use crate::sys::command::{self, BOOT, CommandError, Interrupt, Options};

/// Where the file is looked for, in the repository, first found wins (the spec's order).
pub const FILES: [&str; 2] = [".devcontainer/devcontainer.json", ".devcontainer.json"];

/// The lifecycle keys cordon runs, in the order the spec runs them. The first three run once
/// per workspace.
pub const LIFECYCLE: [&str; 4] = ["onCreateCommand", "updateContentCommand", "postCreateCommand", "postStartCommand"];
const ONCE: usize = 3;
const ENV_KEYS: [&str; 2] = ["containerEnv", "remoteEnv"];

/// Lines of a failed command's output kept for its error.
const TAIL: usize = 8;
/// Lines of one command's output copied into the boot log, which lives on a small tmpfs: a
/// chatty install must not fill it. The tail is kept regardless.
const LOGGED_LINES: usize = 2000;

/// One command: a string runs under `/bin/sh -c`, an array is an argv with no shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    Shell(String),
    Argv(Vec<String>),
}

/// One lifecycle key's value: its commands, each with the name its output lines carry. An
/// object's named commands run in parallel (all must succeed); a string or array is one
/// command named after the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub key: &'static str,
    pub commands: Vec<(String, Cmd)>,
}

/// What cordon takes from a devcontainer.json.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The lifecycle keys present, in spec order.
    pub steps: Vec<Step>,
    /// `containerEnv`, then `remoteEnv`, in file order; None unsets (remoteEnv's `null`).
    pub env: Vec<(String, Option<String>)>,
    /// Top-level keys cordon does not act on, sorted.
    pub ignored: Vec<String>,
}

/// A devcontainer.json that cannot be used: the file, the line when known, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct FileError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

/// The devcontainer.json of the repository in `workdir`, if it has one.
pub fn find(workdir: &Path) -> Option<PathBuf> {
    FILES.iter().map(|f| workdir.join(f)).find(|p| p.is_file())
}

/// Parses a devcontainer.json's text. `file` is for the errors only.
pub fn parse(file: &Path, text: &str) -> Result<Spec, FileError> {
    let options = jsonc_parser::ParseOptions {
        allow_comments: true,
        allow_trailing_commas: true,
        allow_loose_object_property_names: false,
        allow_missing_commas: false,
        allow_single_quoted_strings: false,
        allow_hexadecimal_numbers: false,
        allow_unary_plus_numbers: false,
        allow_bare_decimal_point_numbers: false,
        allow_non_finite_numbers: false,
        allow_extended_string_escapes: false,
    };
    let value: Value = jsonc_parser::parse_to_serde_value(text, &options).map_err(|e| FileError {
        file: file.into(),
        line: Some(e.line_display()),
        message: format!("not valid JSONC: {}", e.kind()),
    })?;
    let bad = |key: &str, message: String| FileError { file: file.into(), line: line_of(text, key), message };
    let Value::Object(top) = value else {
        return Err(FileError { file: file.into(), line: Some(1), message: "must be a JSON object".into() });
    };
    let mut steps = Vec::new();
    for key in LIFECYCLE {
        match top.get(key) {
            None | Some(Value::Null) => {}
            Some(v) => {
                let commands = commands(key, v).map_err(|m| bad(key, format!("`{key}`: {m}")))?;
                if !commands.is_empty() {
                    steps.push(Step { key, commands });
                }
            }
        }
    }
    let mut env = Vec::new();
    for key in ENV_KEYS {
        match top.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(vars)) => {
                for (name, v) in vars {
                    let v = match v {
                        Value::String(s) => Some(s.clone()),
                        Value::Null if key == "remoteEnv" => None,
                        _ => return Err(bad(key, format!("`{key}.{name}` must be a string"))),
                    };
                    env.push((name.clone(), v));
                }
            }
            Some(_) => return Err(bad(key, format!("`{key}` must be an object of strings"))),
        }
    }
    let ignored =
        top.keys().filter(|k| !LIFECYCLE.contains(&k.as_str()) && !ENV_KEYS.contains(&k.as_str())).cloned().collect();
    Ok(Spec { steps, env, ignored })
}

fn commands(key: &str, v: &Value) -> Result<Vec<(String, Cmd)>, String> {
    fn one(v: &Value) -> Result<Option<Cmd>, String> {
        match v {
            Value::String(s) if s.trim().is_empty() => Ok(None),
            Value::String(s) => Ok(Some(Cmd::Shell(s.clone()))),
            Value::Array(items) if items.is_empty() => Ok(None),
            Value::Array(items) => items
                .iter()
                .map(|i| i.as_str().map(String::from).ok_or("an array command must be strings only".to_string()))
                .collect::<Result<_, _>>()
                .map(|argv| Some(Cmd::Argv(argv))),
            _ => Err("must be a string, an array of strings, or an object of those".into()),
        }
    }
    match v {
        Value::Object(named) => {
            let mut out = Vec::new();
            for (name, v) in named {
                if let Some(cmd) = one(v).map_err(|m| format!("`{name}` {m}"))? {
                    out.push((format!("{key}.{name}"), cmd));
                }
            }
            Ok(out)
        }
        v => Ok(one(v)?.into_iter().map(|cmd| (key.to_string(), cmd)).collect()),
    }
}

/// The line of the first `"key"` in `text`, for an error about that key's value.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let at = text.find(&format!("\"{key}\""))?;
    Some(text[..at].matches('\n').count() + 1)
}

/// The steps to run: the once-per-workspace ones unless they already ran, then postStart.
pub fn plan(spec: &Spec, created: bool) -> Vec<&Step> {
    spec.steps.iter().filter(|s| !created || !LIFECYCLE[..ONCE].contains(&s.key)).collect()
}

/// Where the marker that the once-per-workspace commands ran lives: inside `.git` when the
/// workspace is a repository (never committed, kept with the clone), else at its top.
pub fn marker(workdir: &Path) -> PathBuf {
    if workdir.join(".git").is_dir() {
        workdir.join(".git/cordon-devcontainer-created")
    } else {
        workdir.join(".cordon-devcontainer-created")
    }
}

/// The commands' environment: the agent's, then `containerEnv` and `remoteEnv` over it, with
/// the spec's `${containerEnv:NAME}` (`${containerEnv:NAME:default}`) and
/// `${containerWorkspaceFolder}` (`...Basename`) substituted. Anything else in `${}` is left as
/// it is, and named in the returned warnings.
pub fn environment(
    base: &[(String, String)],
    spec_env: &[(String, Option<String>)],
    workdir: &Path,
) -> (Vec<(String, String)>, Vec<String>) {
    let mut env: BTreeMap<String, String> = base.iter().cloned().collect();
    let mut warnings = Vec::new();
    for (name, value) in spec_env {
        match value {
            None => {
                env.remove(name);
            }
            Some(v) => {
                let v = substitute(v, &env, workdir, &mut warnings);
                env.insert(name.clone(), v);
            }
        }
    }
    (env.into_iter().collect(), warnings)
}

fn substitute(value: &str, env: &BTreeMap<String, String>, workdir: &Path, warnings: &mut Vec<String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(len) = rest[start..].find('}') else { break };
        let inner = &rest[start + 2..start + len];
        let mut parts = inner.splitn(3, ':');
        let replaced = match (parts.next(), parts.next(), parts.next()) {
            (Some("containerWorkspaceFolder"), None, _) => Some(workdir.display().to_string()),
            (Some("containerWorkspaceFolderBasename"), None, _) => {
                Some(workdir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
            }
            (Some("containerEnv" | "env"), Some(name), default) => {
                Some(env.get(name).cloned().unwrap_or_else(|| default.unwrap_or("").to_string()))
            }
            _ => None,
        };
        match replaced {
            Some(r) => out.push_str(&r),
            None => {
                warnings.push(format!("devcontainer.json: `${{{inner}}}` is not substituted by cordon; left as it is"));
                out.push_str(&rest[start..start + len + 1]);
            }
        }
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    out
}

/// What the stage tells the boot log as it goes.
pub enum Note {
    /// A line of a command's output, or of what the stage does.
    Progress(String),
    /// Something ignored or not understood.
    Warn(String),
}

/// Whether the `devcontainer` stage applies: the file to run, or why the stage is skipped.
pub fn applies(config: &crate::config::Devcontainer, workdir: &Path) -> Result<PathBuf, String> {
    if !config.enabled {
        return Err("devcontainer.enabled = false".into());
    }
    find(workdir).ok_or_else(|| format!("no {} in {}", FILES.join(" or "), workdir.display()))
}

/// How the commands run: as whom, where, with what, for how long at most.
pub struct Runner<'a> {
    pub user: &'a AgentUser,
    pub workdir: &'a Path,
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
}

/// The boot's `devcontainer` stage for the file at `file` in `workdir`: read and parse it (as
/// the agent: a symlink the agent left in its workspace must not make root read a file for
/// it), report the ignored keys, run the steps, and record the once-per-workspace ones.
pub fn stage(
    file: &Path,
    runner: &Runner,
    created_marker: &Path,
    note: &mut dyn FnMut(Note),
) -> StageResult<(), Problem> {
    let shown = file.strip_prefix(runner.workdir).unwrap_or(file).display().to_string();
    let text = read_as_agent(file, runner)?;
    let spec = parse(file, &text).map_err(|e| {
        Problem::new(e.to_string()).with_fix("fix the file (JSONC: comments and trailing commas are allowed)")
    })?;
    if !spec.ignored.is_empty() {
        note(Note::Warn(format!("{shown}: cordon does not act on {}; ignored", spec.ignored.join(", "))));
    }
    let (env, warnings) = environment(&runner.env, &spec.env, runner.workdir);
    for w in warnings {
        note(Note::Warn(w));
    }
    let runner = Runner { env, ..*runner };
    let created = created_marker.exists();
    let steps = plan(&spec, created);
    let mut ran = Vec::new();
    // Recorded once the once-per-workspace steps succeeded, before postStart: a postStart that
    // fails must not make them run again on the next boot.
    let mut recorded = created;
    for step in &steps {
        if step.key == "postStartCommand" && !recorded {
            record_created(created_marker, &runner)?;
            recorded = true;
        }
        run_step(step, &runner, note).map_err(|e| {
            Problem::new(format!("{shown}: {e}"))
                .with_fix(format!("fix `{}` in {shown}, or set devcontainer.enabled = false", step.key))
        })?;
        ran.push(step.key);
    }
    if !recorded {
        record_created(created_marker, &runner)?;
    }
    let once = if created { " (the once-per-workspace commands ran on an earlier boot)" } else { "" };
    let what = if ran.is_empty() { "no lifecycle command".to_string() } else { ran.join(", ") };
    Ok(((), format!("{shown}: ran {what}{once}")))
}

fn read_as_agent(file: &Path, runner: &Runner) -> Result<String, Problem> {
    let mut cmd = unprivileged_command("cat", runner.user);
    cmd.arg("--").arg(file).current_dir(runner.workdir);
    match command::output(cmd, Options::new(Duration::from_secs(10))) {
        Ok(out) if out.status.success() => {
            String::from_utf8(out.stdout).map_err(|_| Problem::new(format!("{} is not UTF-8", file.display())))
        }
        Ok(out) => Err(Problem::new(format!(
            "cannot read {} as the agent: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
        .with_fix("make the file readable by the agent user")),
        Err(e) => Err(Problem::caused_by(format!("cannot read {}", file.display()), &e)),
    }
}

/// Writes the once-per-workspace marker, as the agent (the workspace is the agent's).
fn record_created(marker: &Path, runner: &Runner) -> Result<(), Problem> {
    let mut cmd = unprivileged_command("touch", runner.user);
    cmd.arg("--").arg(marker).current_dir(runner.workdir);
    match command::output(cmd, Options::new(Duration::from_secs(10))) {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(Problem::new(format!(
            "cannot record that the create commands ran in {}: {}",
            marker.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
        Err(e) => Err(Problem::caused_by(format!("cannot write {}", marker.display()), &e)),
    }
}

/// The process for one command, as the agent with no privileges, in the repository, with the
/// commands' environment; its stdout joins its stderr so both stream, in order, into the log.
fn process(cmd: &Cmd, runner: &Runner) -> Command {
    use std::os::unix::process::CommandExt;
    let (program, args) = match cmd {
        Cmd::Shell(script) => ("/bin/sh".to_string(), vec!["-c".to_string(), script.clone()]),
        Cmd::Argv(argv) => (argv[0].clone(), argv[1..].to_vec()),
    };
    let mut c = unprivileged_command(program, runner.user);
    c.args(args).envs(runner.env.iter().map(|(k, v)| (k, v))).current_dir(runner.workdir);
    // SAFETY: dup2 only, between fork and exec (after the privileges are dropped).
    unsafe {
        c.pre_exec(crate::sys::stdout_to_stderr);
    }
    c
}

enum Msg {
    Line(usize, String),
    Done(usize, Result<std::process::ExitStatus, CommandError>),
}

/// Runs one step's commands in parallel, each line of their output to `note` prefixed with
/// the command's name. The first failure stops the others (their process groups are killed)
/// and is the step's error, with the tail of its output; so does a stop request.
fn run_step(step: &Step, runner: &Runner, note: &mut dyn FnMut(Note)) -> Result<(), String> {
    let stop = Interrupt::new();
    let (tx, rx) = mpsc::channel();
    let mut tails: Vec<Vec<String>> = vec![Vec::new(); step.commands.len()];
    let mut logged = vec![0usize; step.commands.len()];
    let mut failure: Option<String> = None;
    std::thread::scope(|scope| {
        for (i, (_, cmd)) in step.commands.iter().enumerate() {
            let tx = tx.clone();
            let stop = &stop;
            let proc = process(cmd, runner);
            let timeout = runner.timeout;
            scope.spawn(move || {
                let line_tx = tx.clone();
                let mut on_line = |l: &str| {
                    let _ = line_tx.send(Msg::Line(i, l.to_string()));
                };
                let result = command::output(
                    proc,
                    Options { on_stderr_line: Some(&mut on_line), interrupt: stop, ..Options::new(timeout) },
                )
                .map(|o| o.status);
                let _ = tx.send(Msg::Done(i, result));
            });
        }
        drop(tx);
        let mut left = step.commands.len();
        while left > 0 {
            if BOOT.is_requested() {
                stop.request();
            }
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Msg::Line(i, line)) => {
                    logged[i] += 1;
                    if logged[i] <= LOGGED_LINES {
                        note(Note::Progress(format!("{}: {line}", step.commands[i].0)));
                    } else if logged[i] == LOGGED_LINES + 1 {
                        let name = &step.commands[i].0;
                        note(Note::Progress(format!(
                            "{name}: (more than {LOGGED_LINES} lines: the rest is not logged)"
                        )));
                    }
                    tails[i].push(line);
                    if tails[i].len() > TAIL {
                        tails[i].remove(0);
                    }
                }
                Ok(Msg::Done(i, result)) => {
                    left -= 1;
                    let name = &step.commands[i].0;
                    let tail = || {
                        if tails[i].is_empty() {
                            "no output".to_string()
                        } else {
                            format!("last output: {}", tails[i].join(" | "))
                        }
                    };
                    let failed = match result {
                        Ok(s) if s.success() => None,
                        Ok(s) => Some(format!("`{name}` failed ({}); {}", status_text(s), tail())),
                        Err(CommandError::Interrupted { .. }) if failure.is_some() => None,
                        Err(CommandError::TimedOut { deadline, .. }) => Some(format!(
                            "`{name}` did not finish within {} (devcontainer.timeout); it was killed; {}",
                            humantime::format_duration(deadline),
                            tail()
                        )),
                        Err(e) => Some(format!("`{name}`: {}", crate::fix::error_chain(&e))),
                    };
                    if let Some(f) = failed
                        && failure.is_none()
                    {
                        failure = Some(f);
                        stop.request();
                    }
                }
                Err(_) => {}
            }
        }
    });
    failure.map_or(Ok(()), Err)
}

/// `exit status 3`, or `killed by SIGKILL`.
fn status_text(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => format!("killed by {}", crate::sys::signal_name(sig)),
        _ => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"// A devcontainer as VS Code writes it: comments and trailing commas.
{
    "name": "demo", /* a block comment */
    "image": "mcr.microsoft.com/devcontainers/base:ubuntu",
    "features": { "ghcr.io/devcontainers/features/node:1": {}, },
    "forwardPorts": [3000,],
    "onCreateCommand": "npm ci",
    "postCreateCommand": ["make", "setup", "--quiet",],
    "postStartCommand": {
        "server": "npm run dev",
        "watch": ["npm", "run", "watch"],
    },
    "containerEnv": { "MODE": "dev", },
    "remoteEnv": { "PATH": "${containerEnv:PATH}:${containerWorkspaceFolder}/bin", "DROP": null },
}
"#;

    fn spec() -> Spec {
        parse(Path::new("/ws/.devcontainer/devcontainer.json"), FILE).unwrap()
    }

    #[test]
    fn jsonc_with_comments_and_trailing_commas_parses_into_the_three_command_forms() {
        let s = spec();
        let keys: Vec<&str> = s.steps.iter().map(|s| s.key).collect();
        assert_eq!(keys, ["onCreateCommand", "postCreateCommand", "postStartCommand"]);
        assert_eq!(s.steps[0].commands, [("onCreateCommand".to_string(), Cmd::Shell("npm ci".into()))]);
        assert_eq!(
            s.steps[1].commands,
            [("postCreateCommand".to_string(), Cmd::Argv(vec!["make".into(), "setup".into(), "--quiet".into()]))]
        );
        assert_eq!(
            s.steps[2].commands,
            [
                ("postStartCommand.server".to_string(), Cmd::Shell("npm run dev".into())),
                ("postStartCommand.watch".to_string(), Cmd::Argv(vec!["npm".into(), "run".into(), "watch".into()])),
            ]
        );
    }

    #[test]
    fn keys_cordon_does_not_act_on_are_listed_as_ignored() {
        assert_eq!(spec().ignored, ["features", "forwardPorts", "image", "name"]);
    }

    #[test]
    fn the_once_per_workspace_steps_are_left_out_once_they_ran() {
        let s = spec();
        let keys = |created| plan(&s, created).iter().map(|s| s.key).collect::<Vec<_>>();
        assert_eq!(keys(false), ["onCreateCommand", "postCreateCommand", "postStartCommand"]);
        assert_eq!(keys(true), ["postStartCommand"]);
    }

    #[test]
    fn the_environment_is_the_agents_with_container_and_remote_env_over_it() {
        let base = vec![("PATH".to_string(), "/usr/bin:/bin".to_string()), ("DROP".into(), "x".into())];
        let (env, warnings) = environment(&base, &spec().env, Path::new("/ws/repo"));
        assert_eq!(
            env,
            [("MODE".to_string(), "dev".to_string()), ("PATH".into(), "/usr/bin:/bin:/ws/repo/bin".into())]
        );
        assert!(warnings.is_empty());
        let (env, warnings) = environment(
            &[],
            &[("A".into(), Some("${localEnv:HOME}/${containerEnv:NOPE:dflt}".into()))],
            Path::new("/w"),
        );
        assert_eq!(env, [("A".to_string(), "${localEnv:HOME}/dflt".to_string())]);
        assert_eq!(warnings, ["devcontainer.json: `${localEnv:HOME}` is not substituted by cordon; left as it is"]);
    }

    #[test]
    fn a_file_that_does_not_parse_fails_with_file_and_line() {
        let e = parse(Path::new("/ws/.devcontainer.json"), "{\n  \"a\": 1,\n  \"b\": [1 2]\n}").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.to_string().starts_with("/ws/.devcontainer.json:3: not valid JSONC"), "{e}");
        // JSON5 beyond JSONC is refused: single quotes.
        assert!(parse(Path::new("f"), "{'a': 1}").is_err());
    }

    #[test]
    fn a_command_of_the_wrong_shape_fails_naming_the_key_and_its_line() {
        let e = parse(Path::new("f.json"), "{\n\"name\": \"x\",\n\"postStartCommand\": 42\n}").unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("`postStartCommand`: must be a string"), "{e}");
        let e = parse(Path::new("f.json"), "{\"onCreateCommand\": {\"a\": [1]}}").unwrap_err();
        assert!(e.message.contains("`a` an array command must be strings only"), "{e}");
        let e = parse(Path::new("f.json"), "[]").unwrap_err();
        assert_eq!(e.message, "must be a JSON object");
    }

    #[test]
    fn the_marker_goes_inside_git_when_the_workspace_is_a_repository() {
        let dir = std::env::temp_dir().join(format!("cordon-devc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(marker(&dir), dir.join(".cordon-devcontainer-created"));
        std::fs::create_dir_all(dir.join(".git")).unwrap();
        assert_eq!(marker(&dir), dir.join(".git/cordon-devcontainer-created"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
