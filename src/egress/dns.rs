//! The embedded DNS server: the single source of truth for what the agent may reach.
//!
//! A denied name gets NXDOMAIN with an RFC 8914 Extended DNS Error ("Blocked") and is never
//! forwarded upstream. An allowed name is forwarded; every A/AAAA address in the answer (CNAME
//! chains included) is admitted to the firewall before the answer is released, addresses that
//! may not be admitted (rebinding) are removed from it, and address hints in HTTPS/SVCB records
//! and encrypted ClientHello configurations in HTTPS/SVCB records are stripped (the client must
//! resolve, and so admit, the target itself; and must send its TLS name in the clear, where the
//! name-bound layer reads it). Every admitted address is also bound to the query name and every
//! name of the answer's CNAME chain, for the name-bound layer (`namebound::bindings`). Answers
//! from the resolver's cache pass the same path, so they re-admit and re-bind their addresses.

mod cache;
mod denials;
mod udp;
mod wire;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::HTTPS;
use hickory_server::proto::rr::rdata::opt::EdnsOption;
use hickory_server::proto::rr::rdata::svcb::{SVCB, SvcParamKey};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};

use crate::egress::admission::{Admitter, Verdict};
use crate::egress::namebound::bindings::Bindings;
use crate::egress::policy::Policy;

use self::cache::{AnswerCache, Hit};
use self::denials::Denials;
use self::wire::{EDE_BLOCKED, EDE_TEXT, EDNS_EDE};
/// Extended DNS error code 0, Other (RFC 8914 §4.1).
const EDE_OTHER: u16 = 0;
/// Extended DNS error code 3, Stale Answer (RFC 8914 §4.4): on every serve-stale answer, with
/// why upstream did not answer in its text.
const EDE_STALE: u16 = 3;
/// How many distinct denied (name, type) pairs `status` keeps.
const RECENT_DENIALS: usize = 256;
/// How many names' last good addresses are kept for serve-stale and the refresh: several times
/// the names an agent's session resolves (exact allowlist names are kept first). 4,096 cost
/// 0.4 MiB more RSS in the DNS bench.
const LAST_GOOD_NAMES: usize = 1024;
/// TTL of a stale answer (RFC 8767 §4 recommends 30 seconds).
const STALE_TTL: u32 = 30;
/// How long a client waits for upstream before a stale answer is served, when there is one
/// (RFC 8767 §5, "stale answer client timeout": 1.8 seconds).
const STALE_CLIENT_TIMEOUT: Duration = Duration::from_millis(1800);
/// How many queries may wait on upstream at once (dnsmasq's `dns-forward-max` is 150). Each
/// holds a resolver lookup, its socket and buffers (~25 KB in the DNS bench's setup); one more
/// is answered at once, from the last good addresses or with SERVFAIL. Without a bound, a flood
/// of unique allowed names (under a wildcard entry) against a dead upstream grew the supervisor
/// to 235 MiB in 20 s (docs/benchmarks.md).
pub(crate) const LOOKUPS_IN_FLIGHT: usize = 128;
/// The extended DNS error text (code 0, Other) of a query turned away by [`LOOKUPS_IN_FLIGHT`].
const EDE_BUSY_TEXT: &str = "cordon: too many lookups waiting on upstream, try again";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub name: String,
    pub qtype: String,
    pub count: u64,
    pub last: SystemTime,
}

/// Counters and the recent denials, shared with `status`.
pub struct DnsStats {
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    pub failed: AtomicU64,
    /// Addresses removed from answers because they may not be admitted.
    pub rebinding_blocked: AtomicU64,
    /// Answers served from the last good addresses while upstream failed (RFC 8767).
    pub stale: AtomicU64,
    /// Queries turned away because [`LOOKUPS_IN_FLIGHT`] were waiting on upstream (also
    /// counted in `failed` or `stale`, as they were answered).
    pub busy: AtomicU64,
    recent: Mutex<Denials>,
    denial_log: LogBudget,
    /// Lines about upstream failures answered stale or with SERVFAIL: one per query would
    /// flood the log while upstream is down.
    upstream_log: LogBudget,
    /// The last upstream failure, for `status`.
    pub last_upstream_error: Mutex<Option<(SystemTime, String)>>,
}

impl Default for DnsStats {
    fn default() -> Self {
        DnsStats {
            allowed: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            rebinding_blocked: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            recent: Mutex::new(Denials::new(RECENT_DENIALS)),
            denial_log: LogBudget::default(),
            upstream_log: LogBudget::default(),
            last_upstream_error: Mutex::new(None),
        }
    }
}

impl std::fmt::Debug for DnsStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsStats")
            .field("allowed", &self.allowed)
            .field("denied", &self.denied)
            .field("failed", &self.failed)
            .field("rebinding_blocked", &self.rebinding_blocked)
            .field("stale", &self.stale)
            .finish_non_exhaustive()
    }
}

impl DnsStats {
    pub fn upstream_failed(&self, error: String) {
        *self.last_upstream_error.lock().unwrap_or_else(|e| e.into_inner()) = Some((SystemTime::now(), error));
    }
}

