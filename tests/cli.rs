//! The subcommands an operator runs outside a running cordon: what they say when there is
//! nothing to talk to. No root needed.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A config whose state directory is an empty scratch directory: no cordon runs there.
fn config_without_cordon(name: &str) -> (PathBuf, PathBuf) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let config = dir.join("cordon.toml");
    std::fs::write(&config, format!("[supervisor]\nstate_dir = \"{}\"\n", dir.join("state").display())).unwrap();
    (config, dir.join("state"))
}

fn cordon(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cordon")).args(args).env_clear().output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn attach_no_wait_says_cordon_is_not_running_and_exits_2() {
    let (config, state) = config_without_cordon("nowait");
    let out = cordon(&["attach", "--no-wait", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("cordon is not running here"), "{t}");
    assert!(t.contains(&state.display().to_string()), "names the state directory: {t}");
    assert!(!t.contains("booting"), "{t}");
}

#[test]
fn attach_without_no_wait_gives_up_on_a_cordon_that_never_started_within_seconds() {
    let (config, _) = config_without_cordon("wait");
    let t0 = Instant::now();
    let out = cordon(&["attach", "--timeout", "10m", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("cordon is not running here"), "{}", text(&out));
    assert!(t0.elapsed() < Duration::from_secs(30), "waited {:?}", t0.elapsed());
}

#[test]
fn attach_after_a_boot_that_died_says_so_and_exits_2() {
    let (config, state) = config_without_cordon("dead");
    // What a supervisor killed mid-boot leaves: a state file in phase booting and a boot lock
    // nobody holds.
    let mut report = cordon::state::report::Report::new("pid1");
    report.attach_dir(&state);
    report.begin("clone");
    drop(report);
    let out = cordon(&["attach", "--no-wait", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("stopped during stage clone"), "{}", text(&out));
}
