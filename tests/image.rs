//! End to end through the real container image: `scripts/build-image.sh` builds it as a user
//! would, and Docker runs it in both runtime profiles against a world of the test's own (a fake
//! upstream DNS server, TCP greeters and a git server over HTTP on documentation addresses).
//!
//! - Profile 1: cordon locks down itself (`--cap-add NET_ADMIN --cap-add SYS_ADMIN`).
//! - Profile 2: the runtime makes the root read-only and mounts the tmpfs (`--read-only
//!   --tmpfs …`), cordon has only NET_ADMIN, verifies the filesystem and enforces egress.
//!
//! Each test checks what an operator relies on: the boot reaches ready; the agent user reaches
//! the allowed name and nothing else; `docker exec -it … bash -i` lands in the agent's tmux
//! session as the agent; `cordon status` says ready; `docker stop` is a graceful stop within the
//! grace period with exit code 0; a missing secret is reported where operators look.

mod harness;

use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use harness::docker::{Container, IMAGE_AGENT_UID, Pod, docker, host_dir};
use harness::world::{FakeDns, GitServer, Greeter, HttpsServer, Rec, make_repo};
use harness::{WORLD_V4, wait_until};

const BOOT: Duration = Duration::from_secs(60);
const TOKEN: &str = "ghp_E2E_SENTINEL_0123456789abcdef";
/// The agent: waits for SIGTERM, then leaves proof of a graceful stop in the /out volume.
const AGENT: &str = r#"command = ["bash", "-c", "echo agent up; trap 'echo graceful > /out/agent-term; exit 0' TERM; while :; do sleep 0.2; done"]"#;

/// The world of these tests: `git.example.com` (allowlisted; HTTPS greeter on v4 and v6, the
/// git server on port 80, an HTTPS server on 443) and `exfil.example.net` (not allowlisted;
/// at its own address and, sharing git.example.com's, a name the HTTPS server must never be
/// asked for).
struct World {
    dns: FakeDns,
    git: GitServer,
    https: HttpsServer,
}

fn world(pod: &Pod, tag: &str) -> World {
    let dns = FakeDns::start(&pod.world, format!("{WORLD_V4}:53").parse().unwrap());
    dns.set("git.example.com", vec![Rec::A("192.0.2.80".parse().unwrap()), Rec::A("2001:db8::80".parse().unwrap())]);
    dns.set("exfil.example.net", vec![Rec::A("192.0.2.81".parse().unwrap())]);
    for ip in ["192.0.2.80", "2001:db8::80", "192.0.2.81"] {
        pod.add_world_addr(ip);
    }
    let srv = host_dir(&format!("{tag}-srv"));
    let https = HttpsServer::start(&pod.world, &["192.0.2.80:443", "[2001:db8::80]:443", "192.0.2.81:443"], &srv);
    make_repo(&srv, "hello from the world\n");
    let git = GitServer::start(&pod.world, "192.0.2.80:80".parse().unwrap(), srv, "x-access-token", TOKEN);
    World { dns, git, https }
}

/// The host directory mounted at /etc/cordon-e2e (config and allowlist) and /out (writable by
/// the agent; it outlives the container).
fn files(tag: &str, extra: &str) -> std::path::PathBuf {
    let dir = host_dir(tag);
    std::fs::write(dir.join("domains.conf"), "git.example.com\n").unwrap();
    let config = format!(
        "[secrets]\nrequired = [\"GH_PAT\"]\n\
         [filesystem]\nwritable = [\"/out\"]\n\
         [network]\nallowlist = \"/etc/cordon-e2e/domains.conf\"\n{extra}\n\
         [git]\ncredential_hosts = [\"http://git.example.com\"]\n\
         [agent]\n{AGENT}\n\
         [supervisor]\nstop_grace = \"10s\"\n"
    );
    std::fs::write(dir.join("cordon.toml"), config).unwrap();
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    dir
}