impl DnsStats {
    /// Records a denial; returns its count so far, for rate-limited logging. Allocates
    /// nothing once the table of recent denials is full.
    fn deny(&self, name: &str, qtype: RecordType) -> u64 {
        self.denied.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now();
        self.recent.lock().unwrap_or_else(|e| e.into_inner()).deny(name, u16::from(qtype), now)
    }

    /// The recent denials, most recent first.
    pub fn recent_denials(&self) -> Vec<Denial> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Denial> = recent
            .iter()
            .map(|(name, qtype, count, last)| Denial {
                name: name.to_string(),
                qtype: RecordType::from(qtype).to_string(),
                count,
                last,
            })
            .collect();
        out.sort_by_key(|d| std::cmp::Reverse(d.last));
        out
    }
}

/// How many lines of a kind (denials; upstream failures) the log gets per second at most,
/// across all names: a flood of unique denied names (each one's first denial is logged), or of
/// queries while upstream is down, must not turn into a flood of log writes.
const LOG_LINES_PER_SECOND: u64 = 20;

/// A per-second budget of log lines (denials; upstream failures), lock-free.
#[derive(Debug, Default)]
struct LogBudget {
    /// The second (since the first denial) the count is for.
    second: AtomicU64,
    used: AtomicU64,
    /// Lines left out since the last one written.
    skipped: AtomicU64,
}

