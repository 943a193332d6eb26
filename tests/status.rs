//! `cordon status` as an operator (root) and the agent run it inside the container: live over
//! the control socket, from the state file when cordon does not answer, and `why`.

mod harness;

use std::process::Output;
use std::time::Duration;

use harness::world::{FakeDns, Rec};
use harness::{Cordon, Mode, Phase, Sandbox, TestConfig, WORLD_V4};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(30);
const SENTINEL: &str = "ghp_STATUS_SENTINEL_never_shown_5150";

fn status(c: &Cordon, sb: &Sandbox, args: &str, as_agent: bool) -> Output {
    let cmd = format!("{} status {args} --config {}", env!("CARGO_BIN_EXE_cordon"), sb.path("cordon.toml").display());
    if as_agent { c.agent_exec(&cmd) } else { c.exec(&cmd) }
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("not JSON ({e}): {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn world(sb: &Sandbox) -> FakeDns {
    sb.write_file("domains.conf", "api.example.com\n*.example.org\n");
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    dns.set("api.example.com", vec![Rec::A("192.0.2.10".parse().unwrap())]);
    dns
}

#[test]
fn ready_status_reports_every_section_and_the_json_schema_holds_field_by_field() {
    let sb = Sandbox::new("status-ready");
    let _dns = world(&sb);
    let cfg = TestConfig { required_secrets: vec!["GH_PAT"], ..TestConfig::default() };
    let mut c = sb.start(&cfg, &[("GH_PAT", SENTINEL)], Mode::Pid1);
    c.wait_phase(Phase::Ready, BOOT);
    c.agent_exec("getent hosts api.example.com; getent hosts leak.example.net; timeout 3 bash -c 'exec 3<>/dev/tcp/192.0.2.99/443'");

    let out = status(&c, &sb, "--json", false);
    assert_eq!(out.status.code(), Some(0), "ready exits 0: {}", text(&out));
    let v = json(&out);
    assert_eq!(v["version"], 1);
    assert_eq!(v["source"], "live");
    assert_eq!(v["phase"], "ready");
    assert_eq!(v["init_mode"], "pid1");
    assert!(v["failed"].is_null() && v["current_stage"].is_null());
    assert!(v["uptime_s"].as_f64().is_some() && v["boot_ms"].as_f64().is_some());
    let stages: Vec<&str> = v["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(stages.first(), Some(&"sanity"));
    assert_eq!(stages.last(), Some(&"session"));
    assert!(v["stages"][0]["duration_ms"].as_f64().is_some() && v["stages"][0]["outcome"] == "ok");

    let dns = &v["dns"];
    assert_eq!(dns["listen"], "127.0.0.53:53");
    assert_eq!(dns["upstreams"][0], "192.0.2.1:53");
    for counter in ["allowed", "denied", "failed", "stale", "rebinding_blocked", "busy"] {
        assert!(dns["queries"][counter].as_u64().is_some(), "dns.queries.{counter}");
    }
    assert!(dns["queries"]["allowed"].as_u64().unwrap() >= 1);
    assert!(dns["queries"]["denied"].as_u64().unwrap() >= 1);
    let denial = dns["recent_denials"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "leak.example.net.")
        .expect("the denied name");
    assert!(denial["type"].is_string() && denial["count"].as_u64().unwrap() >= 1 && denial["last"].is_string());

    let egress = &v["egress"];
    assert_eq!(egress["allowlist_entries"], 2);
    assert!(egress["admitted_ipv4"].as_u64().unwrap() >= 1);
    assert!(egress["admitted_ipv6"].as_u64().is_some());
    assert!(egress["rejected_ipv4"].as_u64().unwrap() >= 1, "the rejected connection is counted: {egress}");
    assert!(egress["rejected_ipv6"].as_u64().is_some());
    assert!(egress["last_refresh"].is_null(), "no refresh within the first interval");

    let agent = &v["session"]["agent"];
    assert_eq!(agent["running"], true);
    assert_eq!(agent["restarts"], 0);
    assert!(agent["pid"].as_u64().is_some());
    assert_eq!(v["filesystem"]["readonly_root"], true);
    let tmpfs = v["filesystem"]["tmpfs"].as_array().unwrap();
    assert_eq!(tmpfs.len(), 2);
    assert!(
        tmpfs.iter().all(|t| t["size_bytes"].as_u64().unwrap() > 0 && t["use_pct"].is_u64() && t["warning"] == false)
    );
    assert!(v["warnings"].is_array());
    let nb = &v["namebound"];
    assert_eq!((nb["enabled"].as_bool(), nb["running"].as_bool()), (Some(true), Some(true)), "{nb}");
    assert_eq!(nb["proxy_port"], 15443);
    assert!(nb["bindings"].as_u64().unwrap() >= 1, "api.example.com was answered: {nb}");
    for counter in ["accepted", "allowed", "refused", "hello_timeouts", "overloaded", "upstream_failures"] {
        assert!(nb["connections"][counter].as_u64().is_some(), "namebound.connections.{counter}");
    }
    assert!(nb["recent_refusals"].is_array());

    let human = status(&c, &sb, "", false);
    let screen = text(&human);
    println!("{screen}");
    assert!(screen.contains("cordon READY"), "{screen}");
    assert!(screen.contains("leak.example.net"), "{screen}");
    for line in screen.lines() {
        assert!(line.chars().count() <= 80, "wider than 80 columns: {line:?}");
    }
    for out in [&out, &human] {
        assert!(!text(out).contains(SENTINEL), "a secret appeared in status output");
    }
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    c.wait_exit(BOOT);
}

#[test]
fn why_explains_names_and_addresses() {
    let sb = Sandbox::new("status-why");
    let _dns = world(&sb);
    let mut c = sb.start(&TestConfig::default(), &[], Mode::Pid1);
    c.wait_phase(Phase::Ready, BOOT);
    c.agent_exec("getent hosts api.example.com; getent hosts leak.example.net");

    let v = json(&status(&c, &sb, "--json why leak.example.net", false));
    assert_eq!(v["verdict"], "denied");
    assert!(v["explanation"].as_str().unwrap().contains("NXDOMAIN"));

    let v = json(&status(&c, &sb, "--json why api.example.com", true));
    assert_eq!(v["verdict"], "allowed", "the agent may ask too");
    assert!(v["decided_by"][0].as_str().unwrap().contains("domains.conf:1"), "{v}");
    assert_eq!(v["admitted"][0]["ip"], "192.0.2.10");

    let v = json(&status(&c, &sb, "--json why a.b.example.org", false));
    assert!(
        v["decided_by"][0].as_str().unwrap().starts_with("*.example.org (")
            && v["decided_by"][0].as_str().unwrap().contains("domains.conf:2"),
        "{v}"
    );

    let v = json(&status(&c, &sb, "--json why 192.0.2.10", false));
    assert_eq!(v["verdict"], "admitted");
    assert_eq!(v["admitted"][0]["name"], "api.example.com.");
    assert!(v["admitted"][0]["until"].is_string());
    assert_eq!(json(&status(&c, &sb, "--json why 192.0.2.99", false))["verdict"], "not admitted");
    assert_eq!(json(&status(&c, &sb, "--json why 169.254.169.254", false))["verdict"], "never admitted");
    let human = text(&status(&c, &sb, "why api.example.com", false));
    assert!(human.contains("allowed") && human.contains("admitted 192.0.2.10"), "{human}");
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    c.wait_exit(BOOT);
}

#[test]
fn the_agent_can_read_status_but_change_nothing_through_the_socket() {
    let sb = Sandbox::new("status-agent");
    let _dns = world(&sb);
    let mut c = sb.start(&TestConfig::default(), &[], Mode::Pid1);
    c.wait_phase(Phase::Ready, BOOT);
    assert_eq!(status(&c, &sb, "--json", true).status.code(), Some(0), "the agent can query");
    let socket = sb.path("state/control.sock");
    for request in ["stop", "shutdown", "reload", "status; rm -rf /", "why", &"x".repeat(4000)] {
        let out = c.agent_exec(&format!("printf '%s\\n' '{request}' | nc -U -N -w 3 {}", socket.display()));
        let reply = String::from_utf8_lossy(&out.stdout);
        assert!(reply.is_empty() || reply.contains("unknown request"), "{request}: {reply}");
    }
    let out = status(&c, &sb, "--json", false);
    assert_eq!(json(&out)["phase"], "ready", "nothing changed");
    let perms = c.exec(&format!("stat -c '%a %U' {}", socket.display()));
    assert_eq!(String::from_utf8_lossy(&perms.stdout).trim(), "660 root");
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    c.wait_exit(BOOT);
}

#[test]
fn failed_boot_status_names_stage_error_and_fix_without_secret_values() {
    let sb = Sandbox::new("status-failed");
    let cfg =
        TestConfig { required_secrets: vec!["PRESENT", "ABSENT"], on_boot_failure: "hold", ..TestConfig::default() };
    let mut c = sb.start(&cfg, &[("PRESENT", SENTINEL)], Mode::Pid1);
    c.wait_phase(Phase::Failed, BOOT);
    let out = status(&c, &sb, "--json", false);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["phase"], "failed");
    assert_eq!(v["failed"]["stage"], "secrets");
    assert!(v["failed"]["error"].as_str().unwrap().contains("ABSENT (not set)"));
    assert!(v["failed"]["hint"].as_str().unwrap().contains("fly secrets set"));
    let human = text(&status(&c, &sb, "", false));
    assert!(
        human.contains("cordon FAILED") && human.contains("failed at stage secrets") && human.contains("fix:"),
        "{human}"
    );
    assert!(!human.contains(SENTINEL) && !text(&out).contains(SENTINEL));
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    c.wait_exit(BOOT);
}

#[test]
fn a_crash_looping_agent_makes_status_degraded() {
    let sb = Sandbox::new("status-degraded");
    let _dns = world(&sb);
    let cfg = TestConfig {
        agent_command: "exit 3".into(),
        on_exit: "restart",
        extra: String::new(),
        ..TestConfig::default()
    };
    let text_cfg =
        sb.render_config(&cfg).replace("on_exit = \"restart\"", "on_exit = \"restart\"\nrestart_backoff = \"10ms\"");
    let mut c = sb.launch(&sb.write_file("cordon.toml", &text_cfg), &[], Mode::Pid1, "");
    c.wait_phase(Phase::Degraded, BOOT);
    let out = status(&c, &sb, "--json", false);
    assert_eq!(out.status.code(), Some(1), "degraded is not healthy");
    let v = json(&out);
    assert_eq!(v["phase"], "degraded");
    assert!(v["reason"].as_str().unwrap().contains("not restarting"), "{v}");
    assert_eq!(v["session"]["agent"]["restarts"], 5);
    assert_eq!(v["session"]["agent"]["last_exit"], 3);
    assert_eq!(v["session"]["agent"]["running"], false);
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    c.wait_exit(BOOT);
}

#[test]
fn status_while_booting_names_the_running_stage() {
    let sb = Sandbox::new("status-booting");
    let dns = world(&sb);
    dns.set_up(false);
    // The positive probe must resolve through an upstream that does not answer: the boot sits
    // in the readiness stage for several seconds, then fails.
    let cfg = TestConfig {
        network: "probe = \"api.example.com:443\"\n".into(),
        on_boot_failure: "hold",
        ..TestConfig::default()
    };
    let mut c = sb.start(&cfg, &[], Mode::Pid1);
    let v = harness::wait_until("status to show the readiness stage running", BOOT, || {
        let out = status(&c, &sb, "--json", false);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["current_stage"] == "readiness").then(|| (out.status.code(), v))
    });
    assert_eq!(v.0, Some(1), "booting is not ready");
    assert_eq!(v.1["phase"], "booting");
    let state = c.wait_phase(Phase::Failed, Duration::from_secs(90));
    assert!(state.reason.unwrap().contains("readiness"));
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    c.wait_exit(BOOT);
}

#[test]
fn status_falls_back_to_the_state_file_and_exits_2_when_nothing_is_there() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("status-none-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("cordon.toml");
    std::fs::write(&cfg, format!("[supervisor]\nstate_dir = \"{}\"\n", dir.display())).unwrap();
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cordon"))
            .args(["status", "--config", cfg.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = run();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("cordon is not running here"), "{}", text(&out));

    // A state file left by a cordon that no longer answers: shown, with a note.
    let mut report = cordon::state::report::Report::new("pid1");
    report.attach_dir(&dir);
    report.ready();
    let out = run();
    assert_eq!(out.status.code(), Some(2), "a cordon that does not answer is not healthy: {}", text(&out));
    assert!(text(&out).contains("not answering on its control socket"), "{}", text(&out));
    assert!(text(&out).contains("READY"), "the last state is still shown: {}", text(&out));
}
