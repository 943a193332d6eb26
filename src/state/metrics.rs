//! The OpenMetrics endpoint (`[metrics] listen`, off by default): `GET /metrics` answers what
//! cordon already counts, read at scrape time from [`Live`] (no counter of its own, so nothing
//! can drift from `status`). Three steps per scrape: [`read`] the live values (the only
//! effects: locks, atomics, `statvfs`), [`families`] turns them into metric families (pure),
//! [`render`] writes them with `prometheus-client`'s OpenMetrics text encoder (pure).
//!
//! To export something new: add a field to [`Reading`], fill it in [`read`], and push a
//! [`Family`] for it in [`families`].
//!
//! Served by a tiny HTTP/1.1 responder (one request per connection, httparse) as the `metrics`
//! service. Reachable by root and the platform only: the firewall refuses the agent's uids the
//! port on every local address (`egress::firewall`, `Plan::metrics_port`), and the config
//! refuses a port the agent's loopback rules would open.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fix::Problem;
use crate::service::Service;
use crate::state::control::Live;
use crate::state::report::Phase;

/// OpenMetrics 1.0's media type (what Prometheus asks for first in its Accept header).
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The one path served.
pub(crate) const PATH: &str = "/metrics";
/// A request head longer than this is refused: a scrape's is a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
/// Per connection, from accept to the last byte written.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at once (only root and the platform get here).
const MAX_CONNECTIONS: usize = 8;

/// Labels of one sample, in order.
type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Clone, PartialEq)]
enum Samples {
    Counter(Vec<(Labels, u64)>),
    Gauge(Vec<(Labels, f64)>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum MetricUnit {
    Seconds,
    Bytes,
}

/// One metric family as read at scrape time. `name` is without the unit and without `_total`,
/// which the encoder appends (`cordon_dns_queries` is written `cordon_dns_queries_total`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Family {
    name: &'static str,
    help: &'static str,
    unit: Option<MetricUnit>,
    samples: Samples,
}

impl Family {
    fn counter(name: &'static str, help: &'static str) -> Family {
        Family { name, help, unit: None, samples: Samples::Counter(vec![]) }
    }

    fn gauge(name: &'static str, help: &'static str) -> Family {
        Family { name, help, unit: None, samples: Samples::Gauge(vec![]) }
    }

    fn unit(mut self, unit: MetricUnit) -> Family {
        self.unit = Some(unit);
        self
    }