/// `docker run` arguments shared by both profiles.
fn common_args(dir: &std::path::Path) -> Vec<String> {
    [
        "-e",
        "CORDON_CONFIG=/etc/cordon-e2e/cordon.toml",
        "-e",
        &format!("GH_PAT={TOKEN}"),
        "-e",
        "REPO_URL=http://git.example.com/repo.git",
        "-v",
        &format!("{}:/etc/cordon-e2e:ro", dir.display()),
        "-v",
        &format!("{}:/out", dir.join("out").display()),
        "--health-interval",
        "1s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

const PROFILE_1: &[&str] =
    &["--cap-add", "NET_ADMIN", "--cap-add", "SYS_ADMIN", "--security-opt", "apparmor=unconfined"];
const PROFILE_2: &[&str] = &[
    "--cap-add",
    "NET_ADMIN",
    "--read-only",
    "--tmpfs",
    "/workspace:exec,size=512m",
    "--tmpfs",
    "/tmp:exec,size=512m",
    "--tmpfs",
    "/home/agent:exec,size=1g",
    "--tmpfs",
    "/run:size=64m",
];

/// The agent user's view of the network, and the upstream's: the allowed name resolves and
/// connects over IPv4 and IPv6 and its git server serves the clone; the denied name is
/// NXDOMAIN without ever reaching the upstream; its address and the world's resolver are
/// refused.
fn check_egress(c: &Container, w: &World, ipv6: bool) {
    let families: &[&str] = if ipv6 { &["-4", "-6"] } else { &["-4"] };
    for family in families {
        let out = c.agent_sh(&format!("curl -sSk --max-time 10 {family} https://git.example.com/"));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "hello git.example.com",
            "allowed name, {family}: {out:?}"
        );
    }
    // The name-bound layer: on git.example.com's own address, another name is refused before
    // the server sees a byte.
    let before = w.https.lines().len();
    let fronted =
        c.agent_sh("curl -sSk --max-time 10 --resolve exfil.example.net:443:192.0.2.80 https://exfil.example.net/");
    assert!(!fronted.status.success(), "a foreign name on an admitted address is refused: {fronted:?}");
    assert!(!w.https.lines()[before..].iter().any(|l| l.contains("exfil")), "the server saw the foreign name");

    let denied = c.agent_sh("getent hosts exfil.example.net");
    assert_eq!(denied.status.code(), Some(2), "a denied name is not found: {denied:?}");
    assert!(
        !w.dns.queries().iter().any(|q| q.contains("exfil")),
        "the denied name reached the upstream: {:?}",
        w.dns.queries()
    );
    let direct = c.agent_sh("timeout 5 bash -c 'exec 3<>/dev/tcp/192.0.2.81/443' && echo connected");
    assert!(!direct.status.success(), "a never-resolved address is refused: {direct:?}");
    let resolver = c.agent_sh("timeout 5 bash -c 'exec 3<>/dev/tcp/192.0.2.1/53' && echo connected");
    assert!(!resolver.status.success(), "the upstream resolver is cordon's alone: {resolver:?}");

    // The clone came through the firewall with the credential helper, and the agent's own
    // fetch works the same way.
    let readme = c.agent_sh("cat /workspace/repo/README && stat -c %u /workspace/repo");
    assert_eq!(
        String::from_utf8_lossy(&readme.stdout),
        format!("hello from the world\n{IMAGE_AGENT_UID}\n"),
        "{readme:?}"
    );
    let fetch = c.agent_sh("cd /workspace/repo && git fetch -q origin && echo fetched");
    assert_eq!(String::from_utf8_lossy(&fetch.stdout).trim(), "fetched", "{fetch:?}");
    assert!(w.git.requests.lock().unwrap().iter().any(|(_, auth)| auth.is_some()), "the token was sent");
}

/// An interactive `docker exec -it NAME bash -i` under a real pty (`script`), fed by a pipe.
struct Terminal {
    child: Child,
    stdin: ChildStdin,
    out: std::path::PathBuf,
}

impl Terminal {
    fn open(command: &str, out: std::path::PathBuf) -> Terminal {
        let mut child = Command::new("script")
            .args(["-qfec", &format!("stty cols 120 rows 40; exec {command}"), "/dev/null"])
            .env("TERM", "xterm-256color")
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("script (util-linux)");
        let stdin = child.stdin.take().unwrap();
        Terminal { child, stdin, out }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stdin.write_all(bytes).unwrap();
        self.stdin.flush().unwrap();
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.out).unwrap_or_default()).into_owned()
    }

    fn wait(mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the terminal did not end; it shows:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.output()
    }
}

