//! `cordon check` as an operator runs it: no root, no side effects, every problem listed, no
//! secret value ever printed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SENTINEL: &str = "ghp_CHECK_SENTINEL_do_not_print";

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("check-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The shipped config, pointed at the shipped allowlist (it names /etc/cordon/domains.conf).
fn shipped_config(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo("config/cordon.toml")).unwrap();
    let text = text.replace("/etc/cordon/domains.conf", repo("network/domains.conf").to_str().unwrap());
    let path = dir.join("cordon.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn check(config: &Path, env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cordon"))
        .args(["check", "--config", config.to_str().unwrap()])
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn shipped_config_checks_clean_and_prints_it_with_secrets_redacted() {
    let dir = scratch("ok");
    let out = check(
        &shipped_config(&dir),
        &[("GH_PAT", SENTINEL), ("CLAUDE_CODE_OAUTH_TOKEN", SENTINEL), ("CLAUDE_PROMPT", SENTINEL)],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("GH_PAT: set (redacted)"), "{stdout}");
    assert!(stdout.contains("agent.prompt: set (redacted"), "{stdout}");
    assert!(stdout.contains("stop_grace = \"10s\""), "{stdout}");
    assert!(stdout.contains("[[tmpfs]]"), "{stdout}");
    assert!(!stdout.contains(SENTINEL) && !stderr.contains(SENTINEL), "a secret value was printed");
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cordon")).args(args).env_clear().envs(env.iter().copied()).output().unwrap()
}

#[test]
fn the_readme_check_command_passes_from_the_repository_without_secrets() {
    // The README's command, from the repository's root, on a machine with no secrets and no
    // /etc/cordon: the shipped config names the container's allowlist path.
    let out = Command::new(env!("CARGO_BIN_EXE_cordon"))
        .args(["check", "--config", "config/cordon.toml", "--allowlist", "network/domains.conf", "--no-secrets"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_clear()
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("secrets: not checked (--no-secrets): GH_PAT, CLAUDE_CODE_OAUTH_TOKEN"), "{stdout}");
    assert!(
        stdout.contains("allowlist = \"network/domains.conf\""),
        "the effective config shows the file checked: {stdout}"
    );
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    assert!(
        readme.contains("cargo run -- check --config config/cordon.toml --allowlist network/domains.conf --no-secrets"),
        "the README shows the command this test runs"
    );
}

#[test]
fn without_the_options_the_missing_allowlist_and_secrets_are_problems_that_name_the_options() {
    let out = Command::new(env!("CARGO_BIN_EXE_cordon"))
        .args(["check", "--config", "config/cordon.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_clear()
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--allowlist FILE"), "{stderr}");
    assert!(stderr.contains("--no-secrets"), "{stderr}");
}

#[test]
fn a_relative_allowlist_path_is_taken_from_the_config_files_directory() {
    let dir = scratch("relative");
    std::fs::create_dir_all(dir.join("lists")).unwrap();
    std::fs::write(dir.join("lists/domains.conf"), "ok.example.com\n*\n").unwrap();
    std::fs::write(dir.join("c.toml"), "[secrets]\nrequired = []\n[network]\nallowlist = \"lists/domains.conf\"\n")
        .unwrap();
    // Run from elsewhere: the path must not depend on the working directory.
    let out = run(&["check", "--config", dir.join("c.toml").to_str().unwrap()], &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains(&format!("{}:2: `*`", dir.join("lists/domains.conf").display())), "{stderr}");
    std::fs::write(dir.join("lists/domains.conf"), "ok.example.com\n").unwrap();
    let out = run(&["check", "--config", dir.join("c.toml").to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
}

#[test]
fn every_problem_is_listed_and_the_exit_code_is_2() {
    let dir = scratch("problems");
    let list = dir.join("domains.conf");
    std::fs::write(&list, "ok.example.com\n*\nfine.example.org\na.*.example.com\n").unwrap();
    let config = dir.join("c.toml");
    std::fs::write(&config, format!("[network]\nallowlist = \"{}\"\nallow = [\"*.com\"]\n", list.display())).unwrap();
    let out = check(&config, &[("GH_PAT", SENTINEL)]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("4 problem(s)"), "{stderr}");
    assert!(stderr.contains("domains.conf:2: `*`"), "{stderr}");
    assert!(stderr.contains("domains.conf:4: `a.*.example.com`"), "{stderr}");
    assert!(stderr.contains("network.allow:1: `*.com`"), "{stderr}");
    assert!(stderr.contains("CLAUDE_CODE_OAUTH_TOKEN (not set)"), "{stderr}");
    assert!(stdout.contains("CLAUDE_CODE_OAUTH_TOKEN: MISSING"), "{stdout}");
    assert!(!stdout.contains(SENTINEL) && !stderr.contains(SENTINEL));
}

#[test]
fn unknown_key_and_bad_value_are_named_with_key_and_line() {
    let dir = scratch("keys");
    let config = dir.join("c.toml");
    std::fs::write(&config, "[agent]\nuser = \"agent\"\nshel_pane = true\n").unwrap();
    let (_, stderr) = text(&check(&config, &[]));
    assert!(stderr.contains("c.toml:3: key `agent.shel_pane`: unknown field `shel_pane`"), "{stderr}");

    std::fs::write(&config, "[[tmpfs]]\npath = \"/w\"\nsize = \"lots\"\n").unwrap();
    let (_, stderr) = text(&check(&config, &[]));
    assert!(stderr.contains("c.toml:3: key `tmpfs.size`: invalid size `lots`"), "{stderr}");
}

#[test]
fn an_explicit_config_that_does_not_exist_is_an_error() {
    let out = check(Path::new("/nonexistent/cordon.toml"), &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("/nonexistent/cordon.toml: cannot read the config file"), "{stderr}");
}

#[test]
fn environment_overrides_show_in_the_effective_config() {
    let dir = scratch("env");
    let out = check(
        &shipped_config(&dir),
        &[
            ("GH_PAT", "x"),
            ("CLAUDE_CODE_OAUTH_TOKEN", "y"),
            ("REPO_URL", "https://github.com/o/r.git"),
            ("GIT_USER_NAME", "Robot"),
        ],
    );
    let (stdout, _) = text(&out);
    assert!(stdout.contains("url = \"https://github.com/o/r.git\""), "{stdout}");
    assert!(stdout.contains("user_name = \"Robot\""), "{stdout}");
}

#[test]
fn version_and_help_follow_conventions() {
    let out = Command::new(env!("CARGO_BIN_EXE_cordon")).arg("--version").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("cordon {}", env!("CARGO_PKG_VERSION")));
    let out = Command::new(env!("CARGO_BIN_EXE_cordon")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("init") && help.contains("check"), "{help}");
    assert!(
        !help.lines().any(|l| l.trim_start().starts_with("supervise")),
        "the internal subcommand is hidden: {help}"
    );
}