impl LogBudget {
    /// Whether a line may be written now; if so, how many were left out before it.
    fn take(&self, second: u64) -> Option<u64> {
        if self.second.swap(second, Ordering::Relaxed) != second {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < LOG_LINES_PER_SECOND {
            Some(self.skipped.swap(0, Ordering::Relaxed))
        } else {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Seconds since this process first asked, for [`LogBudget`].
fn monotonic_second() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

/// A resolver for the upstream servers only: no hosts file, no search list, no system config.
pub(crate) fn upstream_resolver(upstreams: &[SocketAddr]) -> TokioResolver {
    let servers = upstreams
        .iter()
        .map(|u| {
            let mut ns = NameServerConfig::udp_and_tcp(u.ip());
            for conn in &mut ns.connections {
                conn.port = u.port();
            }
            ns
        })
        .collect();
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.ndots = 0;
    opts.preserve_intermediates = true;
    opts.edns0 = true;
    // Small: cordon's answer cache answers repeated queries over UDP (cache::DEFAULT_CAPACITY
    // entries); this one serves what that one does not hold (the other EDNS variant's first
    // query, TCP, negative answers, a renewal, the refresh). Each entry is a whole parsed
    // message in a moka cache: 1,024 of them held 1.1 MiB more in the DNS bench than 128, 256
    // 0.3 MiB more; 128 still holds several times the names an agent's session resolves.
    opts.cache_size = 128;
    // A name that does not exist now may exist soon (a repository just created).
    opts.negative_max_ttl = Some(Duration::from_secs(30));
    Resolver::builder_with_config(ResolverConfig::from_parts(None, vec![], servers), TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .expect("resolver from explicit configuration")
}

/// Last good addresses (with their TTLs) of the exact allowlist names, for the refresh's
/// fail-closed fallback.
pub(crate) type LastGood = Arc<Mutex<BTreeMap<String, Vec<(IpAddr, u32)>>>>;

pub(crate) struct Handler {
    pub policy: Arc<Policy>,
    pub resolver: TokioResolver,
    pub admitter: Arc<Admitter>,
    pub stats: Arc<DnsStats>,
    pub last_good: LastGood,
    pub bindings: Arc<Bindings>,
    /// Allowed answers as sent, for the UDP fast path.
    pub cache: Arc<AnswerCache>,
    /// Permits for queries waiting on upstream, [`LOOKUPS_IN_FLIGHT`] of them.
    pub lookups: Arc<tokio::sync::Semaphore>,
}

/// The permits for [`Handler::lookups`].
pub(crate) fn lookup_permits() -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(LOOKUPS_IN_FLIGHT))
}

/// A new answer cache of the default size, for [`Handler::cache`].
pub(crate) fn answer_cache() -> Arc<AnswerCache> {
    Arc::new(AnswerCache::new(cache::DEFAULT_CAPACITY))
}

/// [`admit_answer`] under the policy in force *now*, not the one `decided_with` (taken when the
/// query was decided, before an upstream round trip): an answer in flight while a change
/// narrowed the policy must not put back what the change took away. Holds the policy's
/// admission gate from the re-check to the end of the admission; re-decides when the
/// allowlist changed meanwhile. Ok(None): the name is no longer allowed, nothing was admitted.
#[allow(clippy::too_many_arguments)]
pub(crate) fn admit_in_force(
    policy: &Policy,
    admitter: &Admitter,
    bindings: &Bindings,
    stats: &DnsStats,
    decided_with: &Arc<crate::config::allowlist::Allowlist>,
    name: &str,
    reach: &crate::config::allowlist::Reach,
    records: &[Record],
) -> std::io::Result<Option<Filtered>> {
    let _gate = policy.admission_gate();
    let current = policy.allowlist();
    let reach = if Arc::ptr_eq(&current, decided_with) {
        reach.clone()
    } else {
        match current.lookup(name).or_else(|| policy.observe_quiet(name)) {
            Some(reach) => reach,
            None => return Ok(None),
        }
    };
    admit_answer(admitter, bindings, stats, name, &reach, records).map(Some)
}

/// What became of one upstream answer on its way to the client.
pub(crate) struct Filtered {
    pub records: Vec<Record>,
    pub addresses: Vec<(IpAddr, u32)>,
}

/// Admits every address of `records` for `name`, drops the refused ones, binds the names of
/// the answer to the admitted ones, and strips SVCB hints and ECH. Err: the kernel refused an
/// admission, and the answer must not be released.
pub(crate) fn admit_answer(
    admitter: &Admitter,
    bindings: &Bindings,
    stats: &DnsStats,
    name: &str,
    reach: &crate::config::allowlist::Reach,
    records: &[Record],
) -> std::io::Result<Filtered> {
    let mut out = Filtered { records: Vec::with_capacity(records.len()), addresses: Vec::new() };
    let now = Instant::now();
    for record in records {
        let ip = match &record.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        };
        if let Some(ip) = ip {
            match admitter.admit(name, ip, record.ttl, reach)? {
                Verdict::Admitted => {
                    out.addresses.push((ip, record.ttl));
                    bind_names(bindings, name, records, ip, now + admitter.lifetime(record.ttl), now);
                }
                Verdict::Refused(why) => {
                    stats.rebinding_blocked.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(name, %ip, why, "address removed from the answer: never admitted for a public name");
                    continue;
                }
            }
        }
        let data = match &record.data {
            RData::HTTPS(h) => Some(RData::HTTPS(HTTPS(without_hints(&h.0)))),
            RData::SVCB(s) => Some(RData::SVCB(without_hints(s))),
            _ => None,
        };
        match data {
            Some(data) => {
                let mut r = record.clone();
                r.data = data;
                out.records.push(r);
            }
            None => out.records.push(record.clone()),
        }
    }
    Ok(out)
}

/// Binds `ip` to the query name and to every name of the answer's CNAME chain (owners and
/// targets), and to the owners of its address records, until `until`: a TLS name or HTTP host
/// that is any of them may then reach `ip`. Allocates nothing for names already bound
/// (lowercase query names, the wire form of the records' names).
fn bind_names(bindings: &Bindings, qname: &str, records: &[Record], ip: IpAddr, until: Instant, now: Instant) {
    bindings.bind(qname.strip_suffix('.').unwrap_or(qname), ip, until, now);
    for record in records {
        let bind = |n: &Name| with_ascii(n, |n| bindings.bind(n, ip, until, now));
        match &record.data {
            RData::CNAME(target) => {
                bind(&record.name);
                bind(&target.0);
            }
            RData::A(_) | RData::AAAA(_) => bind(&record.name),
            _ => {}
        }
    }
}

/// Calls `f` with `name` in the canonical form (lowercase ASCII, no trailing dot), written into a
/// stack buffer: the answer path binds several names per answer and should not allocate for
/// them. A name that does not fit (longer than DNS allows) or is not ASCII is skipped.
fn with_ascii(name: &Name, f: impl FnOnce(&str)) {
    let mut buf = [0u8; 256];
    let mut len = 0;
    for label in name.iter() {
        let need = usize::from(len > 0) + label.len();
        if len + need > buf.len() {
            return;
        }
        if len > 0 {
            buf[len] = b'.';
            len += 1;
        }
        for &b in label {
            buf[len] = b.to_ascii_lowercase();
            len += 1;
        }
    }
    if let Ok(text) = std::str::from_utf8(&buf[..len])
        && text.is_ascii()
        && len > 0
    {
        f(text);
    }
}

/// The record without address hints (the client must resolve, and so admit, the target) and
/// without ECH configurations (the client must send its real name in the clear ClientHello,
/// where the name-bound layer reads it; with ECH it would send only an outer name).
fn without_hints(s: &SVCB) -> SVCB {
    let params = s
        .svc_params
        .iter()
        .filter(|(k, _)| !matches!(k, SvcParamKey::Ipv4Hint | SvcParamKey::Ipv6Hint | SvcParamKey::EchConfigList))
        .cloned()
        .collect();
    SVCB::new(s.svc_priority, s.target_name.clone(), params)
}

async fn send<'a, R: ResponseHandler>(
    mut handle: R,
    request: &Request,
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> ResponseInfo {
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!("cannot send a DNS response: {e}");
            let mut md = Metadata::response_from_request(&request.metadata);
            md.response_code = ResponseCode::ServFail;
            Header { metadata: md, counts: HeaderCounts::default() }.into()
        }
    }
}

/// Why an answer is served stale.
#[derive(Debug, Clone, Copy)]
enum Stale<'a> {
    /// [`LOOKUPS_IN_FLIGHT`] lookups were already waiting on upstream.
    Busy,
    /// No answer within [`STALE_CLIENT_TIMEOUT`].
    Slow,
    /// The lookup failed, with this error.
    Failed(&'a str),
}

impl Stale<'_> {
    /// For the client, in the EDE text: short, no upstream detail.
    fn reason(self) -> &'static str {
        match self {
            Stale::Busy => "too many lookups waiting on upstream",
            Stale::Slow => "upstream is slow",
            Stale::Failed(_) => "upstream lookup failed",
        }
    }

    /// For the log.
    fn log(self) -> String {
        match self {
            Stale::Failed(e) => format!("upstream lookup failed ({e})"),
            other => other.reason().to_string(),
        }
    }
}