    fn labels(labels: &[(&'static str, &str)]) -> Labels {
        labels.iter().map(|&(k, v)| (k, v.to_string())).collect()
    }

    /// Adds a counter sample.
    fn count(mut self, labels: &[(&'static str, &str)], value: u64) -> Family {
        if let Samples::Counter(s) = &mut self.samples {
            s.push((Family::labels(labels), value));
        }
        self
    }

    /// Adds a gauge sample.
    fn set(mut self, labels: &[(&'static str, &str)], value: f64) -> Family {
        if let Samples::Gauge(s) = &mut self.samples {
            s.push((Family::labels(labels), value));
        }
        self
    }

    fn is_empty(&self) -> bool {
        match &self.samples {
            Samples::Counter(s) => s.is_empty(),
            Samples::Gauge(s) => s.is_empty(),
        }
    }
}

/// What a scrape reads, as plain values. None (or empty): that part does not exist (yet), and
/// its families are left out rather than reported as zero.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Reading {
    pub phase: Option<Phase>,
    /// When the supervisor started, seconds since the Unix epoch.
    pub started_at: Option<f64>,
    /// How long the boot took, once it ended.
    pub boot_seconds: Option<f64>,
    pub agent_running: Option<bool>,
    pub agent_restarts: Option<u32>,
    /// Processes the reaper (PID 1 or subreaper) reaped, the supervisor excepted.
    pub reaped: Option<u64>,
    /// Path, size and used bytes of each tmpfs mount.
    pub tmpfs: Vec<(String, u64, u64)>,
    pub egress: Option<EgressReading>,
}

/// The egress part of a [`Reading`] (`network.enforce = true` only).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct EgressReading {
    pub allowed: u64,
    pub denied: u64,
    pub failed: u64,
    pub stale: u64,
    pub rebinding_blocked: u64,
    pub busy: u64,
    pub admissions: u64,
    pub admitted_ipv4: usize,
    pub admitted_ipv6: usize,
    pub refresh_failures: u64,
    pub last_refresh: Option<f64>,
    /// Policy changes put in force and refused since boot.
    pub policy_changes: (u64, u64),
    /// Refusals that reached the journal, by reason, and how many of them its rate limit left
    /// unrecorded.
    pub refusals: Vec<(&'static str, u64)>,
    pub refusals_unrecorded: u64,
    /// The name-bound layer's counters, when its proxy runs.
    pub namebound: Option<crate::egress::namebound::proxy::Counts>,
}

fn phase_name(phase: &Phase) -> &'static str {
    match phase {
        Phase::Booting => "booting",
        Phase::Ready => "ready",
        Phase::Degraded => "degraded",
        Phase::Failed => "failed",
        Phase::Stopping => "stopping",
        Phase::Stopped => "stopped",
    }
}

/// The metric families of a reading, in a fixed order.
pub(crate) fn families(r: &Reading) -> Vec<Family> {
    let mut out = Vec::new();
    if let Some(phase) = &r.phase {
        out.push(
            Family::gauge("cordon_phase", "cordon's phase, as in `cordon status`: 1 for the current one")
                .set(&[("phase", phase_name(phase))], 1.0),
        );
    }
    if let Some(at) = r.started_at {
        out.push(
            Family::gauge("cordon_start_time", "When cordon's supervisor started, since the Unix epoch")
                .unit(MetricUnit::Seconds)
                .set(&[], at),
        );
    }
    if let Some(boot) = r.boot_seconds {
        out.push(
            Family::gauge("cordon_boot_duration", "How long the boot took, from start to ready or failed")
                .unit(MetricUnit::Seconds)
                .set(&[], boot),
        );
    }
    if let Some(running) = r.agent_running {
        out.push(
            Family::gauge("cordon_agent_running", "1 while the agent runs").set(&[], f64::from(u8::from(running))),
        );
    }
    if let Some(restarts) = r.agent_restarts {
        out.push(
            Family::counter("cordon_agent_restarts", "Agent restarts by agent.on_exit = \"restart\"")
                .count(&[], u64::from(restarts)),
        );
    }
    if let Some(reaped) = r.reaped {
        out.push(
            Family::counter("cordon_reaped_processes", "Exited processes reaped by cordon's init (orphans included)")
                .count(&[], reaped),
        );
    }
    if !r.tmpfs.is_empty() {
        let mut size = Family::gauge("cordon_tmpfs_size", "Size of each tmpfs mount").unit(MetricUnit::Bytes);
        let mut used = Family::gauge("cordon_tmpfs_used", "Bytes used on each tmpfs mount").unit(MetricUnit::Bytes);
        for (path, s, u) in &r.tmpfs {
            size = size.set(&[("path", path)], *s as f64);
            used = used.set(&[("path", path)], *u as f64);
        }
        out.extend([size, used]);
    }
    if let Some(e) = &r.egress {
        out.push(
            Family::counter("cordon_dns_queries", "DNS queries answered by cordon, by outcome")
                .count(&[("outcome", "allowed")], e.allowed)
                .count(&[("outcome", "denied")], e.denied)
                .count(&[("outcome", "failed")], e.failed)
                .count(&[("outcome", "stale")], e.stale),
        );
        out.push(
            Family::counter(
                "cordon_dns_rebinding_blocked_addresses",
                "Addresses removed from answers because they may never be admitted (rebinding protection)",
            )
            .count(&[], e.rebinding_blocked),
        );
        out.push(
            Family::counter(
                "cordon_dns_upstream_busy",
                "DNS queries answered at once, stale or with SERVFAIL, because 128 lookups were already waiting on upstream",
            )
            .count(&[], e.busy),
        );
        out.push(
            Family::counter(
                "cordon_egress_admissions",
                "Addresses added to (or renewed in) the kernel's allow sets from DNS answers",
            )
            .count(&[], e.admissions),
        );
        out.push(
            Family::gauge("cordon_egress_admitted_addresses", "Addresses admitted now, by family")
                .set(&[("family", "ipv4")], e.admitted_ipv4 as f64)
                .set(&[("family", "ipv6")], e.admitted_ipv6 as f64),
        );
        let mut refusals = Family::counter(
            "cordon_egress_refusals",
            "The agent's connections refused, by reason, as journalled (the kernel logs at most 50/s)",
        );
        for (reason, total) in &e.refusals {
            refusals = refusals.count(&[("reason", reason)], *total);
        }
        out.push(refusals);
        out.push(
            Family::counter(
                "cordon_egress_refusals_unrecorded",
                "Refusals counted by the journal but not recorded in it: its rate limit",
            )
            .count(&[], e.refusals_unrecorded),
        );
        out.push(
            Family::counter(
                "cordon_policy_changes",
                "Live policy changes (reload, allow, deny, expiry), by result: applied or refused",
            )
            .count(&[("result", "applied")], e.policy_changes.0)
            .count(&[("result", "refused")], e.policy_changes.1),
        );
        out.push(
            Family::counter(
                "cordon_egress_refresh_failures",
                "Allowlisted names whose periodic re-resolution failed upstream (last good addresses kept)",
            )
            .count(&[], e.refresh_failures),
        );
        if let Some(at) = e.last_refresh {
            out.push(
                Family::gauge("cordon_egress_last_refresh", "When the allowlist was last re-resolved")
                    .unit(MetricUnit::Seconds)
                    .set(&[], at),
            );
        }
        if let Some(n) = &e.namebound {
            out.push(
                Family::counter("cordon_namebound_connections", "Connections taken by the name-checking proxy")
                    .count(&[], n.accepted),
            );
            out.push(
                Family::counter(
                    "cordon_namebound_decisions",
                    "TLS connections and HTTP requests judged by the name-checking proxy, by decision",
                )
                .count(&[("decision", "allowed")], n.allowed)
                .count(&[("decision", "refused")], n.refused),
            );
            out.push(
                Family::counter(
                    "cordon_namebound_upstream_failures",
                    "Allowed connections whose destination could not be reached",
                )
                .count(&[], n.upstream_failures),
            );
        }
    }
    out
}

/// The families, as a `prometheus-client` collector.
#[derive(Debug)]
struct Families(Vec<Family>);

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        for f in self.0.iter().filter(|f| !f.is_empty()) {
            let unit = f.unit.map(|u| match u {
                MetricUnit::Seconds => Unit::Seconds,
                MetricUnit::Bytes => Unit::Bytes,
            });
            match &f.samples {
                Samples::Counter(samples) => {
                    let mut metric = encoder.encode_descriptor(f.name, f.help, unit.as_ref(), MetricType::Counter)?;
                    match samples.as_slice() {
                        [(labels, v)] if labels.is_empty() => ConstCounter::new(*v).encode(metric)?,
                        _ => {
                            for (labels, v) in samples {
                                ConstCounter::new(*v).encode(metric.encode_family(labels)?)?;
                            }
                        }
                    }
                }
                Samples::Gauge(samples) => {
                    let mut metric = encoder.encode_descriptor(f.name, f.help, unit.as_ref(), MetricType::Gauge)?;
                    match samples.as_slice() {
                        [(labels, v)] if labels.is_empty() => ConstGauge::new(*v).encode(metric)?,
                        _ => {
                            for (labels, v) in samples {
                                ConstGauge::new(*v).encode(metric.encode_family(labels)?)?;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The OpenMetrics text of `families`, ending with `# EOF`.
pub(crate) fn render(families: Vec<Family>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Families(families)));
    let mut text = String::new();
    // Writing to a String fails only if a family's own encoding does, which ours cannot.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Reads the live values. Called on a blocking thread: `statvfs` and the kernel-side locks.
pub(crate) fn read(live: &Live) -> Reading {
    let mut r = Reading::default();
    {
        let state = live.state.borrow();
        r.phase = Some(state.phase.clone());
        r.started_at = humantime::parse_rfc3339_weak(&state.started_at).ok().map(unix_seconds);
        r.boot_seconds = state.boot_ms.map(|ms| ms / 1000.0);
        if let Some(agent) = &state.agent {
            r.agent_running = Some(agent.running);
            r.agent_restarts = Some(agent.restarts);
        }
    }
    r.reaped = live.reaped.get().and_then(crate::sys::ReapedCount::load);
    r.tmpfs = live
        .tmpfs
        .get()
        .into_iter()
        .flatten()
        .filter_map(|p| crate::state::status::usage(p))
        .map(|u| (u.path, u.size_bytes, u.used_bytes))
        .collect();
    r.egress = live.egress.get().map(|egress| {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &egress.stats;
        let (mut v4, mut v6) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
        for a in egress.admitter.admitted() {
            if a.ip.is_ipv4() {
                v4.insert(a.ip)
            } else {
                v6.insert(a.ip)
            };
        }
        let last = egress.last_refresh.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let journal = egress.journal.counts();
        EgressReading {
            allowed: s.allowed.load(Relaxed),
            denied: s.denied.load(Relaxed),
            failed: s.failed.load(Relaxed),
            stale: s.stale.load(Relaxed),
            rebinding_blocked: s.rebinding_blocked.load(Relaxed),
            busy: s.busy.load(Relaxed),
            admissions: egress.admitter.additions(),
            admitted_ipv4: v4.len(),
            admitted_ipv6: v6.len(),
            refresh_failures: last.as_ref().map_or(0, |r| r.failed_total),
            last_refresh: last.map(|r| unix_seconds(r.at)),
            policy_changes: egress.policy.change_counts(),
            refusals: journal.by_reason.iter().map(|(r, c)| (r.as_str(), c.total)).collect(),
            refusals_unrecorded: journal.by_reason.iter().map(|(_, c)| c.dropped).sum(),
            namebound: egress.proxy.get().map(|p| p.stats.counts()),
        }
    });
    r
}

/// How the responder answers a request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// `GET /metrics` (any query string); `HEAD` gets the headers alone.
    Metrics {
        head: bool,
    },
    NotFound,
    MethodNotAllowed,
    BadRequest,
    /// The head has not ended yet: read more.
    Partial,
}

/// Routes a request head (pure).
pub(crate) fn route(head: &[u8]) -> Route {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Partial) => Route::Partial,
        Err(_) => Route::BadRequest,
        Ok(httparse::Status::Complete(_)) => {
            let path = request.path.unwrap_or("");
            let path = path.split_once('?').map_or(path, |(p, _)| p);
            match (request.method, path) {
                (Some("GET"), PATH) => Route::Metrics { head: false },
                (Some("HEAD"), PATH) => Route::Metrics { head: true },
                (_, PATH) => Route::MethodNotAllowed,
                _ => Route::NotFound,
            }
        }
    }
}

/// The whole response for a route; `body` is the metrics text for [`Route::Metrics`].
fn response(route: Route, body: &str) -> Vec<u8> {
    let (status, content_type, body, extra) = match route {
        Route::Metrics { .. } => ("200 OK", CONTENT_TYPE, body, ""),
        Route::NotFound => ("404 Not Found", "text/plain", "not found: cordon serves /metrics only\n", ""),
        Route::MethodNotAllowed => ("405 Method Not Allowed", "text/plain", "use GET\n", "Allow: GET, HEAD\r\n"),
        Route::BadRequest | Route::Partial => ("400 Bad Request", "text/plain", "bad request\n", ""),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    // HEAD: the headers GET would send, Content-Length included, without the body.
    if route != (Route::Metrics { head: true }) {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// Part of the `firewall` stage, once the rule that refuses the agent the port is in: binds
/// `listen` and serves it as the `metrics` service. Must run inside the runtime.
pub(crate) fn start(listen: SocketAddr, live: Arc<Live>) -> Result<Service, Problem> {
    let bound = std::net::TcpListener::bind(listen).and_then(|l| {
        l.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(l)
    });
    let listener = bound.map_err(|e| {
        Problem::caused_by(format_args!("cannot bind the metrics listener to {listen}"), &e)
            .with_fix("another process holds the address; change metrics.listen")
    })?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    Ok(Service::spawn("metrics", move |mut stop| async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
                () = stop.requested() => return,
            };
            // Over the limit the connection is dropped at once: a scraper retries.
            let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
            let live = live.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(TIMEOUT, answer(stream, live)).await;
                drop(slot);
            });
        }
    }))
}

async fn answer(mut stream: tokio::net::TcpStream, live: Arc<Live>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let route = loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        match route(&head) {
            Route::Partial if head.len() < MAX_HEAD => continue,
            route => break route,
        }
    };
    let body = match route {
        Route::Metrics { .. } => {
            tokio::task::spawn_blocking(move || render(families(&read(&live)))).await.unwrap_or_default()
        }
        _ => String::new(),
    };
    stream.write_all(&response(route, &body)).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading() -> Reading {
        Reading {
            phase: Some(Phase::Ready),
            started_at: Some(1_700_000_000.5),
            boot_seconds: Some(1.25),
            agent_running: Some(true),
            agent_restarts: Some(2),
            reaped: Some(7),
            tmpfs: vec![("/tmp".into(), 1_048_576, 4096), ("/home/agent".into(), 2_097_152, 0)],
            egress: Some(EgressReading {
                allowed: 10,
                denied: 3,
                failed: 1,
                stale: 0,
                rebinding_blocked: 4,
                busy: 6,
                admissions: 12,
                admitted_ipv4: 5,
                admitted_ipv6: 2,
                refresh_failures: 1,
                last_refresh: Some(1_700_000_300.0),
                policy_changes: (3, 1),
                refusals: vec![("not-admitted", 5), ("name", 2)],
                refusals_unrecorded: 1,
                namebound: Some(crate::egress::namebound::proxy::Counts {
                    accepted: 9,
                    allowed: 8,
                    refused: 1,
                    hello_timeouts: 0,
                    overloaded: 0,
                    upstream_failures: 0,
                }),
            }),
        }
    }

    #[test]
    fn a_full_reading_renders_as_openmetrics_with_units_and_total_suffixes() {
        let text = render(families(&reading()));
        for line in [
            "# TYPE cordon_phase gauge",
            "cordon_phase{phase=\"ready\"} 1.0",
            "# TYPE cordon_start_time_seconds gauge",
            "# UNIT cordon_start_time_seconds seconds",
            "cordon_start_time_seconds 1700000000.5",
            "cordon_boot_duration_seconds 1.25",
            "cordon_agent_running 1.0",
            "# TYPE cordon_agent_restarts counter",
            "cordon_agent_restarts_total 2",
            "cordon_reaped_processes_total 7",
            "cordon_tmpfs_size_bytes{path=\"/tmp\"} 1048576.0",
            "cordon_tmpfs_used_bytes{path=\"/home/agent\"} 0.0",
            "cordon_dns_queries_total{outcome=\"allowed\"} 10",
            "cordon_dns_queries_total{outcome=\"denied\"} 3",
            "cordon_dns_queries_total{outcome=\"failed\"} 1",
            "cordon_dns_queries_total{outcome=\"stale\"} 0",
            "cordon_dns_rebinding_blocked_addresses_total 4",
            "# TYPE cordon_dns_upstream_busy counter",
            "cordon_dns_upstream_busy_total 6",
            "cordon_egress_admissions_total 12",
            "cordon_egress_admitted_addresses{family=\"ipv4\"} 5.0",
            "cordon_egress_admitted_addresses{family=\"ipv6\"} 2.0",
            "cordon_egress_refresh_failures_total 1",
            "cordon_policy_changes_total{result=\"applied\"} 3",
            "cordon_egress_refusals_total{reason=\"not-admitted\"} 5",
            "cordon_egress_refusals_total{reason=\"name\"} 2",
            "cordon_egress_refusals_unrecorded_total 1",
            "cordon_policy_changes_total{result=\"refused\"} 1",
            "cordon_egress_last_refresh_seconds 1700000300.0",
            "cordon_namebound_connections_total 9",
            "cordon_namebound_decisions_total{decision=\"refused\"} 1",
            "cordon_namebound_upstream_failures_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        assert!(samples <= 30, "{samples} series: keep it to about 30\n{text}");
        for line in text.lines().filter(|l| l.starts_with("# HELP")) {
            assert!(line.split(' ').count() > 3, "a family without help: {line}");
        }
    }

    #[test]
    fn what_does_not_exist_is_left_out_rather_than_reported_as_zero() {
        let booting = Reading { phase: Some(Phase::Booting), started_at: Some(1.0), ..Reading::default() };
        let text = render(families(&booting));
        assert!(text.contains("cordon_phase{phase=\"booting\"} 1.0"), "{text}");
        for absent in ["cordon_dns", "cordon_egress", "cordon_agent", "cordon_tmpfs", "cordon_namebound", "cordon_boot"]
        {
            assert!(!text.contains(absent), "{absent} in:\n{text}");
        }
        let no_proxy = Reading {
            egress: Some(EgressReading { last_refresh: None, namebound: None, ..EgressReading::default() }),
            ..Reading::default()
        };
        let text = render(families(&no_proxy));
        assert!(text.contains("cordon_dns_queries_total{outcome=\"denied\"} 0"), "{text}");
        assert!(!text.contains("cordon_namebound") && !text.contains("last_refresh"), "{text}");
    }

    #[test]
    fn a_label_value_is_escaped() {
        let r = Reading { tmpfs: vec![("/a\"b\\c".into(), 1, 1)], ..Reading::default() };
        let text = render(families(&r));
        assert!(text.contains(r#"cordon_tmpfs_used_bytes{path="/a\"b\\c"} 1.0"#), "{text}");
    }

    #[test]
    fn only_get_and_head_of_the_metrics_path_are_served() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Route::Metrics { head: false });
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics { head: false });
        assert_eq!(route(b"HEAD /metrics HTTP/1.1\r\n\r\n"), Route::Metrics { head: true });
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::MethodNotAllowed);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"GET /metrics/x HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost"), Route::Partial);
        assert_eq!(route(b"\x16\x03\x01\x02\x00"), Route::BadRequest);
    }

    #[test]
    fn a_response_says_its_length_and_closes() {
        let ok = String::from_utf8(response(Route::Metrics { head: false }, "a 1\n# EOF\n")).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")), "{ok}");
        assert!(ok.contains("Content-Length: 10\r\nConnection: close\r\n\r\na 1\n# EOF\n"), "{ok}");
        let head = String::from_utf8(response(Route::Metrics { head: true }, "a 1\n")).unwrap();
        assert!(head.ends_with("Content-Length: 4\r\nConnection: close\r\n\r\n"), "{head}");
        let wrong = String::from_utf8(response(Route::MethodNotAllowed, "")).unwrap();
        assert!(wrong.starts_with("HTTP/1.1 405") && wrong.contains("Allow: GET, HEAD\r\n"), "{wrong}");
    }
}