/// `docker exec -it NAME bash -i` lands in the agent's session as the agent; detaching leaves
/// the operator in a root shell of the container.
fn check_login(c: &Container, dir: &std::path::Path) {
    let mut t = Terminal::open(&format!("docker exec -it {} bash -i", c.name), dir.join("terminal.out"));
    let clients = wait_until("a tmux client", BOOT, || Some(c.tmux_clients()).filter(|v| !v.is_empty()));
    assert_eq!(clients, vec![IMAGE_AGENT_UID.to_string()], "the login's tmux client runs as the agent");
    let ps = c.exec(&["ps", "-eo", "user:12,comm"]);
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(ps.lines().filter(|l| l.contains("tmux")).all(|l| l.starts_with("agent")), "no root tmux:\n{ps}");
    t.send(b"\x02d");
    wait_until("the client to detach", BOOT, || c.tmux_clients().is_empty().then_some(()));
    t.send(b"id -u; exit\n");
    let shown = t.wait(BOOT);
    assert!(shown.contains("[detached"), "tmux said it detached:\n{shown}");
}

/// `docker stop` ends in a graceful stop: the agent got SIGTERM and exited, nothing needed
/// SIGKILL, well within the grace period, with exit code 0.
fn check_stop(c: &Container, dir: &std::path::Path) {
    let started = Instant::now();
    let out = docker(&["stop", "-t", "30", &c.name]);
    let took = started.elapsed();
    assert!(out.status.success(), "{out:?}");
    assert!(took < Duration::from_secs(10), "docker stop took {took:?}, not less than stop_grace (10s)");
    assert_eq!(c.inspect("{{.State.ExitCode}}"), "0", "exit code after a graceful stop");
    assert_eq!(
        std::fs::read_to_string(dir.join("out/agent-term")).unwrap_or_default(),
        "graceful\n",
        "the agent saw SIGTERM"
    );
    let logs = c.logs();
    assert!(logs.contains("stopping"), "cordon logged the stop:\n{logs}");
    assert!(!logs.contains("ignored SIGTERM"), "nothing had to be killed:\n{logs}");
}

fn check_ready(c: &Container, provided_by_runtime: bool) {
    let doc = c.wait_phase("ready", BOOT);
    let (_, code) = c.status();
    assert_eq!(code, 0, "cordon status exits 0 when ready");
    let human = c.exec(&["cordon", "status"]);
    assert!(String::from_utf8_lossy(&human.stdout).starts_with("cordon READY"), "{human:?}");
    assert_eq!(doc["init_mode"], "pid1");
    assert_eq!(doc["filesystem"]["readonly_root"], true);
    let fs_detail =
        doc["stages"].as_array().unwrap().iter().find(|s| s["name"] == "filesystem").unwrap()["detail"].to_string();
    let provided = if provided_by_runtime { "3 provided by the runtime" } else { "0 provided by the runtime" };
    assert!(fs_detail.contains(provided), "filesystem stage: {fs_detail}");
    assert_eq!(doc["session"]["agent"]["running"], true);
    let healthy = wait_until("the health check", BOOT, || {
        let h = c.inspect("{{.State.Health.Status}}");
        (h != "starting").then_some(h)
    });
    assert_eq!(healthy, "healthy", "the image's HEALTHCHECK (cordon status)");
    // The root is read-only for root too, except the volume the config keeps writable.
    let write = c.exec(&["sh", "-c", "touch /etc/e2e-write 2>&1; touch /out/root-write && echo out-ok"]);
    let text = String::from_utf8_lossy(&write.stdout);
    assert!(text.contains("Read-only file system") && text.contains("out-ok"), "{text}");
}

