//! The journal of refused connections, as an operator reads it: real clients of the agent's uid
//! (bash's /dev/tcp and /dev/udp, dig, curl, python) are refused by the firewall or the
//! name-bound layer, and each refusal shows in `status --json` (and the events file) with its
//! uid, address, port and reason; a flood stays bounded; allowed traffic is never journalled.

mod harness;

use std::process::Output;
use std::time::{Duration, Instant};

use harness::world::{FakeDns, Greeter, Rec};
use harness::{AGENT_UID, Cordon, Mode, Phase, Sandbox, TestConfig, WORLD_V4};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(30);

fn status_json(c: &Cordon, sb: &Sandbox, args: &str) -> Value {
    let cmd = format!("{} status {args} --config {}", env!("CARGO_BIN_EXE_cordon"), sb.path("cordon.toml").display());
    let out: Output = c.exec(&cmd);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("not JSON ({e}): {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

/// The journal's records, newest first.
fn recent(c: &Cordon, sb: &Sandbox) -> Vec<Value> {
    status_json(c, sb, "--json")["journal"]["recent"].as_array().cloned().unwrap_or_default()
}

/// The counters of `reason`: (total, dropped).
fn counts(v: &Value, reason: &str) -> (u64, u64) {
    let c = v["journal"]["counts"].as_array().unwrap().iter().find(|c| c["reason"] == reason).unwrap().clone();
    (c["total"].as_u64().unwrap(), c["dropped"].as_u64().unwrap())
}

/// Polls the journal until a record satisfies `pred`, for at most `within`.
fn wait_record(c: &Cordon, sb: &Sandbox, within: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
    let t0 = Instant::now();
    loop {
        if let Some(r) = recent(c, sb).into_iter().find(|r| pred(r)) {
            return Some(r);
        }
        if t0.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A world with api.example.com at 192.0.2.10 (a greeter on 443), booted with `network` keys
/// and the events file in the state directory.
fn boot(sb: &Sandbox, network: &str) -> (Cordon, FakeDns, Greeter) {
    sb.write_file("domains.conf", "api.example.com\n");
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    dns.set("api.example.com", vec![Rec::A("192.0.2.10".parse().unwrap())]);
    sb.net.add_world_addr("192.0.2.10");
    let greeter = Greeter::start(&sb.net.world, "192.0.2.10:443".parse().unwrap());
    let cfg = TestConfig {
        network: network.into(),
        extra: format!("\n[events]\npath = \"{}\"\nmax_size = \"64K\"\n", sb.path("state/events.jsonl").display()),
        ..TestConfig::default()
    };
    let mut c = sb.start(&cfg, &[], Mode::Pid1);
    c.wait_phase(Phase::Ready, BOOT);
    (c, dns, greeter)
}

#[test]
fn an_agents_refused_connect_shows_in_status_within_a_second_with_uid_address_port_and_reason() {
    let sb = Sandbox::new("journal-connect");
    let (c, _dns, _greeter) = boot(&sb, "name_binding = false");
    // Positive control: an allowed connection works and is never journalled.
    let ok = c.agent_exec(
        "getent hosts api.example.com && timeout 5 bash -c 'exec 3<>/dev/tcp/api.example.com/443 && head -n1 <&3'",
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("hello from 192.0.2.10:443"), "{ok:?}");

    let out = c.agent_exec("timeout 3 bash -c 'exec 3<>/dev/tcp/192.0.2.99/443'");
    assert!(!out.status.success(), "the unadmitted address was reached: {out:?}");
    let refused_at = Instant::now();
    let record = wait_record(&c, &sb, Duration::from_secs(1), |r| r["address"] == "192.0.2.99")
        .expect("the refusal is in status --json within 1 s");
    assert!(refused_at.elapsed() < Duration::from_millis(1500));
    assert_eq!(record["uid"], AGENT_UID, "{record}");
    assert_eq!(record["protocol"], "tcp", "{record}");
    assert_eq!(record["port"], 443, "{record}");
    assert_eq!(record["reason"], "not-admitted", "{record}");
    assert_eq!(record["names"], Value::Array(vec![]), "{record}");
    assert!(record["at"].as_str().unwrap().ends_with('Z'), "{record}");

    let v = status_json(&c, &sb, "--json");
    assert_eq!(v["journal"]["reading"], true);
    assert!(
        !v["journal"]["recent"].as_array().unwrap().iter().any(|r| r["address"] == "192.0.2.10"),
        "the allowed connection was journalled: {}",
        v["journal"]
    );
    assert!(counts(&v, "not-admitted").0 >= 1);

    // `status why ADDRESS` names the refusal; the events file holds the same record.
    let why = status_json(&c, &sb, "--json why 192.0.2.99");
    assert_eq!(why["refusals"][0]["reason"], "not-admitted", "{why}");
    let why_text = c.exec(&format!(
        "{} status why 192.0.2.99 --config {}",
        env!("CARGO_BIN_EXE_cordon"),
        sb.path("cordon.toml").display()
    ));
    let why_text = String::from_utf8_lossy(&why_text.stdout).to_string();
    assert!(why_text.contains("last refused connections to it") && why_text.contains("not-admitted"), "{why_text}");
    // The state directory is cordon's own tmpfs, seen inside its mount namespace only.
    let events = c.exec(&format!("cat {}", sb.path("state/events.jsonl").display()));
    let events = String::from_utf8_lossy(&events.stdout).to_string();
    let lines: Vec<Value> = events.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.contains(&record), "{record} not in {events}");
    let human =
        c.exec(&format!("{} status --config {}", env!("CARGO_BIN_EXE_cordon"), sb.path("cordon.toml").display()));
    let human = String::from_utf8_lossy(&human.stdout).to_string();
    assert!(human.contains(&format!("not-admitted uid {AGENT_UID} tcp 192.0.2.99:443")), "{human}");
}

#[test]
fn a_refused_udp_send_dns_to_an_outside_resolver_a_port_and_loopback_are_each_journalled_with_their_reason() {
    let sb = Sandbox::new("journal-reasons");
    let (c, _dns, _greeter) = boot(&sb, "name_binding = false");
    c.agent_exec("echo x > /dev/udp/192.0.2.20/9999");
    let dig = c.agent_exec("dig +tries=1 +time=2 @198.51.100.53 anything.example.net A");
    assert!(!String::from_utf8_lossy(&dig.stdout).contains("status: NOERROR"), "{dig:?}");
    // An admitted address on a port not allowed for it, and loopback outside loopback_ports.
    c.agent_exec("getent hosts api.example.com; timeout 3 bash -c 'exec 3<>/dev/tcp/192.0.2.10/8080'");
    c.agent_exec("timeout 3 bash -c 'exec 3<>/dev/tcp/127.0.0.1/9'");
    // IPv6 alike.
    c.agent_exec("timeout 3 bash -c 'exec 3<>/dev/tcp/2001:db8::99/443'");

    let find = |pred: &dyn Fn(&Value) -> bool, what: &str| {
        wait_record(&c, &sb, Duration::from_secs(2), pred).unwrap_or_else(|| panic!("{what}: {:#?}", recent(&c, &sb)))
    };
    let udp = find(&|r| r["address"] == "192.0.2.20", "the UDP send");
    assert_eq!(
        (udp["reason"].as_str(), udp["protocol"].as_str(), udp["port"].as_u64()),
        (Some("udp-icmp"), Some("udp"), Some(9999))
    );
    assert_eq!(udp["uid"], AGENT_UID);
    let dns = find(&|r| r["address"] == "198.51.100.53", "the DNS query");
    assert_eq!(
        (dns["reason"].as_str(), dns["protocol"].as_str(), dns["port"].as_u64()),
        (Some("resolver"), Some("udp"), Some(53))
    );
    let port = find(&|r| r["address"] == "192.0.2.10", "the wrong port");
    assert_eq!((port["reason"].as_str(), port["port"].as_u64()), (Some("port"), Some(8080)));
    assert_eq!(port["names"], serde_json::json!(["api.example.com"]), "the name cordon answered with it: {port}");
    let v6 = find(&|r| r["address"] == "2001:db8::99", "the IPv6 connect");
    assert_eq!(
        (v6["reason"].as_str(), v6["protocol"].as_str(), v6["port"].as_u64()),
        (Some("not-admitted"), Some("tcp"), Some(443))
    );
    assert_eq!(v6["uid"], AGENT_UID);
    let lo = find(&|r| r["address"] == "127.0.0.1", "the loopback port");
    assert_eq!((lo["reason"].as_str(), lo["port"].as_u64()), (Some("loopback"), Some(9)));
}

#[test]
fn a_name_refusal_of_the_name_bound_layer_is_journalled_with_the_name_sent_and_the_uid() {
    let sb = Sandbox::new("journal-name");
    let (c, _dns, _greeter) = boot(&sb, "");
    // api.example.com's address, admitted, but another name in the ClientHello.
    let out = c.agent_exec(
        "getent hosts api.example.com; curl -sk --max-time 5 --resolve evil.example.net:443:192.0.2.10 https://evil.example.net/",
    );
    assert!(!out.status.success(), "{out:?}");
    let r = wait_record(&c, &sb, Duration::from_secs(1), |r| r["reason"] == "name").expect("the name refusal");
    assert_eq!(r["sent_name"], "evil.example.net", "{r}");
    assert_eq!(r["address"], "192.0.2.10", "{r}");
    assert_eq!(r["port"], 443, "{r}");
    assert_eq!(r["uid"], AGENT_UID, "the uid from /proc/net/tcp: {r}");
    assert_eq!(r["names"], serde_json::json!(["api.example.com"]), "{r}");
    assert_eq!(r["detail"], "name not allowlisted", "{r}");

    // Plain HTTP: the Host of the request is the name sent.
    let out = c.agent_exec("curl -s --max-time 5 --resolve other.example.net:80:192.0.2.10 http://other.example.net/");
    assert!(!out.status.success(), "{out:?}");
    let r = wait_record(&c, &sb, Duration::from_secs(1), |r| r["sent_name"] == "other.example.net")
        .expect("the HTTP name refusal");
    assert_eq!(
        (r["reason"].as_str(), r["port"].as_u64(), r["uid"].as_u64()),
        (Some("name"), Some(80), Some(u64::from(AGENT_UID))),
        "{r}"
    );
}

#[test]
fn a_flood_of_refused_packets_leaves_the_journal_bounded_and_counts_what_it_dropped() {
    let sb = Sandbox::new("journal-flood");
    let (c, _dns, _greeter) = boot(&sb, "name_binding = false");
    // 5000 refused UDP datagrams and 5000 refused TCP connection attempts, as fast as the agent
    // can send them (each send fails at once: the kernel rejects it on the way out).
    let flood = r#"python3 - <<'EOF'
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(5000):
    try: u.sendto(b"x", ("192.0.2.30", 9000 + i % 100))
    except OSError: pass
for i in range(5000):
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.setblocking(False)
    try: t.connect(("192.0.2.31", 443))
    except OSError: pass
    t.close()
print("sent")
EOF"#;
    let t0 = Instant::now();
    let out = c.agent_exec(flood);
    assert!(String::from_utf8_lossy(&out.stdout).contains("sent"), "{out:?}");
    std::thread::sleep(Duration::from_millis(500));
    let v = status_json(&c, &sb, "--json");
    let recent = v["journal"]["recent"].as_array().unwrap();
    assert!(recent.len() <= 256, "the ring is bounded: {}", recent.len());
    eprintln!(
        "after the flood: {} recorded, counts {}, rejected {}",
        recent.len(),
        v["journal"]["counts"],
        v["egress"]["rejected_ipv4"]
    );
    let (udp_total, udp_dropped) = counts(&v, "udp-icmp");
    let (tcp_total, tcp_dropped) = counts(&v, "not-admitted");
    assert!(udp_total >= 1 && tcp_total >= 1, "{}", v["journal"]);
    // The kernel's limit let only a few hundred of the 10000 reach cordon; its own bucket kept
    // fewer still, and counted the rest.
    assert!(udp_total + tcp_total < 2000, "the kernel's rate limit: {}", v["journal"]["counts"]);
    assert!(udp_dropped + tcp_dropped > 0, "drops are counted: {}", v["journal"]["counts"]);
    // What is kept is exactly what was recorded, of every reason (the boot's readiness probe
    // is refused too).
    let recorded: u64 = v["journal"]["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["total"].as_u64().unwrap() - c["dropped"].as_u64().unwrap())
        .sum();
    assert_eq!(recent.len() as u64, recorded.min(256), "{}", v["journal"]["counts"]);
    // Every packet was still refused: the refusal chains' counters saw them all.
    assert!(v["egress"]["rejected_ipv4"].as_u64().unwrap() >= 10_000, "{}", v["egress"]);
    // The events file stays within twice its cap.
    let size = |p: &str| {
        let out = c.exec(&format!("stat -c %s {} 2>/dev/null || echo 0", sb.path(p).display()));
        String::from_utf8_lossy(&out.stdout).trim().parse::<u64>().unwrap()
    };
    assert!(size("state/events.jsonl") > 0, "events were written");
    assert!(size("state/events.jsonl") <= 64 * 1024 && size("state/events.jsonl.1") <= 64 * 1024);
    assert!(t0.elapsed() < Duration::from_secs(30), "took {:?}", t0.elapsed());
}
