//! Live policy changes and observe mode as an operator and the agent meet them: `cordon reload`,
//! `allow`, `deny` and `policy suggest` run inside cordon's namespaces (as root, and as the
//! agent's uid, which must be refused), against real DNS clients and TCP connections from the
//! agent's uid to a world namespace.

mod harness;

use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use harness::world::{FakeDns, Rec, TcpService};
use harness::{AGENT_UID, Cordon, Mode, Phase, Sandbox, TestConfig, WORLD_V4};

const BOOT: Duration = Duration::from_secs(30);

/// A TCP server on `addr` that answers every line with `echo LINE`, one thread per connection,
/// for connections that stay open across a policy change.
fn echo(sb: &Sandbox, addr: &str) -> TcpService {
    echo_on(sb, addr, 443)
}

fn echo_on(sb: &Sandbox, addr: &str, port: u16) -> TcpService {
    sb.net.add_world_addr(addr);
    let sock: SocketAddr = format!("{addr}:{port}").parse().unwrap();
    TcpService::start(&sb.net.world, sock, |conn| {
        std::thread::spawn(move || {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
            let mut out = conn.try_clone().unwrap();
            for line in BufReader::new(conn).lines() {
                let Ok(line) = line else { return };
                if writeln!(out, "echo {line}").is_err() {
                    return;
                }
            }
        });
    })
}

fn ip(s: &str) -> Rec {
    Rec::A(s.parse().unwrap())
}

/// These tests are about what the policy admits; their clients speak plain lines, which the
/// name-bound layer refuses by design, so the name-checked ports are address-based here (as in
/// tests/egress.rs). Narrowing forgets the names' bindings too: a unit test covers that.
fn boot(sb: &Sandbox, network: &str) -> Cordon {
    let cfg = TestConfig { network: format!("name_binding = false\n{network}"), ..TestConfig::default() };
    let mut c = sb.launch(&sb.write_config(&cfg), &[], Mode::Pid1, "");
    c.wait_phase(Phase::Ready, BOOT);
    c
}

/// `cordon ARGS` inside cordon's namespaces, as root or as the agent: (exit code, stdout, stderr).
fn cordon(sb: &Sandbox, c: &Cordon, args: &str, as_agent: bool) -> (i32, String, String) {
    let cmd = format!("{} {args} --config {}", env!("CARGO_BIN_EXE_cordon"), sb.path("cordon.toml").display());
    let out = if as_agent { c.agent_exec(&cmd) } else { c.exec(&cmd) };
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status_json(sb: &Sandbox, c: &Cordon) -> serde_json::Value {
    let (_, out, err) = cordon(sb, c, "status --json", false);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}{err}"))
}