#[test]
fn profile_1_cordon_locks_down_the_container_itself() {
    let mut pod = Pod::new("p1", WORLD_V4, true);
    let w = world(&pod, "p1");
    let dir = files("p1", "");
    let mut args = common_args(&dir);
    args.extend(PROFILE_1.iter().map(|s| s.to_string()));
    let c = pod.run("cordon", &args.iter().map(String::as_str).collect::<Vec<_>>());
    check_ready(&c, false);
    check_egress(&c, &w, true);
    check_login(&c, &dir);
    check_stop(&c, &dir);
}

#[test]
fn profile_2_the_runtime_makes_the_filesystem_and_cordon_verifies_it() {
    // The runtime's read-only root includes resolv.conf, so it must already name cordon, and
    // cordon is told the upstream.
    let mut pod = Pod::new("p2", "127.0.0.53", false);
    let w = world(&pod, "p2");
    let dir = files("p2", "upstream = [\"192.0.2.1\"]");
    let mut args = common_args(&dir);
    args.extend(PROFILE_2.iter().map(|s| s.to_string()));
    let c = pod.run("cordon", &args.iter().map(String::as_str).collect::<Vec<_>>());
    check_ready(&c, true);
    let caps = c.exec(&["sh", "-c", "grep CapEff /proc/1/status"]);
    let caps = String::from_utf8_lossy(&caps.stdout);
    let eff = u64::from_str_radix(caps.split_whitespace().nth(1).unwrap(), 16).unwrap();
    assert_eq!(eff & (1 << 21), 0, "no CAP_SYS_ADMIN in this profile: {caps}");
    check_egress(&c, &w, false);
    check_login(&c, &dir);
    check_stop(&c, &dir);
}

#[test]
fn a_missing_secret_is_reported_in_status_logs_and_the_login_shell() {
    // The shipped configuration, as a user would first run it: no secrets given.
    let mut pod = Pod::new("ms", WORLD_V4, false);
    let dir = host_dir("ms");
    let held = pod.run("held", PROFILE_1);
    let doc = held.wait_phase("failed", BOOT);
    let (_, code) = held.status();
    assert_eq!(code, 1, "cordon status exits 1 when the boot failed");
    assert_eq!(doc["failed"]["stage"], "secrets");
    let error = doc["failed"]["error"].as_str().unwrap();
    assert!(error.contains("GH_PAT") && error.contains("CLAUDE_CODE_OAUTH_TOKEN"), "{error}");
    assert!(doc["failed"]["hint"].as_str().is_some_and(|h| !h.is_empty()), "a fix is offered: {doc}");
    let logs = held.logs();
    assert!(
        logs.contains("GH_PAT") && logs.contains("secrets"),
        "the container log names the stage and the secret:\n{logs}"
    );
    assert!(held.running(), "on_boot_failure = hold keeps the container up for an operator");

    // The operator's login shows the failure and falls back to a root shell.
    let mut t = Terminal::open(&format!("docker exec -it {} bash -i", held.name), dir.join("terminal.out"));
    wait_until("the fallback to a root shell", BOOT, || t.output().contains("cordon attach failed").then_some(()));
    t.send(b"echo root-shell-$(id -u); exit\n");
    let shown = t.wait(BOOT);
    assert!(shown.contains("secrets") && shown.contains("GH_PAT"), "attach explains the failure:\n{shown}");
    assert!(shown.contains("root-shell-0"), "then the root shell is usable:\n{shown}");

    // With on_boot_failure = "exit" the container ends with status 1 instead.
    std::fs::write(dir.join("cordon.toml"), "[supervisor]\non_boot_failure = \"exit\"\n").unwrap();
    let mount = format!("{}:/etc/cordon-e2e:ro", dir.display());
    let exits =
        pod.run("exits", &[PROFILE_1, &["-e", "CORDON_CONFIG=/etc/cordon-e2e/cordon.toml", "-v", &mount]].concat());
    let code = docker(&["wait", &exits.name]);
    assert_eq!(String::from_utf8_lossy(&code.stdout).trim(), "1", "{}", exits.logs());
    assert!(exits.logs().contains("GH_PAT"));
}