/// Adds an extended DNS error (RFC 8914) to the response's EDNS, when the client sent EDNS.
fn add_ede(edns: &mut Option<Edns>, code: u16, text: &str) {
    if let Some(e) = edns.as_mut() {
        let mut data = code.to_be_bytes().to_vec();
        data.extend_from_slice(text.as_bytes());
        e.options_mut().insert(EdnsOption::Unknown(EDNS_EDE, data));
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, response_handle: R) -> ResponseInfo {
        // Echo EDNS when the client sent it, so answers are not truncated at 512 bytes and the
        // EDE can be carried; without it, a response must not carry an OPT record (RFC 6891).
        let mut edns = request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().max(512));
            e
        });
        if request.metadata.message_type != MessageType::Query || request.metadata.op_code != OpCode::Query {
            let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
            return send(response_handle, request, builder.error_msg(&request.metadata, ResponseCode::NotImp)).await;
        }
        let Ok(info) = request.request_info() else {
            let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
            return send(response_handle, request, builder.error_msg(&request.metadata, ResponseCode::FormErr)).await;
        };
        // The wire form: `Display` would turn `xn--` labels into Unicode, which no allowlist
        // entry (always punycode) matches.
        let qname = info.query.name().to_ascii();
        let qtype = info.query.query_type();
        let mut md = Metadata::response_from_request(&request.metadata);
        md.recursion_available = true;

        let allowlist = self.policy.allowlist();
        let Some(reach) = self.decide(&allowlist, &qname, qtype, Some((request.src(), request.protocol()))) else {
            add_ede(&mut edns, EDE_BLOCKED, EDE_TEXT);
            md.response_code = ResponseCode::NXDomain;
            let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
            return send(response_handle, request, builder.build_no_records(md)).await;
        };

        // Held until the lookup ends. None free: answered now, never queued.
        let Ok(_permit) = self.lookups.try_acquire() else {
            let busy = self.stats.busy.fetch_add(1, Ordering::Relaxed) + 1;
            if busy.is_power_of_two() {
                tracing::warn!(
                    name = %qname,
                    qtype = %qtype,
                    count = busy,
                    "{LOOKUPS_IN_FLIGHT} DNS lookups are waiting on upstream: answering at once, from the last good addresses or with SERVFAIL"
                );
            }
            if let Some(records) = self.serve_stale(&qname, qtype, &allowlist, &reach, Stale::Busy, &mut edns) {
                let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
                return send(response_handle, request, builder.build(md, records.iter(), [], [], [])).await;
            }
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            add_ede(&mut edns, EDE_OTHER, EDE_BUSY_TEXT);
            md.response_code = ResponseCode::ServFail;
            let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
            return send(response_handle, request, builder.build_no_records(md)).await;
        };
        let lookup = self.resolver.lookup(Name::from(info.query.name().clone()), qtype);
        tokio::pin!(lookup);
        let result = match tokio::time::timeout(STALE_CLIENT_TIMEOUT, &mut lookup).await {
            Ok(result) => result,
            Err(_) => {
                if let Some(records) = self.serve_stale(&qname, qtype, &allowlist, &reach, Stale::Slow, &mut edns) {
                    self.stats.upstream_failed(format!("{qname} {qtype}: no answer within {STALE_CLIENT_TIMEOUT:?}"));
                    let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
                    return send(response_handle, request, builder.build(md, records.iter(), [], [], [])).await;
                }
                lookup.await
            }
        };
        let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
        match result {
            Ok(lookup) => {
                let admitted = admit_in_force(
                    &self.policy,
                    &self.admitter,
                    &self.bindings,
                    &self.stats,
                    &allowlist,
                    &qname,
                    &reach,
                    lookup.answers(),
                );
                match admitted {
                    Ok(None) => {
                        // A change took the name away while its answer was on the way.
                        self.stats.denied.fetch_add(1, Ordering::Relaxed);
                        md.response_code = ResponseCode::NXDomain;
                        send(response_handle, request, builder.build_no_records(md)).await
                    }
                    Ok(Some(filtered)) => {
                        self.stats.allowed.fetch_add(1, Ordering::Relaxed);
                        if !filtered.addresses.is_empty() {
                            self.remember(&qname, &filtered.addresses);
                        }
                        self.cache_answer(request, &info, &qname, edns.as_ref(), md, &filtered, &allowlist);
                        send(response_handle, request, builder.build(md, filtered.records.iter(), [], [], [])).await
                    }
                    Err(e) => {
                        self.stats.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(name = %qname, "cannot admit the answer's addresses, answering SERVFAIL: {e}");
                        send(response_handle, request, builder.error_msg(&request.metadata, ResponseCode::ServFail))
                            .await
                    }
                }
            }
            Err(e) if e.is_nx_domain() => {
                self.stats.allowed.fetch_add(1, Ordering::Relaxed);
                md.response_code = ResponseCode::NXDomain;
                send(response_handle, request, builder.build_no_records(md)).await
            }
            Err(e) if e.is_no_records_found() => {
                self.stats.allowed.fetch_add(1, Ordering::Relaxed);
                send(response_handle, request, builder.build_no_records(md)).await
            }
            Err(e) => {
                self.stats.upstream_failed(format!("{qname} {qtype}: {e}"));
                // Upstream failed: answer from the last good addresses when there are some
                // (serve-stale), so names that worked keep working; new names fail closed.
                let failed = e.to_string();
                if let Some(records) =
                    self.serve_stale(&qname, qtype, &allowlist, &reach, Stale::Failed(&failed), &mut edns)
                {
                    let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
                    return send(response_handle, request, builder.build(md, records.iter(), [], [], [])).await;
                }
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                if let Some(skipped) = self.stats.upstream_log.take(monotonic_second()) {
                    tracing::warn!(name = %qname, qtype = %qtype, skipped, "upstream lookup failed: {failed}");
                }
                let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
                send(response_handle, request, builder.error_msg(&request.metadata, ResponseCode::ServFail)).await
            }
        }
    }
}

