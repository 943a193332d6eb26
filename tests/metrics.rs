//! The OpenMetrics endpoint (`[metrics] listen`) as root, the platform and the agent meet it:
//! scraped with curl inside cordon's namespaces, checked by two independent parsers (Prometheus'
//! `promtool check metrics`, and the strict OpenMetrics parser of the `prometheus_client`
//! Python library), its counters moved by real DNS traffic and a real orphan, and refused to
//! the agent's uid on every local address while root reaches it.

mod harness;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use harness::world::{FakeDns, Rec};
use harness::{CORDON_V4, CORDON_V6, Cordon, Mode, Phase, Sandbox, TestConfig, WORLD_V4, wait_until};

const BOOT: Duration = Duration::from_secs(30);

fn boot(sb: &Sandbox, listen: &str) -> (Cordon, FakeDns) {
    sb.write_file("domains.conf", "api.example.com\n");
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse::<SocketAddr>().unwrap());
    dns.set("api.example.com", vec![Rec::A("192.0.2.10".parse().unwrap())]);
    dns.set("exfil.example.net", vec![Rec::A("192.0.2.66".parse().unwrap())]);
    let cfg = TestConfig { extra: format!("\n[metrics]\nlisten = \"{listen}\"\n"), ..TestConfig::default() };
    let mut c = sb.launch(&sb.write_config(&cfg), &[], Mode::Pid1, "");
    c.wait_phase(Phase::Ready, BOOT);
    (c, dns)
}

/// `curl` of `url` inside cordon's namespaces, as the agent or as root: the headers and body,
/// or the error text with curl's exit code.
fn curl(c: &Cordon, url: &str, as_agent: bool) -> Result<String, String> {
    let script = format!("curl -gsS --max-time 5 -D - {url}");
    let out = if as_agent { c.agent_exec(&script) } else { c.exec(&script) };
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{} (exit {:?})", String::from_utf8_lossy(&out.stderr).trim(), out.status.code()))
    }
}

/// Scrapes as root and returns the body, after checking the status and the media type.
fn scrape(c: &Cordon, url: &str) -> String {
    let response = curl(c, url, false).unwrap_or_else(|e| panic!("root cannot scrape {url}: {e}"));
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/openmetrics-text; version=1.0.0"), "{head}");
    body.to_string()
}