#[test]
fn the_quick_start_builds_runs_and_joins_the_demo_agent() {
    let mut pod = Pod::new("qs", WORLD_V4, false);
    let dns = FakeDns::start(&pod.world, format!("{WORLD_V4}:53").parse().unwrap());
    dns.set("api.anthropic.com", vec![Rec::A("192.0.2.90".parse().unwrap())]);
    pod.add_world_addr("192.0.2.90");
    let _api = Greeter::start(&pod.world, "192.0.2.90:443".parse().unwrap());
    let dir = host_dir("qs");
    let c = pod.adopt("cordon-e2e-qs-demo");

    let script = format!(
        "env CORDON_NAME={} CORDON_DOCKER_NETWORK=container:{} bash {}/scripts/quickstart.sh",
        c.name,
        pod.holder,
        env!("CARGO_MANIFEST_DIR")
    );
    let mut t = Terminal::open(&script, dir.join("terminal.out"));
    let clients = wait_until("the quick start to join the session", Duration::from_secs(600), || {
        assert!(t.running(), "the quick start ended early:\n{}", t.output());
        Some(c.tmux_clients()).filter(|v| !v.is_empty())
    });
    assert_eq!(clients, vec![IMAGE_AGENT_UID.to_string()], "joined as the agent");

    // The demo agent's report, in its pane.
    let pane = wait_until("the demo agent's report", BOOT, || {
        let out = c.exec(&[
            "su",
            "agent",
            "-s",
            "/bin/sh",
            "-c",
            "tmux -S /run/cordon/tmux/agent.sock capture-pane -p -t agent:0.0 -S -60",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("Try, in this shell").then_some(text)
    });
    for expect in [
        "uid=1000(agent)",
        "effective 0000000000000000, no_new_privs 1",
        "refused: the root filesystem is read-only",
        "api.anthropic.com: connected to 192.0.2.90 port 443",
        "exfil.example.org: denied, answered NXDOMAIN by cordon; the query never left",
        "203.0.113.10:443 refused",
    ] {
        assert!(pane.contains(expect), "the demo agent shows {expect:?}:\n{pane}");
    }
    assert!(!dns.queries().iter().any(|q| q.contains("exfil")), "the denied name never left");
    assert_eq!(c.phase().as_deref(), Some("ready"));

    t.send(b"\x02d");
    wait_until("the client to detach", BOOT, || c.tmux_clients().is_empty().then_some(()));
    t.send(b"exit\n");
    let shown = t.wait(BOOT);
    assert!(
        shown.contains("keeps running") && shown.contains(&format!("docker exec -it {} bash -i", c.name)),
        "{shown}"
    );
    assert!(c.running(), "the container outlives the terminal");
}

#[test]
fn a_missing_capability_fails_the_boot_with_the_fix_in_status() {
    let mut pod = Pod::new("cap", WORLD_V4, false);
    let dir = files("cap", "");
    let mount = format!("{}:/etc/cordon-e2e:ro", dir.display());
    let common = ["-e", "CORDON_CONFIG=/etc/cordon-e2e/cordon.toml", "-e", "GH_PAT=x", "-v", &mount];
    // Neither SYS_ADMIN nor the runtime's read-only root and tmpfs: cordon cannot lock the
    // filesystem down; its state directory stays on the root so status can say why.
    let no_sys_admin = pod.run("nosys", &[&common[..], &["--cap-add", "NET_ADMIN"]].concat());
    // No NET_ADMIN: no firewall, so no agent.
    let no_net_admin =
        pod.run("nonet", &[&common[..], &["--cap-add", "SYS_ADMIN", "--security-opt", "apparmor=unconfined"]].concat());
    for (c, stage, fix) in [(&no_sys_admin, "filesystem", "SYS_ADMIN"), (&no_net_admin, "firewall", "NET_ADMIN")] {
        let doc = c.wait_phase("failed", BOOT);
        assert_eq!(doc["failed"]["stage"], stage, "{doc}");
        assert!(doc["failed"]["hint"].as_str().is_some_and(|h| h.contains(fix)), "the fix names {fix}: {doc}");
        assert_eq!(c.status().1, 1);
        let ps = c.exec(&["ps", "-u", "agent", "-o", "pid=,comm="]);
        assert_eq!(String::from_utf8_lossy(&ps.stdout).trim(), "", "no process of the agent user's runs");
    }
}

#[test]
fn an_observe_session_suggests_an_allowlist_that_a_live_reload_enforces() {
    let mut pod = Pod::new("pol", WORLD_V4, false);
    let w = world(&pod, "pol");
    let agent_get = |c: &Container, name: &str| {
        let out = c.agent_sh(&format!("curl -sSk --max-time 10 https://{name}/"));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };

    // Observe mode: a name outside the allowlist resolves and connects, and says so everywhere.
    let dir = files("pol-observe", "mode = \"observe\"");
    let mut args = common_args(&dir);
    args.extend(PROFILE_1.iter().map(|s| s.to_string()));
    let observing = pod.run("observe", &args.iter().map(String::as_str).collect::<Vec<_>>());
    let doc = observing.wait_phase("ready", BOOT);
    assert_eq!(doc["policy"]["mode"], "observe", "{doc}");
    let human = observing.exec(&["cordon", "status"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("NOT enforced"), "{human:?}");
    assert!(observing.logs().contains("egress is NOT enforced"), "{}", observing.logs());
    assert_eq!(agent_get(&observing, "exfil.example.net"), "hello exfil.example.net", "observe lets it through");
    assert_eq!(agent_get(&observing, "git.example.com"), "hello git.example.com");
    let refused = observing.agent_sh("cordon policy suggest");
    assert_eq!(refused.status.code(), Some(77), "the agent may not read the suggestion: {refused:?}");
    let suggested = observing.exec(&["cordon", "policy", "suggest"]);
    assert!(suggested.status.success(), "{suggested:?}");
    let suggested = String::from_utf8_lossy(&suggested.stdout).into_owned();
    assert!(suggested.lines().any(|l| l.starts_with("exfil.example.net  # seen")), "{suggested}");
    check_stop(&observing, &dir);

    // Enforcing, on the file as it was: the observed name is refused.
    let dir = files("pol-enforce", "");
    let mut args = common_args(&dir);
    args.extend(PROFILE_1.iter().map(|s| s.to_string()));
    let enforcing = pod.run("enforce", &args.iter().map(String::as_str).collect::<Vec<_>>());
    let doc = enforcing.wait_phase("ready", BOOT);
    assert_eq!(doc["policy"]["mode"], "enforce", "{doc}");
    let denied = enforcing.agent_sh("getent hosts exfil.example.net");
    assert_eq!(denied.status.code(), Some(2), "{denied:?}");
    // A connection opened before the reload and used after it.
    let held = Command::new("docker")
        .args(["exec", "-u", "agent", &enforcing.name, "bash", "-c"])
        .arg(
            "exec 3<>/dev/tcp/git.example.com/80 && sleep 8 && \
             printf 'GET / HTTP/1.0\\r\\nHost: git.example.com\\r\\n\\r\\n' >&3 && head -c 7 <&3 >/out/held",
        )
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));

    // The operator puts the suggestion in force without a restart: the file is edited in place
    // on the host (the directory is bind-mounted), then `cordon reload`.
    std::fs::write(dir.join("domains.conf"), &suggested).unwrap();
    let agent_reload = enforcing.agent_sh("cordon reload");
    assert_eq!(agent_reload.status.code(), Some(77), "the agent may not reload: {agent_reload:?}");
    assert_eq!(enforcing.agent_sh("getent hosts exfil.example.net").status.code(), Some(2), "nothing changed");
    let reload = enforcing.exec(&["cordon", "reload"]);
    assert!(reload.status.success(), "{reload:?}");
    assert_eq!(agent_get(&enforcing, "exfil.example.net"), "hello exfil.example.net", "the reload widened");
    assert_eq!(agent_get(&enforcing, "git.example.com"), "hello git.example.com");
    let mut held = held;
    assert!(held.wait().unwrap().success());
    assert_eq!(
        std::fs::read_to_string(dir.join("out/held")).unwrap_or_default(),
        "HTTP/1.",
        "the connection held across the reload still works"
    );
    let (doc, _) = enforcing.status();
    let changes = doc.unwrap()["policy"]["changes"].clone();
    assert!(
        changes.as_array().unwrap().iter().any(|c| c["what"] == "reload" && c["ok"] == true && c["who"] != "SIGHUP"),
        "the reload is recorded with who made it: {changes}"
    );
    drop(w);
    check_stop(&enforcing, &dir);
}

/// The lifecycle features on a workspace volume, in the image, with a stub `claude` (logging
/// its uid and argv to /out, failing one plugin): the repository's devcontainer commands, a
/// persisted `~/.claude`, plugins; then a second container on the same volume.
#[test]
fn on_a_workspace_volume_devcontainer_commands_persist_and_plugins_work_and_survive_a_new_container() {
    let mut pod = Pod::new("lc", WORLD_V4, false);
    let _w = world(&pod, "lc");
    let dir = host_dir("lc");
    std::fs::write(dir.join("domains.conf"), "git.example.com\n").unwrap();
    let volume = dir.join("volume");
    let project = volume.join("proj");
    std::fs::create_dir_all(project.join("marks")).unwrap();
    std::fs::write(
        project.join(".devcontainer.json"),
        "{\n  // JSONC\n  \"image\": \"ignored\",\n  \"containerEnv\": {\"E2E\": \"yes\"},\n  \
         \"postCreateCommand\": \"echo $(id -u) $E2E >> marks/created\",\n  \
         \"postStartCommand\": [\"sh\", \"-c\", \"echo started >> marks/started\"],\n}\n",
    )
    .unwrap();
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let stub = dir.join("claude");
    std::fs::write(
        &stub,
        "#!/bin/sh\necho \"$(id -u) $*\" >> /out/claude.log\n\
         case \"$*\" in *broken@m*) echo 'plugin broken@m not found' >&2; exit 1;; esac\n",
    )
    .unwrap();
    std::fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ok = Command::new("chown").args(["-R", &format!("{IMAGE_AGENT_UID}:{IMAGE_AGENT_UID}")]).arg(&volume).status();
    assert!(ok.unwrap().success());
    let config = format!(
        "[secrets]\nrequired = []\n\
         [[tmpfs]]\npath = \"/tmp\"\nsize = \"512M\"\nmode = \"1777\"\nowner = \"root\"\n\
         [[tmpfs]]\npath = \"~\"\nsize = \"1G\"\nmode = \"0700\"\nowner = \"agent\"\n\
         [filesystem]\nwritable = [\"/workspace\", \"/out\"]\n\
         [network]\nallowlist = \"/etc/cordon-e2e/domains.conf\"\n\
         [agent]\n{AGENT}\nworkdir = \"/workspace/proj\"\ntmux = false\n\
         persist = [\"~/.claude\"]\npersist_volume = \"/workspace\"\n\
         [claude]\nplugins = [\"good@m\", \"broken@m\"]\n\
         [supervisor]\nstop_grace = \"10s\"\n"
    );
    std::fs::write(dir.join("cordon.toml"), config).unwrap();
    let mounts = [
        format!("{}:/etc/cordon-e2e:ro", dir.display()),
        format!("{}:/workspace", volume.display()),
        format!("{}:/out", out.display()),
        format!("{}:/usr/local/bin/claude:ro", stub.display()),
    ];
    let mut args: Vec<&str> = PROFILE_1.to_vec();
    args.extend(["-e", "CORDON_CONFIG=/etc/cordon-e2e/cordon.toml"]);
    for m in &mounts {
        args.extend(["-v", m.as_str()]);
    }

    let first = pod.run("first", &args);
    let doc = first.wait_phase("ready", BOOT);
    let stage = |doc: &serde_json::Value, name: &str| {
        doc["stages"].as_array().unwrap().iter().find(|s| s["name"] == name).cloned().unwrap_or_default()
    };
    assert_eq!(stage(&doc, "devcontainer")["outcome"], "ok", "{doc}");
    assert_eq!(std::fs::read_to_string(project.join("marks/created")).unwrap(), format!("{IMAGE_AGENT_UID} yes\n"));
    assert!(stage(&doc, "persist")["detail"].as_str().unwrap().contains("~/.claude kept on /workspace"), "{doc}");
    let plugins = stage(&doc, "plugins")["detail"].as_str().unwrap().to_string();
    assert!(plugins.contains("installed good@m") && plugins.contains("FAILED broken@m"), "{plugins}");
    let warnings = doc["warnings"].to_string();
    assert!(warnings.contains("claude plugin install broken@m") && warnings.contains("not found"), "{warnings}");
    let boot_log = first.exec(&["cat", "/run/cordon/boot.log"]);
    assert!(String::from_utf8_lossy(&boot_log.stdout).contains("broken@m"), "the boot log names the failure");
    let calls = std::fs::read_to_string(out.join("claude.log")).unwrap();
    assert_eq!(
        calls,
        format!("{IMAGE_AGENT_UID} plugin install good@m\n{IMAGE_AGENT_UID} plugin install broken@m\n"),
        "as the agent"
    );
    let wrote = first.agent_sh("mkdir -p ~/.claude/projects && echo resume-me > ~/.claude/projects/s.jsonl");
    assert!(wrote.status.success(), "{wrote:?}");
    docker_stop(&first);

    let second = pod.run("second", &args);
    let doc = second.wait_phase("ready", BOOT);
    let kept = second.agent_sh("cat ~/.claude/projects/s.jsonl");
    assert_eq!(String::from_utf8_lossy(&kept.stdout), "resume-me\n", "{kept:?}");
    assert_eq!(
        std::fs::read_to_string(project.join("marks/created")).unwrap().lines().count(),
        1,
        "postCreate ran once"
    );
    assert_eq!(std::fs::read_to_string(project.join("marks/started")).unwrap(), "started\nstarted\n");
    let calls = std::fs::read_to_string(out.join("claude.log")).unwrap();
    assert_eq!(calls.matches("install good@m").count(), 1, "installed once per home: {calls}");
    assert!(stage(&doc, "plugins")["detail"].as_str().unwrap().contains("1 installed on an earlier boot"));
    docker_stop(&second);
}

fn docker_stop(c: &Container) {
    let out = docker(&["stop", "-t", "30", &c.name]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(c.inspect("{{.State.ExitCode}}"), "0");
}

/// `supervisor.idle_stop` in the image: a headless agent that does nothing makes cordon exit 0,
/// so the container stops by itself (as a Fly Machine would).
#[test]
fn an_idle_agent_stops_the_container_with_status_0() {
    let mut pod = Pod::new("idle", WORLD_V4, false);
    let dir = host_dir("idle");
    std::fs::write(dir.join("domains.conf"), "git.example.com\n").unwrap();
    std::fs::write(
        dir.join("cordon.toml"),
        "[secrets]\nrequired = []\n[network]\nallowlist = \"/etc/cordon-e2e/domains.conf\"\n\
         [agent]\ncommand = [\"sleep\", \"infinity\"]\ntmux = false\n[supervisor]\nidle_stop = \"5s\"\n",
    )
    .unwrap();
    let mount = format!("{}:/etc/cordon-e2e:ro", dir.display());
    let c = pod.run("idle", &[PROFILE_1, &["-e", "CORDON_CONFIG=/etc/cordon-e2e/cordon.toml", "-v", &mount]].concat());
    c.wait_phase("ready", BOOT);
    let started = Instant::now();
    // Bounded: `docker wait` alone would wait forever for a container that never stops.
    let code = Command::new("timeout").args(["90", "docker", "wait", &c.name]).output().expect("timeout (coreutils)");
    assert_eq!(String::from_utf8_lossy(&code.stdout).trim(), "0", "did not stop by itself: {}", c.logs());
    assert!(started.elapsed() < Duration::from_secs(60), "stopped after {:?}", started.elapsed());
    assert!(c.logs().contains("supervisor.idle_stop"), "the log says why:\n{}", c.logs());
}