impl Handler {
    /// The one place a query's name is decided: what it may reach (observe mode: also what the
    /// allowlist refuses, recorded), or None when it is not in the allowlist in force (the denial is counted, and logged at its 1st, 2nd, 4th, ...
    /// occurrence, within [`LOG_LINES_PER_SECOND`] lines a second; `skipped` in a line counts
    /// those left out before it). Both the UDP fast path and the hickory path ask here.
    fn decide(
        &self,
        allowlist: &crate::config::allowlist::Allowlist,
        qname: &str,
        qtype: RecordType,
        client: Option<(SocketAddr, Protocol)>,
    ) -> Option<crate::config::allowlist::Reach> {
        // Observe mode (`network.mode`): a name outside the allowlist is recorded, with the uid
        // of the client's socket, and answered.
        let asked_by = || {
            let (src, protocol) = client?;
            match protocol {
                Protocol::Udp => crate::egress::journal::client_owner(src, false),
                Protocol::Tcp => crate::egress::journal::client_owner(src, true),
                _ => None,
            }
        };
        let reach = allowlist.lookup(qname).or_else(|| self.policy.observe(qname, "dns", asked_by));
        if reach.is_none() {
            let count = self.stats.deny(qname, qtype);
            if count.is_power_of_two()
                && let Some(skipped) = self.stats.denial_log.take(monotonic_second())
            {
                tracing::info!(name = %qname, qtype = %qtype, count, skipped, "denied: not in the allowlist");
            }
        }
        reach
    }

    /// The UDP fast path: answers `packet` into `out` when it is a plain query for a denied
    /// name (from the denial template) or for a cached allowed answer; returns the response's
    /// length. None: the hickory path must answer it.
    pub(crate) fn answer_fast(&self, packet: &[u8], out: &mut [u8]) -> Option<usize> {
        let mut text = [0u8; wire::NAME_TEXT_MAX];
        let (query, len) = wire::parse_query(packet, &mut text)?;
        let name = std::str::from_utf8(&text[..len]).ok()?;
        let allowlist = self.policy.allowlist();
        // Observe mode's names take the full path, which decides (and records) them once; the
        // mode is checked first, so enforce mode pays no second lookup here.
        if self.policy.observe_quiet(name).is_some() && allowlist.lookup(name).is_none() {
            return None;
        }
        match self.decide(&allowlist, name, RecordType::from(query.qtype), None) {
            None => (out.len() >= wire::DENIAL_MAX).then(|| wire::write_denial(&query, out)),
            Some(_) => match self.cache.answer(&query, name, &allowlist, Instant::now(), out) {
                Hit::Answer(n) => {
                    self.stats.allowed.fetch_add(1, Ordering::Relaxed);
                    Some(n)
                }
                Hit::Miss => None,
            },
        }
    }

    /// Stores the answer just admitted for the fast path, encoded as the client gets it (less
    /// truncation, which the fast path checks per client). Its addresses' admission is due for
    /// renewal when it no longer outlives the answer's TTL by the full grace.
    #[allow(clippy::too_many_arguments)]
    fn cache_answer(
        &self,
        request: &Request,
        info: &hickory_server::server::RequestInfo<'_>,
        qname: &str,
        edns: Option<&Edns>,
        md: Metadata,
        filtered: &Filtered,
        allowlist: &Arc<crate::config::allowlist::Allowlist>,
    ) {
        if info.query.query_class() != hickory_server::proto::rr::DNSClass::IN || filtered.records.is_empty() {
            return;
        }
        let now = Instant::now();
        let due = filtered
            .addresses
            .iter()
            .map(|&(_, ttl)| now + self.admitter.renewal_due(ttl))
            .min()
            .unwrap_or(now + Duration::from_secs(86_400));
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = hickory_server::proto::serialize::binary::BinEncoder::new(&mut bytes);
        let response =
            MessageResponseBuilder::new(&request.queries, edns).build(md, filtered.records.iter(), [], [], []);
        if response.destructive_emit(&mut encoder).is_ok() {
            let name = qname.to_ascii_lowercase();
            let qtype = u16::from(info.query.query_type());
            self.cache.store(&name, qtype, edns.is_some(), &bytes, allowlist, due, now);
        }
    }

    /// Keeps `name`'s good addresses for serve-stale and the refresh. Bounded: when full, an
    /// arbitrary entry that is not an exact allowlist name makes room.
    fn remember(&self, qname: &str, addresses: &[(IpAddr, u32)]) {
        let key = qname.trim_end_matches('.').to_string();
        let mut last = self.last_good.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = last.get_mut(&key) {
            merge(known, addresses);
            return;
        }
        if last.len() >= LAST_GOOD_NAMES {
            let allowlist = self.policy.allowlist();
            let evict = last.keys().find(|k| !allowlist.is_exact(k)).cloned();
            match evict {
                Some(k) => {
                    last.remove(&k);
                }
                None => return,
            }
        }
        last.insert(key, addresses.to_vec());
    }