/// The DNS status of `name` as the agent's `dig` sees it: NOERROR, NXDOMAIN...
fn dig(c: &Cordon, name: &str) -> String {
    let out = c.agent_exec(&format!("dig +tries=1 +time=3 @127.0.0.53 {name} A"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split("status: ").nth(1).and_then(|r| r.split(',').next()).unwrap_or("NO ANSWER").to_string()
}

/// One line sent and its echo read on a new connection from the agent, by name (glibc).
fn one_echo(c: &Cordon, host: &str) -> Result<String, String> {
    let out = c.agent_exec(&format!("timeout 5 bash -c 'exec 3<>/dev/tcp/{host}/443 && echo hi >&3 && head -n1 <&3'"));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// A connection from the agent to `host` that stays open: sends `one`, then pings every 50 ms
/// until the connection fails or `secs` pass. Writes `open` to `marker` once the first echo is
/// back. Prints every echo, then `closed EPOCH` (when it failed) or `alive`.
fn long_connection(c: &Cordon, host: &str, marker: &str, secs: u32) -> std::thread::JoinHandle<String> {
    let script = format!(
        "exec 3<>/dev/tcp/{host}/443 || exit 9; echo one >&3; read -t 3 l <&3; echo \"$l\"; echo open > {marker}; \
         end=$((SECONDS + {secs})); \
         while [ $SECONDS -lt $end ]; do \
           if ! {{ echo ping >&3 && read -t 2 l <&3; }} 2>/dev/null; then echo closed $(date +%s.%N); exit 0; fi; \
           sleep 0.05; \
         done; echo two >&3; read -t 3 l <&3; echo \"$l\"; echo alive"
    );
    in_background_as_agent(c, vec!["/bin/bash".into(), "-c".into(), script])
}

/// `argv` run as the agent inside cordon's namespaces, on a thread: its stdout and stderr.
fn in_background_as_agent(c: &Cordon, argv: Vec<String>) -> std::thread::JoinHandle<String> {
    let ns = c.ns_init();
    std::thread::spawn(move || {
        let out = std::process::Command::new("nsenter")
            .args(["-t", &ns.to_string(), "-p", "-m", "-u", "-n", "-S", "4242", "-G", "4242", "--"])
            .args(&argv)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .expect("nsenter");
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

fn wait_open(c: &Cordon, marker: &str) {
    harness::wait_until("the long connection to be open", Duration::from_secs(10), || {
        let out = c.exec(&format!("cat {marker} 2>/dev/null"));
        String::from_utf8_lossy(&out.stdout).contains("open").then_some(())
    });
}

fn epoch_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64()
}

#[test]
fn reload_after_editing_the_file_makes_a_new_name_resolvable_while_an_open_connection_keeps_working() {
    let sb = Sandbox::new("reload");
    sb.write_file("domains.conf", "api.example.com\n");
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    dns.set("api.example.com", vec![ip("192.0.2.10")]);
    dns.set("new.example.com", vec![ip("192.0.2.20")]);
    dns.set("hup.example.com", vec![ip("192.0.2.20")]);
    let _a = echo(&sb, "192.0.2.10");
    let _b = echo(&sb, "192.0.2.20");
    let c = boot(&sb, "");
    assert_eq!(dig(&c, "new.example.com"), "NXDOMAIN", "not allowed yet");

    let marker = sb.path("ws/open").display().to_string();
    let conn = long_connection(&c, "api.example.com", &marker, 3);
    wait_open(&c, &marker);
    sb.write_file("domains.conf", "api.example.com\nnew.example.com\n");
    let (code, _, err) = cordon(&sb, &c, "reload", false);
    assert_eq!(code, 0, "reload: {err}");
    assert!(err.contains("2 entries in force"), "{err}");
    assert_eq!(dig(&c, "new.example.com"), "NOERROR");
    assert_eq!(one_echo(&c, "new.example.com").unwrap(), "echo hi");

    let held = conn.join().unwrap();
    assert!(held.contains("echo one") && held.contains("echo two") && held.ends_with("alive\n"), "{held}");

    // SIGHUP to PID 1 is the same reload.
    sb.write_file("domains.conf", "api.example.com\nnew.example.com\nhup.example.com\n");
    c.kill(c.ns_init(), nix::sys::signal::Signal::SIGHUP);
    harness::wait_until("SIGHUP to reload", Duration::from_secs(5), || {
        (dig(&c, "hup.example.com") == "NOERROR").then_some(())
    });
    let doc = status_json(&sb, &c);
    let changes = doc["policy"]["changes"].as_array().unwrap();
    let whats: Vec<(&str, &str, bool)> = changes
        .iter()
        .map(|ch| (ch["what"].as_str().unwrap(), ch["who"].as_str().unwrap(), ch["ok"].as_bool().unwrap()))
        .collect();
    assert_eq!(whats.len(), 2, "{changes:?}");
    assert_eq!((whats[0].0, whats[0].2), ("reload", true));
    assert!(whats[0].1.starts_with("uid 0 pid "), "who: {changes:?}");
    assert_eq!(whats[1], ("reload", "SIGHUP", true));
    assert!(c.boot_log().contains("egress policy changed") || c.stderr().contains("egress policy changed"));
}

#[test]
fn deny_kills_an_open_connection_within_a_second_and_refuses_new_ones_while_other_names_keep_working() {
    let sb = Sandbox::new("deny");
    sb.write_file("domains.conf", "api.example.com\nother.example.com\n");
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    dns.set("api.example.com", vec![ip("192.0.2.10")]);
    dns.set("other.example.com", vec![ip("192.0.2.11")]);
    let _a = echo(&sb, "192.0.2.10");
    let _b = echo(&sb, "192.0.2.11");
    let c = boot(&sb, "");
    assert_eq!(one_echo(&c, "other.example.com").unwrap(), "echo hi");

    let marker = sb.path("ws/open").display().to_string();
    let conn = long_connection(&c, "api.example.com", &marker, 10);
    wait_open(&c, &marker);
    let (code, _, err) = cordon(&sb, &c, "deny api.example.com", false);
    let denied_at = epoch_now();
    assert_eq!(code, 0, "deny: {err}");
    assert!(err.contains("192.0.2.10"), "the address is named as removed: {err}");
    let held = conn.join().unwrap();
    let closed: f64 = held
        .lines()
        .find_map(|l| l.strip_prefix("closed "))
        .unwrap_or_else(|| panic!("the connection survived the deny: {held}"))
        .parse()
        .unwrap();
    assert!(closed <= denied_at + 1.0, "killed {:.2} s after the deny returned", closed - denied_at);

    assert_eq!(dig(&c, "api.example.com"), "NXDOMAIN");
    let err = one_echo(&c, "192.0.2.10").expect_err("a new connection to the denied name's address");
    assert!(err.contains("refused"), "{err}");
    // Positive control: the name still allowed is untouched.
    assert_eq!(one_echo(&c, "other.example.com").unwrap(), "echo hi");
    // Denying what is not an entry is refused, the policy unchanged.
    let (code, _, err) = cordon(&sb, &c, "deny nothere.example.com", false);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("nothing to deny"), "{err}");
}

#[test]
fn an_answer_in_flight_during_a_deny_does_not_put_back_what_the_deny_took_away() {
    let sb = Sandbox::new("inflight");
    sb.write_file("domains.conf", "api.example.com\nother.example.com\n");
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    dns.set("api.example.com", vec![ip("192.0.2.10")]);
    dns.set("other.example.com", vec![ip("192.0.2.11")]);
    let _a = echo(&sb, "192.0.2.10");
    let _b = echo(&sb, "192.0.2.11");
    let c = boot(&sb, "");

    // The agent asks for the name; upstream's answer is held on its way back.
    dns.hold(true);
    let query = ["dig", "+tries=1", "+time=8", "@127.0.0.53", "api.example.com", "A"];
    let asking = in_background_as_agent(&c, query.map(String::from).to_vec());
    harness::wait_until("the query to reach upstream", Duration::from_secs(5), || {
        dns.queries().iter().any(|q| q.starts_with("api.example.com")).then_some(())
    });
    let (code, _, err) = cordon(&sb, &c, "deny api.example.com", false);
    assert_eq!(code, 0, "deny: {err}");
    dns.hold(false);

    // The answer lands after the deny: the client is told NXDOMAIN, and nothing is admitted.
    let answered = asking.join().unwrap();
    assert!(answered.contains("status: NXDOMAIN"), "the answer in flight is refused: {answered}");
    let err = one_echo(&c, "192.0.2.10").expect_err("the denied name's address stays out of the allow sets");
    assert!(err.contains("refused"), "{err}");
    let (_, why, err) = cordon(&sb, &c, "status --json why 192.0.2.10", false);
    let why: serde_json::Value = serde_json::from_str(&why).unwrap_or_else(|e| panic!("{e}: {why}{err}"));
    assert_eq!(why["verdict"], "not admitted", "{why}");
    // Positive control: the name still allowed resolves and connects.
    assert_eq!(one_echo(&c, "other.example.com").unwrap(), "echo hi");
}

#[test]
fn allow_for_3s_expires_by_itself_and_the_name_is_refused_again() {
    let sb = Sandbox::new("allowfor");
    sb.write_file("domains.conf", "api.example.com\n");
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    dns.set("temp.example.com", vec![ip("192.0.2.30")]);
    let _t = echo(&sb, "192.0.2.30");
    let c = boot(&sb, "");
    assert_eq!(dig(&c, "temp.example.com"), "NXDOMAIN");
    let (code, _, err) = cordon(&sb, &c, "allow temp.example.com --for 3s", false);
    let granted = Instant::now();
    assert_eq!(code, 0, "allow: {err}");
    assert_eq!(dig(&c, "temp.example.com"), "NOERROR");
    assert_eq!(one_echo(&c, "temp.example.com").unwrap(), "echo hi");
    let doc = status_json(&sb, &c);
    assert_eq!(doc["policy"]["grants"][0]["entry"], "temp.example.com", "{doc}");
    assert!(doc["policy"]["grants"][0]["until"].is_string());

    std::thread::sleep(Duration::from_secs(3).saturating_sub(granted.elapsed()) + Duration::from_millis(500));
    assert_eq!(dig(&c, "temp.example.com"), "NXDOMAIN", "the grant outlived --for");
    let err = one_echo(&c, "192.0.2.30").expect_err("the expired grant's address is still admitted");
    assert!(err.contains("refused"), "{err}");
    let doc = status_json(&sb, &c);
    assert!(doc["policy"]["grants"].as_array().unwrap().is_empty(), "{doc}");
    let last = doc["policy"]["changes"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["who"], "timer (grant expired)", "{last}");
    assert_eq!(last["ok"], true);
}

#[test]
fn the_agent_cannot_reload_allow_or_deny_and_its_attempt_changes_nothing() {
    let sb = Sandbox::new("agentpolicy");
    sb.write_file("domains.conf", "api.example.com\n");
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    dns.set("api.example.com", vec![ip("192.0.2.10")]);
    dns.set("evil.example.net", vec![ip("192.0.2.66")]);
    let c = boot(&sb, "");
    sb.write_file("domains.conf", "api.example.com\nevil.example.net\n");
    for args in ["reload", "allow evil.example.net", "deny api.example.com", "policy suggest"] {
        let (code, out, err) = cordon(&sb, &c, args, true);
        assert_eq!(code, 77, "agent `cordon {args}`: {out}{err}");
        assert!(err.contains("permission denied: only root may change the egress policy"), "{err}");
    }
    assert_eq!(dig(&c, "evil.example.net"), "NXDOMAIN", "the agent widened the policy");
    assert_eq!(dig(&c, "api.example.com"), "NOERROR", "the agent narrowed the policy");

    // The second lock: with the socket's mode opened by mistake, the peer's uid still decides,
    // and the attempt is recorded.
    let admin = sb.path("state/admin.sock").display().to_string();
    assert!(c.exec(&format!("chmod 666 {admin}")).status.success());
    let (code, _, err) = cordon(&sb, &c, "allow evil.example.net", true);
    assert_eq!(code, 77, "{err}");
    assert!(err.contains("uid 4242"), "{err}");
    assert_eq!(dig(&c, "evil.example.net"), "NXDOMAIN");
    let doc = status_json(&sb, &c);
    let last = doc["policy"]["changes"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["ok"], false, "{last}");
    assert!(last["who"].as_str().unwrap().starts_with("uid 4242"), "{last}");
    // Refused on its credentials before a byte of the request was read: only who asked is kept.
    assert_eq!(last["what"], "(a request, not read)", "{last}");
}

#[test]
fn a_bad_reload_is_refused_with_file_and_line_and_the_old_policy_still_works() {
    let sb = Sandbox::new("badreload");
    sb.write_file("domains.conf", "api.example.com\n");
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    dns.set("api.example.com", vec![ip("192.0.2.10")]);
    dns.set("new.example.com", vec![ip("192.0.2.20")]);
    let _a = echo(&sb, "192.0.2.10");
    let c = boot(&sb, "");
    sb.write_file("domains.conf", "new.example.com\n*.com\n");
    let (code, _, err) = cordon(&sb, &c, "reload", false);
    assert_eq!(code, 1, "{err}");
    let file = sb.path("domains.conf").display().to_string();
    assert!(err.contains(&format!("{file}:2: `*.com`")), "file and line: {err}");
    assert!(err.contains("the policy is unchanged"), "{err}");
    assert_eq!(dig(&c, "api.example.com"), "NOERROR");
    assert_eq!(one_echo(&c, "api.example.com").unwrap(), "echo hi");
    assert_eq!(dig(&c, "new.example.com"), "NXDOMAIN", "half of the bad file went in");
    let doc = status_json(&sb, &c);
    assert_eq!(doc["policy"]["changes"][0]["ok"], false);
}

/// The lookups and connections of one session, replayed on each cordon.
fn session(c: &Cordon) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    for name in ["api.example.com", "outside.example.net", "a.cdn.example.org", "b.cdn.example.org"] {
        seen.push((name.to_string(), dig(c, name)));
        seen.push((format!("connect {name}"), one_echo(c, name).unwrap_or_else(|e| e)));
    }
    seen
}

#[test]
fn observe_mode_resolves_names_outside_the_list_and_its_suggestion_enforced_refuses_nothing_on_a_replay() {
    let names = [
        ("api.example.com", "192.0.2.10"),
        ("outside.example.net", "192.0.2.11"),
        ("a.cdn.example.org", "192.0.2.12"),
        ("b.cdn.example.org", "192.0.2.13"),
    ];
    let suggested = {
        let sb = Sandbox::new("observe");
        sb.write_file("domains.conf", "api.example.com\n");
        let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
        let mut servers = Vec::new();
        for (name, addr) in names {
            dns.set(name, vec![ip(addr)]);
            servers.push(echo(&sb, addr));
        }
        let c = boot(&sb, "mode = \"observe\"\n");
        assert!(c.boot_log().contains("egress is NOT enforced (network.mode = \"observe\")"), "{}", c.boot_log());
        for (what, got) in session(&c) {
            let want = if what.starts_with("connect") { "echo hi" } else { "NOERROR" };
            assert_eq!(got, want, "observe mode, {what}");
        }
        let doc = status_json(&sb, &c);
        assert_eq!(doc["policy"]["mode"], "observe");
        assert_eq!(doc["policy"]["observed_names"], 3, "{doc}");
        let outside = doc["policy"]["observed"].as_array().unwrap().iter().find(|o| o["name"] == "outside.example.net");
        assert_eq!(outside.unwrap()["uids"], serde_json::json!([AGENT_UID]), "who asked: {doc}");
        let (_, human, _) = cordon(&sb, &c, "status", false);
        assert!(human.contains("egress is NOT enforced"), "{human}");
        let (code, text, err) = cordon(&sb, &c, "policy suggest", false);
        assert_eq!(code, 0, "{err}");
        assert!(text.contains("api.example.com  # already present"), "{text}");
        assert!(text.contains("outside.example.net  # seen "), "{text}");
        assert!(text.contains("*.cdn.example.org  # seen "), "{text}");
        text
    };

    let sb = Sandbox::new("replay");
    sb.write_file("domains.conf", &suggested);
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    let mut servers = Vec::new();
    for (name, addr) in names {
        dns.set(name, vec![ip(addr)]);
        servers.push(echo(&sb, addr));
    }
    let c = boot(&sb, "");
    // The readiness probes' own refusals (their negative half) come before the replay.
    let before = status_json(&sb, &c);
    for (what, got) in session(&c) {
        let want = if what.starts_with("connect") { "echo hi" } else { "NOERROR" };
        assert_eq!(got, want, "enforcing the suggestion, {what}");
    }
    let doc = status_json(&sb, &c);
    assert_eq!(doc["dns"]["queries"]["denied"], before["dns"]["queries"]["denied"], "{doc}");
    assert_eq!(doc["egress"]["rejected_ipv4"], before["egress"]["rejected_ipv4"], "{doc}");
    // Negative control: the suggestion is no open door.
    assert_eq!(dig(&c, "elsewhere.example.net"), "NXDOMAIN");
}

/// Name binding on (the default): an agent's TLS connection through the name-checking proxy,
/// with `name` as SNI, held open waiting for a byte the server never sends; prints the epoch
/// when it ended (killed, or after 14 s).
fn tls_held_open(c: &Cordon, name: &str) -> std::thread::JoinHandle<String> {
    let script = format!(
        "python3 -c '\nimport socket, ssl, time\nctx = ssl.create_default_context()\nctx.check_hostname = False\n\
         ctx.verify_mode = ssl.CERT_NONE\ns = ctx.wrap_socket(socket.create_connection((\"{name}\", 443), timeout=14), \
         server_hostname=\"{name}\")\ntry:\n    s.recv(1)\nexcept Exception as e:\n    pass\nprint(\"ended\", time.time())\n'"
    );
    let ns = c.ns_init();
    std::thread::spawn(move || {
        let out = std::process::Command::new("nsenter")
            .args(["-t", &ns.to_string(), "-p", "-m", "-u", "-n", "-S", "4242", "-G", "4242", "--", "/bin/bash", "-c"])
            .arg(&script)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .expect("nsenter");
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

/// Established TCP sockets to `addr` inside cordon's namespaces (the agent's and the proxy's).
fn established_to(c: &Cordon, addr: &str) -> usize {
    let out = c.exec(&format!("ss -tnH state established dst {addr}"));
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// A TLS handshake from the agent with `name` as SNI: whether it got through the proxy.
fn tls_ok(c: &Cordon, name: &str) -> bool {
    let out = c.agent_exec(&format!(
        "echo | timeout 5 openssl s_client -connect {name}:443 -servername {name} 2>&1 | grep -q 'BEGIN CERTIFICATE'"
    ));
    out.status.success()
}

#[test]
fn with_name_binding_deny_kills_the_proxied_connection_and_a_shared_address_refuses_only_the_denied_name() {
    let sb = Sandbox::new("denynames");
    sb.write_file("domains.conf", "api.example.com\nshared.example.com\nkeep.example.com\n");
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    // api.example.com alone on its address; shared and keep on one address.
    dns.set("api.example.com", vec![ip("192.0.2.93")]);
    dns.set("shared.example.com", vec![ip("192.0.2.94")]);
    dns.set("keep.example.com", vec![ip("192.0.2.94")]);
    sb.net.add_world_addr("192.0.2.93");
    sb.net.add_world_addr("192.0.2.94");
    let _https = harness::world::HttpsServer::start(&sb.net.world, &["192.0.2.93:443", "192.0.2.94:443"], &sb.dir);
    let cfg = TestConfig::default();
    let mut c = sb.launch(&sb.write_config(&cfg), &[], Mode::Pid1, "");
    c.wait_phase(Phase::Ready, BOOT);
    for name in ["api.example.com", "shared.example.com", "keep.example.com"] {
        assert!(tls_ok(&c, name), "{name} before any change");
    }

    let held = tls_held_open(&c, "api.example.com");
    harness::wait_until("the proxied connection to be up", Duration::from_secs(10), || {
        (established_to(&c, "192.0.2.93") >= 2).then_some(())
    });
    let (code, _, err) = cordon(&sb, &c, "deny api.example.com", false);
    let denied_at = epoch_now();
    assert_eq!(code, 0, "{err}");
    let held = held.join().unwrap();
    let ended: f64 =
        held.trim().strip_prefix("ended ").unwrap_or_else(|| panic!("the client: {held}")).parse().unwrap();
    assert!(ended <= denied_at + 1.0, "the proxied connection lived {:.2} s past the deny", ended - denied_at);
    assert!(!tls_ok(&c, "api.example.com"));

    // The shared address stays admitted for keep.example.com; shared.example.com's binding is
    // forgotten, so the name-bound layer refuses it on that very address.
    let (code, _, err) = cordon(&sb, &c, "deny shared.example.com", false);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("192.0.2.94"), "the address another name justifies was removed: {err}");
    assert!(tls_ok(&c, "keep.example.com"), "positive control: the other name on the shared address");
    let out = c.agent_exec(
        "echo | timeout 5 openssl s_client -connect 192.0.2.94:443 -servername shared.example.com 2>&1 | grep -c 'BEGIN CERTIFICATE'",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "the denied name passed on a shared address");
}

#[test]
fn observe_mode_says_egress_is_not_enforced_in_the_tmux_status_line() {
    let sb = Sandbox::new("observetmux");
    let _dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    let cfg = TestConfig { tmux: true, network: "mode = \"observe\"\n".into(), ..TestConfig::default() };
    let mut c = sb.launch(&sb.write_config(&cfg), &[], Mode::Pid1, "");
    c.wait_phase(Phase::Ready, BOOT);
    let socket = sb.path("state/tmux/agent.sock").display().to_string();
    let out = c.agent_exec(&format!("tmux -S {socket} show-options -gv status-right"));
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(line.contains("egress NOT enforced (observe mode)"), "status-right: {line:?} {out:?}");
}

#[test]
fn allow_of_a_name_port_entry_adds_the_ports_firewall_rules_live_and_keeps_what_was_admitted() {
    let sb = Sandbox::new("allowport");
    sb.write_file("domains.conf", "api.example.com\n");
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    dns.set("api.example.com", vec![ip("192.0.2.10")]);
    dns.set("port.example.com", vec![ip("192.0.2.40")]);
    let _a = echo(&sb, "192.0.2.10");
    let _p = echo_on(&sb, "192.0.2.40", 8443);
    let c = boot(&sb, "");
    assert_eq!(one_echo(&c, "api.example.com").unwrap(), "echo hi");
    let on_8443 = || {
        let out = c.agent_exec(
            "getent hosts port.example.com >/dev/null; timeout 5 bash -c 'exec 3<>/dev/tcp/192.0.2.40/8443 && echo hi >&3 && head -n1 <&3'",
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(on_8443(), "", "port 8443 before the allow");

    let (code, _, err) = cordon(&sb, &c, "allow port.example.com:8443", false);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("firewall rules added for port(s) 8443"), "{err}");
    assert_eq!(on_8443(), "echo hi");
    // The rules were replaced, the sets kept: the address admitted before is still admitted.
    assert_eq!(one_echo(&c, "192.0.2.10").unwrap(), "echo hi", "an admitted address was lost");
    let rules = c.exec("iptables -S CORDON_AGENT");
    assert!(String::from_utf8_lossy(&rules.stdout).contains("--dport 8443"), "{rules:?}");
}

#[test]
fn observe_mode_lets_an_unlisted_name_through_the_name_bound_layer_and_records_it() {
    let sb = Sandbox::new("observetls");
    sb.write_file("domains.conf", "api.example.com\n");
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    dns.set("api.example.com", vec![ip("192.0.2.95")]);
    dns.set("outside.example.net", vec![ip("192.0.2.96")]);
    sb.net.add_world_addr("192.0.2.95");
    sb.net.add_world_addr("192.0.2.96");
    let _https = harness::world::HttpsServer::start(&sb.net.world, &["192.0.2.95:443", "192.0.2.96:443"], &sb.dir);
    let cfg = TestConfig { network: "mode = \"observe\"\n".into(), ..TestConfig::default() };
    let mut c = sb.launch(&sb.write_config(&cfg), &[], Mode::Pid1, "");
    c.wait_phase(Phase::Ready, BOOT);
    assert!(tls_ok(&c, "api.example.com"), "positive control: the listed name");
    assert!(tls_ok(&c, "outside.example.net"), "observe mode refused an unlisted name");
    let doc = status_json(&sb, &c);
    let seen = doc["policy"]["observed"].as_array().unwrap();
    let outside = seen.iter().find(|o| o["name"] == "outside.example.net").unwrap_or_else(|| panic!("{seen:?}"));
    assert_eq!(outside["via"], serde_json::json!(["dns", "proxy"]), "{outside}");
    // Still a name-bound check: a name cordon's DNS never answered with this address is refused.
    let out = c.agent_exec(
        "echo | timeout 5 openssl s_client -connect 192.0.2.96:443 -servername never.example.org 2>&1 | grep -c 'BEGIN CERTIFICATE'",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "an unbound name passed in observe mode");
}

#[test]
fn a_reload_from_an_allowlist_file_the_agent_can_write_is_refused_and_the_policy_stays() {
    let sb = Sandbox::new("writablereload");
    let file = sb.write_file("domains.conf", "api.example.com\n");
    let shown = file.display().to_string();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    dns.set("api.example.com", vec![ip("192.0.2.10")]);
    dns.set("evil.example.net", vec![ip("192.0.2.66")]);
    let mut c = boot(&sb, "");
    // The boot says so already: a previous run's agent could have edited it.
    let state = c.wait_phase(Phase::Ready, BOOT);
    assert!(
        state.warnings.iter().any(|w| w.contains(&shown) && w.contains("mode 0666") && w.contains("will refuse")),
        "{:?}",
        state.warnings
    );

    // The agent's uid adds its own entry to the file (from outside: inside, the root is
    // read-only; a volume would not be), and root reloads.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid", &AGENT_UID.to_string(), "--regid", &AGENT_UID.to_string(), "--clear-groups"])
        .args(["sh", "-c", &format!("echo evil.example.net >> {shown}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "the agent could not write the 0666 file: {}", String::from_utf8_lossy(&out.stderr));
    let (code, _, err) = cordon(&sb, &c, "reload", false);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("(network.allowlist)") && err.contains("mode 0666") && err.contains("chmod go-w"), "{err}");
    assert_eq!(dig(&c, "evil.example.net"), "NXDOMAIN", "the agent's entry went in");
    assert_eq!(dig(&c, "api.example.com"), "NOERROR", "the policy in force stays");

    // Positive control: the operator makes it root's alone (having read it), and it reloads.
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (code, _, err) = cordon(&sb, &c, "reload", false);
    assert_eq!(code, 0, "{err}");
    assert_eq!(dig(&c, "evil.example.net"), "NOERROR");
}