/// The value of the sample `series` (name and labels exactly as written), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Runs `program args` with `input` on stdin; panics naming the package when it is missing.
fn check_with(program: &str, args: &[&str], input: &str, package: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("this test needs `{program}` (apt-get install {package}): {e}"));
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// Parses `text` strictly as OpenMetrics with the `prometheus_client` Python library (Debian's
/// python3-prometheus-client, so the system interpreter) and lints it with `promtool`.
fn assert_parses_as_openmetrics(text: &str) {
    let parser = "import sys\n\
                  from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse\n\
                  families = list(parse(sys.stdin.read()))\n\
                  print(len(families), sum(len(f.samples) for f in families))\n";
    let out = check_with("/usr/bin/python3", &["-c", parser], text, "python3-prometheus-client");
    assert!(
        out.status.success(),
        "not OpenMetrics (prometheus_client parser): {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counts = String::from_utf8_lossy(&out.stdout);
    let samples: usize = counts.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!((15..=36).contains(&samples), "about 30 series expected, got {samples}:\n{text}");
    // promtool (2.42, Debian 12) reads the Prometheus text view of the format and lints it:
    // exit 1 is a parse failure, 3 lint problems. The one lint an OpenMetrics counter always
    // meets there is "no help text" for its `_total` sample, whose HELP line names the family
    // without the suffix (OpenMetrics 1.0, "Counter"); every other problem fails the test.
    let out = check_with("promtool", &["check", "metrics"], text, "prometheus");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(matches!(out.status.code(), Some(0 | 3)), "promtool could not parse it: {report}\n{text}");
    for problem in report.lines().filter(|l| !l.trim().is_empty()) {
        let family = problem.strip_suffix("_total no help text");
        assert!(
            family.is_some_and(
                |f| text.contains(&format!("# HELP {f} ")) && text.contains(&format!("# TYPE {f} counter"))
            ),
            "promtool check metrics: {problem}\n{text}"
        );
    }
}

#[test]
fn the_endpoint_parses_as_openmetrics_and_its_counters_move_with_traffic() {
    let sb = Sandbox::new("metrics");
    let (c, _dns) = boot(&sb, "127.0.0.1:9464");
    let url = "http://127.0.0.1:9464/metrics";
    let before = scrape(&c, url);
    assert_parses_as_openmetrics(&before);
    assert_eq!(value(&before, "cordon_phase{phase=\"ready\"}"), Some(1.0), "{before}");
    assert_eq!(value(&before, "cordon_agent_running"), Some(1.0), "{before}");
    assert!(value(&before, "cordon_boot_duration_seconds").is_some_and(|s| s > 0.0), "{before}");
    assert!(value(&before, "cordon_start_time_seconds").is_some_and(|s| s > 1.7e9), "{before}");
    assert!(before.contains("cordon_tmpfs_size_bytes{path=\""), "{before}");
    let denied = |t: &str| value(t, "cordon_dns_queries_total{outcome=\"denied\"}").expect("denied counter");
    let allowed = |t: &str| value(t, "cordon_dns_queries_total{outcome=\"allowed\"}").expect("allowed counter");
    let admissions = |t: &str| value(t, "cordon_egress_admissions_total").expect("admissions counter");

    // A denied name, asked by the agent, raises the denied counter and nothing else.
    let out = c.agent_exec("dig +tries=1 +time=3 @127.0.0.53 exfil.example.net A");
    assert!(String::from_utf8_lossy(&out.stdout).contains("NXDOMAIN"), "{out:?}");
    let after_denied = scrape(&c, url);
    assert_eq!(denied(&after_denied), denied(&before) + 1.0, "{after_denied}");
    assert_eq!(allowed(&after_denied), allowed(&before), "{after_denied}");

    // An allowed one raises the allowed counter and admits its address.
    let out = c.agent_exec("dig +tries=1 +time=3 @127.0.0.53 api.example.com A");
    assert!(String::from_utf8_lossy(&out.stdout).contains("192.0.2.10"), "{out:?}");
    let after_allowed = scrape(&c, url);
    assert!(allowed(&after_allowed) > allowed(&after_denied), "{after_allowed}");
    assert!(admissions(&after_allowed) >= admissions(&after_denied), "{after_allowed}");
    assert!(
        value(&after_allowed, "cordon_egress_admitted_addresses{family=\"ipv4\"}").is_some_and(|n| n >= 1.0),
        "{after_allowed}"
    );

    // A connection the agent is refused (an address no answer admitted) is counted by reason.
    let refused = |t: &str| value(t, "cordon_egress_refusals_total{reason=\"not-admitted\"}").unwrap_or(0.0);
    let was = refused(&after_allowed);
    c.agent_exec("timeout 3 bash -c 'exec 3<>/dev/tcp/203.0.113.77/443' 2>/dev/null; true");
    wait_until("the refused connect to be counted", Duration::from_secs(5), || {
        (refused(&scrape(&c, url)) > was).then_some(())
    });

    // An orphan, re-parented to cordon's init and reaped there, is counted.
    let reaped = |t: &str| value(t, "cordon_reaped_processes_total").expect("reaped counter");
    let was = reaped(&after_allowed);
    c.exec("sleep 0.2 & disown; exit 0");
    wait_until("the orphan to be counted as reaped", Duration::from_secs(5), || {
        (reaped(&scrape(&c, url)) > was).then_some(())
    });
    assert_parses_as_openmetrics(&scrape(&c, url));
    // The count's descriptor stays with cordon: the agent never inherits it.
    let agent_fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", c.agent()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|t| t.display().to_string())
        .collect();
    assert!(!agent_fds.iter().any(|t| t.contains("cordon-reaped")), "{agent_fds:?}");

    // Anything but GET /metrics is refused.
    let other = curl(&c, "http://127.0.0.1:9464/", false).unwrap();
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
}

#[test]
fn the_agent_cannot_reach_the_metrics_listener_on_any_local_address_but_root_can() {
    let sb = Sandbox::new("metrics-fence");
    // Every address, IPv4 and IPv6, as for a platform that scrapes the container from outside
    // (Fly's scraper comes over IPv6).
    let (c, _dns) = boot(&sb, "[::]:9464");
    for host in ["127.0.0.1", CORDON_V4, "[::1]", &format!("[{CORDON_V6}]")] {
        let url = format!("http://{host}:9464/metrics");
        // Positive control: root (and so the platform) reaches it on this address.
        let body = scrape(&c, &url);
        assert!(body.contains("cordon_phase"), "{body}");
        let t0 = std::time::Instant::now();
        let refused = curl(&c, &url, true).expect_err("the agent reached the metrics listener");
        // curl's 7: could not connect (the reset of the reject rule), at once, not a timeout.
        assert!(refused.ends_with("(exit Some(7))"), "{host}: {refused}");
        assert!(t0.elapsed() < Duration::from_secs(3), "rejected, not dropped: took {:?}", t0.elapsed());
    }
    // From the world (the platform's scraper), it answers too.
    let world = Command::new("ip")
        .args(["netns", "exec", &sb.net.world, "curl", "-sS", "--max-time", "5"])
        .arg(format!("http://{CORDON_V4}:9464/metrics"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&world.stdout).contains("cordon_dns_queries_total"), "{world:?}");
    assert!(c.boot_log().contains("metrics port 9464 refused"), "{}", c.boot_log());
}

#[test]
fn agent_restarts_and_state_follow_the_supervisor() {
    let sb = Sandbox::new("metrics-agent");
    sb.write_file("domains.conf", "api.example.com\n");
    let _dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse::<SocketAddr>().unwrap());
    let cfg = TestConfig {
        agent_command: "sleep 0.3; exit 3".into(),
        on_exit: "restart",
        extra: "\n[metrics]\nlisten = \"127.0.0.1:9464\"\n".into(),
        ..TestConfig::default()
    };
    let mut c = sb.launch(&sb.write_config(&cfg), &[], Mode::Pid1, "");
    c.wait_phase(Phase::Ready, BOOT);
    let url = "http://127.0.0.1:9464/metrics";
    // Each exit is followed by a restart after the backoff (1 s, doubling).
    let text = wait_until("two agent restarts in the metrics", Duration::from_secs(15), || {
        let text = scrape(&c, url);
        (value(&text, "cordon_agent_restarts_total")? >= 2.0).then_some(text)
    });
    assert_parses_as_openmetrics(&text);
    let running = |t: &str| value(t, "cordon_agent_running");
    wait_until("the agent seen both running and not", Duration::from_secs(10), || {
        let seen: Vec<f64> = (0..40).filter_map(|_| running(&scrape(&c, url))).collect();
        (seen.contains(&0.0) && seen.contains(&1.0)).then_some(())
    });
}