    /// Serve-stale (RFC 8767): the answer for `qname` and `qtype` from its last good addresses,
    /// admitted again, when the upstream cannot answer (`why`). None when the name has no last
    /// good addresses (it fails closed) or when their admission failed (the answer must not be
    /// released). Otherwise counted in `stale`, logged within the upstream lines' budget, and
    /// `edns` (when the client sent EDNS) carries EDE 3, Stale Answer, saying why.
    #[allow(clippy::too_many_arguments)]
    fn serve_stale(
        &self,
        qname: &str,
        qtype: RecordType,
        decided_with: &Arc<crate::config::allowlist::Allowlist>,
        reach: &crate::config::allowlist::Reach,
        why: Stale<'_>,
        edns: &mut Option<Edns>,
    ) -> Option<Vec<Record>> {
        let stale = self.stale_records(qname, qtype)?;
        let (policy, admitter, bindings, stats) = (&self.policy, &self.admitter, &self.bindings, &self.stats);
        let filtered = admit_in_force(policy, admitter, bindings, stats, decided_with, qname, reach, &stale).ok()??;
        self.stats.stale.fetch_add(1, Ordering::Relaxed);
        if let Some(skipped) = self.stats.upstream_log.take(monotonic_second()) {
            tracing::warn!(name = %qname, qtype = %qtype, skipped, "{}; serving the last good addresses", why.log());
        }
        add_ede(edns, EDE_STALE, &format!("cordon: {}; answered from the last good addresses", why.reason()));
        Some(filtered.records)
    }

    /// The last good addresses of `qname` for `qtype`, as records with the stale TTL: None when
    /// the name has no last good addresses at all; empty (a NODATA answer) when it has some,
    /// but not of this type.
    fn stale_records(&self, qname: &str, qtype: RecordType) -> Option<Vec<Record>> {
        let last = self.last_good.lock().unwrap_or_else(|e| e.into_inner());
        let known = last.get(qname.trim_end_matches('.'))?;
        let owner = Name::from_ascii(qname).ok()?;
        let records = known
            .iter()
            .filter_map(|&(ip, _)| match (ip, qtype) {
                (IpAddr::V4(a), RecordType::A) => Some(RData::A(a.into())),
                (IpAddr::V6(a), RecordType::AAAA) => Some(RData::AAAA(a.into())),
                _ => None,
            })
            .map(|data| Record::from_rdata(owner.clone(), STALE_TTL, data))
            .collect();
        Some(records)
    }
}

/// Adds addresses not yet known; a fresh TTL replaces an old one.
fn merge(known: &mut Vec<(IpAddr, u32)>, fresh: &[(IpAddr, u32)]) {
    for &(ip, ttl) in fresh {
        match known.iter_mut().find(|(k, _)| *k == ip) {
            Some(k) => k.1 = ttl,
            None => known.push((ip, ttl)),
        }
    }
}

/// The DNS server's sockets, bound by the caller ([`bind`]; a test binds port 0) and handed to
/// [`serve`].
pub struct Sockets {
    pub tcp: std::net::TcpListener,
    pub udp: std::net::UdpSocket,
}

impl Sockets {
    /// The address they are bound to (the port the kernel chose, for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// Binds TCP and UDP on `addr`, both non-blocking. For port 0, UDP takes the port the kernel
/// gave TCP.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<Sockets> {
    let tcp = std::net::TcpListener::bind(addr)?;
    tcp.set_nonblocking(true)?;
    let udp = std::net::UdpSocket::bind(tcp.local_addr()?)?;
    udp.set_nonblocking(true)?;
    Ok(Sockets { tcp, udp })
}

/// Shares one [`Handler`] between cordon's UDP loops and hickory-server's TCP listener.
struct Shared(Arc<Handler>);

#[async_trait::async_trait]
impl RequestHandler for Shared {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, response_handle: R) -> ResponseInfo {
        self.0.handle_request::<R, T>(request, response_handle).await
    }
}

/// Serves `handler` on `sockets` until `stop` is requested, then shuts down gracefully: UDP in
/// cordon's own loop on a thread of its own (see `udp`), TCP in hickory-server.
pub(crate) async fn serve(sockets: Sockets, handler: Handler, mut stop: crate::service::StopRequest) {
    let handler = Arc::new(handler);
    let mut server = Server::new(Shared(handler.clone()));
    let registered = (|| {
        let udp = StopOnDrop(udp::Stop::new()?);
        let (stop, handler, runtime) = (udp.0.clone(), handler.clone(), tokio::runtime::Handle::current());
        // Named by its port, as `ps -L` and /proc show it: "dns-udp-53".
        let name = format!("dns-udp-{}", sockets.udp.local_addr()?.port());
        std::thread::Builder::new().name(name).spawn(move || udp::serve(sockets.udp, handler, runtime, stop))?;
        server.register_listener(tokio::net::TcpListener::from_std(sockets.tcp)?, Duration::from_secs(5), 64);
        std::io::Result::Ok(udp)
    })();
    let _udp = match registered {
        Ok(udp) => udp,
        Err(e) => {
            tracing::error!("the DNS server cannot use its sockets: {e}");
            return;
        }
    };
    tokio::select! {
        result = server.block_until_done() => {
            if let Err(e) = result {
                tracing::error!("the DNS server stopped: {e}");
            }
        }
        () = stop.requested() => {
            if let Err(e) = server.shutdown_gracefully().await {
                tracing::warn!("the DNS server did not shut down cleanly: {e}");
            }
        }
    }
}

/// Stops the UDP loop when the server ends, however it ends.
struct StopOnDrop(Arc<udp::Stop>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svcb_hints_are_stripped_and_other_params_kept() {
        use hickory_server::proto::rr::rdata::svcb::{Alpn, IpHint, SvcParamValue};
        let s = SVCB::new(
            1,
            Name::from_ascii("svc.example.com.").unwrap(),
            vec![
                (SvcParamKey::Alpn, SvcParamValue::Alpn(Alpn(vec!["h2".into()]))),
                (
                    SvcParamKey::Ipv4Hint,
                    SvcParamValue::Ipv4Hint(IpHint(vec![hickory_server::proto::rr::rdata::A::new(192, 0, 2, 9)])),
                ),
            ],
        );
        let out = without_hints(&s);
        assert_eq!(out.svc_params.len(), 1);
        assert_eq!(out.svc_params[0].0, SvcParamKey::Alpn);
        assert_eq!(out.target_name, s.target_name);
    }

    #[test]
    fn https_records_lose_their_ech_configuration_and_keep_alpn() {
        use hickory_server::proto::rr::rdata::svcb::{Alpn, EchConfigList, SvcParamValue};
        let s = SVCB::new(
            1,
            Name::from_ascii(".").unwrap(),
            vec![
                (SvcParamKey::Alpn, SvcParamValue::Alpn(Alpn(vec!["h2".into()]))),
                (SvcParamKey::EchConfigList, SvcParamValue::EchConfigList(EchConfigList(vec![0, 4, 0xfe, 0x0d, 0, 0]))),
            ],
        );
        let out = without_hints(&s);
        let keys: Vec<SvcParamKey> = out.svc_params.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, [SvcParamKey::Alpn]);
    }

    fn admitter() -> Admitter {
        struct NoSets;
        impl crate::egress::admission::Sets for NoSets {
            fn add(&mut self, _: &str, _: IpAddr, _: u32) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lifetimes =
            crate::egress::admission::Lifetimes { min_ttl: Duration::from_secs(60), grace: Duration::from_secs(300) };
        Admitter::new(Box::new(NoSets), vec![], lifetimes)
    }

    #[test]
    fn an_answer_binds_its_address_to_the_query_name_and_every_name_of_its_cname_chain() {
        use hickory_server::proto::rr::rdata::{A, CNAME};
        let name = |s: &str| Name::from_ascii(s).unwrap();
        let records = vec![
            Record::from_rdata(name("WWW.Example.com."), 30, RData::CNAME(CNAME(name("edge.cdn.example.net.")))),
            Record::from_rdata(name("edge.cdn.example.net."), 30, RData::CNAME(CNAME(name("e1.cdn.example.net.")))),
            Record::from_rdata(name("e1.cdn.example.net."), 30, RData::A(A::new(192, 0, 2, 7))),
        ];
        let bindings = Bindings::new(64);
        let reach = crate::config::allowlist::Reach { default_ports: true, ..Default::default() };
        let out =
            admit_answer(&admitter(), &bindings, &DnsStats::default(), "www.example.com.", &reach, &records).unwrap();
        assert_eq!(out.addresses.len(), 1);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let now = Instant::now();
        for n in ["www.example.com", "edge.cdn.example.net", "e1.cdn.example.net"] {
            assert!(bindings.is_bound(n, ip, now), "{n}");
            assert!(!bindings.is_bound(n, ip, now + Duration::from_secs(361)), "{n}: bound past its admission");
        }
        assert!(bindings.is_bound("www.example.com", ip, now + Duration::from_secs(359)), "max(TTL, min_ttl) + grace");
        assert!(!bindings.is_bound("other.example.com", ip, now));
        assert_eq!(bindings.len(), 3);
        // A repeated answer binds nothing new.
        admit_answer(&admitter(), &bindings, &DnsStats::default(), "www.example.com.", &reach, &records).unwrap();
        assert_eq!(bindings.len(), 3);
    }

    #[test]
    fn a_refused_address_is_bound_to_no_name() {
        use hickory_server::proto::rr::rdata::A;
        let records =
            vec![Record::from_rdata(Name::from_ascii("in.example.com.").unwrap(), 30, RData::A(A::new(10, 0, 0, 1)))];
        let bindings = Bindings::new(64);
        let reach = crate::config::allowlist::Reach { default_ports: true, ..Default::default() };
        let a = admitter();
        let out = admit_answer(&a, &bindings, &DnsStats::default(), "in.example.com.", &reach, &records).unwrap();
        assert!(out.addresses.is_empty());
        assert!(bindings.is_empty());
    }

    #[test]
    fn denials_are_counted_and_bounded() {
        let stats = DnsStats::default();
        assert_eq!(stats.deny("a.test.", RecordType::A), 1);
        assert_eq!(stats.deny("a.test.", RecordType::A), 2);
        for i in 0..(RECENT_DENIALS + 10) {
            stats.deny(&format!("n{i}.test."), RecordType::AAAA);
        }
        assert_eq!(stats.recent_denials().len(), RECENT_DENIALS);
        assert_eq!(stats.denied.load(Ordering::Relaxed), (RECENT_DENIALS + 12) as u64);
    }

    #[test]
    fn denial_lines_are_capped_per_second_and_the_next_line_counts_the_ones_left_out() {
        let budget = LogBudget::default();
        let written = (0..100).filter(|_| budget.take(7).is_some()).count();
        assert_eq!(written as u64, LOG_LINES_PER_SECOND);
        assert_eq!(budget.take(8), Some(100 - LOG_LINES_PER_SECOND), "a new second, a new budget");
        assert_eq!(budget.take(8), Some(0));
    }

    /// Bytes malloc has handed out and not taken back, over all arenas, large (mmap'ed) blocks
    /// included.
    fn allocated() -> usize {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        let info = unsafe { libc::mallinfo2() };
        info.uordblks + info.hblkhd
    }

    /// Where the supervisor's heap goes with the bench's load (1,000 allowlist entries, 10,000
    /// admitted names with one address each, 200,000 unique denials), component by component.
    /// Measured, not asserted: `cargo test --release --lib egress::dns::tests::heap_by_component
    /// -- --ignored --nocapture` (alone: other tests would allocate meanwhile).
    #[test]
    #[ignore]
    fn heap_by_component() {
        use hickory_server::proto::rr::rdata::AAAA;
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        let mut report = Vec::new();
        let mut mark = allocated();
        let step = |what: &str, report: &mut Vec<String>, mark: &mut usize| {
            let now = allocated();
            report.push(format!("{what}: {:.2} MiB", mib(now.saturating_sub(*mark))));
            *mark = now;
        };
        let text: String =
            (0..999).map(|i| format!("a{i}.allowed.test\n")).chain(["*.bench.test\n".to_string()]).collect();
        let list = Arc::new(crate::config::allowlist::Allowlist::new(
            crate::config::allowlist::parse_file(&text, std::path::Path::new("domains.conf")).unwrap(),
        ));
        step("allowlist, 1,000 entries", &mut report, &mut mark);
        let admitter = admitter();
        let reach = crate::config::allowlist::Reach { default_ports: true, ..Default::default() };
        let names: Vec<String> = (1..=10_000).map(|i| format!("n{i}.bench.test.")).collect();
        let ips: Vec<IpAddr> = (1..=10_000u16).map(|i| IpAddr::V6([0x2001, 0xdb8, 1, 0, 0, 0, 0, i].into())).collect();
        mark = allocated();
        for (name, &ip) in names.iter().zip(&ips) {
            admitter.admit(name, ip, 3600, &reach).unwrap();
        }
        step("admission table, 10,000 addresses", &mut report, &mut mark);
        let bindings = Bindings::new(crate::egress::namebound::bindings::DEFAULT_CAPACITY);
        let now = Instant::now();
        for (name, &ip) in names.iter().zip(&ips) {
            bindings.bind(name.trim_end_matches('.'), ip, now + Duration::from_secs(3900), now);
        }
        step("name bindings, 10,000 names", &mut report, &mut mark);
        let cache = AnswerCache::new(cache::DEFAULT_CAPACITY);
        for (name, &ip) in names.iter().zip(&ips) {
            let owner = Name::from_ascii(name).unwrap();
            let mut m = hickory_server::proto::op::Message::response(1, OpCode::Query);
            m.add_query(hickory_server::proto::op::Query::query(owner.clone(), RecordType::AAAA));
            m.add_answer(Record::from_rdata(
                owner,
                3600,
                RData::AAAA(AAAA(match ip {
                    IpAddr::V6(a) => a,
                    IpAddr::V4(_) => unreachable!(),
                })),
            ));
            m.set_edns(Edns::new());
            let bytes = m.to_vec().unwrap();
            cache.store(name, 28, true, &bytes, &list, now + Duration::from_secs(3600), now);
        }
        step(&format!("answer cache, {} entries kept", cache.len()), &mut report, &mut mark);
        let last_good: BTreeMap<String, Vec<(IpAddr, u32)>> = names
            .iter()
            .zip(&ips)
            .take(LAST_GOOD_NAMES)
            .map(|(n, &ip)| (n.trim_end_matches('.').into(), vec![(ip, 3600)]))
            .collect();
        step(&format!("last good addresses, {} names", last_good.len()), &mut report, &mut mark);
        let stats = DnsStats::default();
        for i in 0..200_000 {
            stats.deny(&format!("f{i}.flood.test."), RecordType::A);
        }
        step("recent denials after 200,000 unique names", &mut report, &mut mark);
        println!("{}", report.join("\n"));
        drop((list, admitter, bindings, cache, last_good, stats));
    }

    #[test]
    fn merge_keeps_known_addresses_and_renews_ttls() {
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let mut known = vec![(a, 10)];
        merge(&mut known, &[(a, 50), (b, 60)]);
        assert_eq!(known, [(a, 50), (b, 60)]);
    }
}
