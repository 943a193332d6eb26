//! cordon's answer cache: the encoded response of an allowed answer, after admission, rebinding
//! filter and SVCB/HTTPS rewriting, keyed by (lowercase name, type, EDNS or not). A hit copies it,
//! patches the id, the RD/CD flags, the question (the client's own spelling) and the OPT payload
//! size, and decrements every TTL by the entry's age: no parsing, no encoding, no resolver.
//!
//! An entry is used only while
//! - every TTL is still above zero (it expires with the shortest one),
//! - the allowlist it was admitted under is still the one in force (a reload, `allow` or `deny`
//!   makes every entry a miss, and the full path decides and admits again),
//! - its addresses' admission is not due (the full path re-admits them),
//! - and it fits the client's UDP limit (else the full path answers, truncating with TC).
//!
//! Sharded by the key's hash, each shard under its own lock held only to look up and copy, never
//! across I/O. Bounded: a full shard evicts its oldest entry (FIFO, O(1)).

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::wire::{Layout, Query};
use crate::config::allowlist::Allowlist;

const SHARDS: usize = 16;
/// Entries across all shards: more (name, type) pairs than an agent resolves within their TTLs;
/// about 300 bytes each for a typical answer (1,024 held 0.4 MiB more in the DNS bench).
pub(crate) const DEFAULT_CAPACITY: usize = 512;
/// Responses larger than this are not cached (the fast path copies into a buffer this size).
pub(crate) const MAX_RESPONSE: usize = 4096;

struct Entry {
    name: Box<str>,
    qtype: u16,
    edns: bool,
    bytes: Box<[u8]>,
    question_len: u16,
    ttls: Box<[(u16, u32)]>,
    opt_payload: Option<u16>,
    stored: Instant,
    expires: Instant,
    admission_due: Instant,
    allowlist: Weak<Allowlist>,
}

#[derive(Default)]
struct Shard {
    map: HashMap<u64, Entry>,
    /// Insertion order, for eviction; keys already gone are skipped.
    order: VecDeque<u64>,
}

pub(crate) struct AnswerCache {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
}

/// What a lookup found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Hit {
    /// The response, of this length, is in the caller's buffer.
    Answer(usize),
    /// Nothing usable: the full path answers (and may store a fresh entry).
    Miss,
}

impl AnswerCache {
    pub(crate) fn new(capacity: usize) -> AnswerCache {
        AnswerCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            hasher: Default::default(),
        }
    }

    fn key(&self, name: &str, qtype: u16, edns: bool) -> u64 {
        self.hasher.hash_one((name, qtype, edns))
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[(key as usize) % SHARDS].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `response` (encoded for a query of `name`, lowercase text form, and `qtype`, with
    /// or without EDNS), answered under `allowlist`, its addresses admitted until at least
    /// `admission_due`. Not stored: a response that does not parse, has no record, a TTL of 0,
    /// or is too large.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn store(
        &self,
        name: &str,
        qtype: u16,
        edns: bool,
        response: &[u8],
        allowlist: &Arc<Allowlist>,
        admission_due: Instant,
        now: Instant,
    ) {
        if response.len() > MAX_RESPONSE {
            return;
        }
        let Some(Layout { question_end, ttls, opt_payload }) = super::wire::layout(response) else {
            return;
        };
        let Some(shortest) = ttls.iter().map(|&(_, t)| t).min() else {
            return;
        };
        if shortest == 0 || opt_payload.is_some() != edns {
            return;
        }
        let key = self.key(name, qtype, edns);
        let entry = Entry {
            name: name.into(),
            qtype,
            edns,
            bytes: response.into(),
            question_len: (question_end - 12) as u16,
            ttls: ttls.into(),
            opt_payload,
            stored: now,
            expires: now + Duration::from_secs(u64::from(shortest)),
            admission_due,
            allowlist: Arc::downgrade(allowlist),
        };
        let mut shard = self.shard(key);
        if shard.map.insert(key, entry).is_none() {
            shard.order.push_back(key);
            while shard.map.len() > self.per_shard || shard.order.len() > 2 * self.per_shard {
                let Some(old) = shard.order.pop_front() else { break };
                if old != key {
                    shard.map.remove(&old);
                }
            }
        }
    }

    /// Answers `q` (whose name in text form is `name`) from the cache into `out` at `now`, when
    /// an entry for it is usable under `allowlist`.
    pub(crate) fn answer(
        &self,
        q: &Query<'_>,
        name: &str,
        allowlist: &Arc<Allowlist>,
        now: Instant,
        out: &mut [u8],
    ) -> Hit {
        let edns = q.edns_payload.is_some();
        let key = self.key(name, q.qtype, edns);
        let mut shard = self.shard(key);
        let Some(e) = shard.map.get(&key) else { return Hit::Miss };
        if &*e.name != name || e.qtype != q.qtype || e.edns != edns {
            return Hit::Miss;
        }
        if now >= e.expires || e.allowlist.as_ptr() != Arc::as_ptr(allowlist) {
            shard.map.remove(&key);
            return Hit::Miss;
        }
        if now >= e.admission_due
            || usize::from(e.question_len) != q.question.len()
            || e.bytes.len() > q.udp_limit()
            || e.bytes.len() > out.len()
        {
            return Hit::Miss;
        }
        let len = e.bytes.len();
        out[..len].copy_from_slice(&e.bytes);
        let age = u32::try_from(now.duration_since(e.stored).as_secs()).unwrap_or(u32::MAX);
        for &(at, ttl) in e.ttls.iter() {
            let at = usize::from(at);
            out[at..at + 4].copy_from_slice(&ttl.saturating_sub(age).to_be_bytes());
        }
        if let (Some(at), Some(payload)) = (e.opt_payload, q.edns_payload) {
            let at = usize::from(at);
            out[at..at + 2].copy_from_slice(&payload.max(512).to_be_bytes());
        }
        drop(shard);
        out[..2].copy_from_slice(&q.id.to_be_bytes());
        out[2] = (out[2] & !0x01) | u8::from(q.rd);
        out[3] = (out[3] & !0x10) | if q.cd { 0x10 } else { 0 };
        out[12..12 + q.question.len()].copy_from_slice(q.question);
        Hit::Answer(len)
    }

    /// Entries held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).map.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::{NAME_TEXT_MAX, parse_query};
    use super::*;
    use hickory_server::proto::op::{Edns, Message, OpCode, Query as Q};
    use hickory_server::proto::rr::rdata::{A, CNAME};
    use hickory_server::proto::rr::{Name, RData, Record, RecordType};

    fn allowlist() -> Arc<Allowlist> {
        Arc::new(Allowlist::new(
            crate::config::allowlist::parse_file("www.example.com\n", std::path::Path::new("t")).unwrap(),
        ))
    }

    /// The full path's response to `www.example.com A`: a CNAME (TTL 300) to an A (TTL 60),
    /// `extra` more A records, EDNS when `edns`.
    fn response(edns: bool, extra: usize) -> Vec<u8> {
        let n = |s: &str| Name::from_ascii(s).unwrap();
        let mut m = Message::response(1, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.metadata.recursion_available = true;
        m.add_query(Q::query(n("www.example.com."), RecordType::A));
        m.add_answer(Record::from_rdata(n("www.example.com."), 300, RData::CNAME(CNAME(n("e.example.net.")))));
        m.add_answer(Record::from_rdata(n("e.example.net."), 60, RData::A(A::new(192, 0, 2, 7))));
        for i in 0..extra {
            m.add_answer(Record::from_rdata(n("e.example.net."), 60, RData::A(A::new(198, 51, 100, i as u8))));
        }
        if edns {
            m.set_edns(Edns::new());
        }
        m.to_vec().unwrap()
    }

    fn query(id: u16, name: &str, edns: Option<u16>) -> Vec<u8> {
        super::super::wire::tests::query(id, name, 1, edns)
    }

    fn ask(cache: &AnswerCache, packet: &[u8], list: &Arc<Allowlist>, now: Instant) -> Option<Message> {
        let mut text = [0u8; NAME_TEXT_MAX];
        let (q, len) = parse_query(packet, &mut text).unwrap();
        let name = std::str::from_utf8(&text[..len]).unwrap();
        let mut out = [0u8; MAX_RESPONSE];
        match cache.answer(&q, name, list, now, &mut out) {
            Hit::Answer(n) => Some(Message::from_vec(&out[..n]).unwrap()),
            Hit::Miss => None,
        }
    }

    #[test]
    fn a_hit_carries_the_clients_id_and_spelling_and_ttls_decremented_by_age() {
        let cache = AnswerCache::new(64);
        let list = allowlist();
        let t0 = Instant::now();
        cache.store("www.example.com.", 1, false, &response(false, 0), &list, t0 + Duration::from_secs(600), t0);
        let m =
            ask(&cache, &query(0xabcd, "WWW.example.COM", None), &list, t0 + Duration::from_millis(10_500)).unwrap();
        assert_eq!(m.metadata.id, 0xabcd);
        assert!(m.metadata.recursion_desired && m.metadata.recursion_available);
        assert_eq!(m.queries[0].name().to_ascii(), "WWW.example.COM.");
        let ttls: Vec<u32> = m.answers.iter().map(|r| r.ttl).collect();
        assert_eq!(ttls, [290, 50], "10 whole seconds old");
        assert!(m.edns.is_none(), "a query without EDNS gets no OPT record");
    }

    #[test]
    fn an_entry_expires_with_its_shortest_ttl() {
        let cache = AnswerCache::new(64);
        let list = allowlist();
        let t0 = Instant::now();
        cache.store("www.example.com.", 1, false, &response(false, 0), &list, t0 + Duration::from_secs(600), t0);
        assert!(ask(&cache, &query(1, "www.example.com", None), &list, t0 + Duration::from_secs(59)).is_some());
        assert!(ask(&cache, &query(1, "www.example.com", None), &list, t0 + Duration::from_secs(60)).is_none());
        assert_eq!(cache.len(), 0, "an expired entry is dropped when met");
    }

    #[test]
    fn a_hit_is_refused_once_the_admission_is_due_so_the_full_path_re_admits() {
        let cache = AnswerCache::new(64);
        let list = allowlist();
        let t0 = Instant::now();
        cache.store("www.example.com.", 1, false, &response(false, 0), &list, t0 + Duration::from_secs(30), t0);
        assert!(ask(&cache, &query(1, "www.example.com", None), &list, t0 + Duration::from_secs(29)).is_some());
        assert!(ask(&cache, &query(1, "www.example.com", None), &list, t0 + Duration::from_secs(30)).is_none());
        // The full path's fresh answer replaces it.
        let t1 = t0 + Duration::from_secs(30);
        cache.store("www.example.com.", 1, false, &response(false, 0), &list, t1 + Duration::from_secs(600), t1);
        assert!(ask(&cache, &query(1, "www.example.com", None), &list, t1).is_some());
    }

    #[test]
    fn another_allowlist_in_force_makes_every_entry_a_miss() {
        let cache = AnswerCache::new(64);
        let list = allowlist();
        let t0 = Instant::now();
        cache.store("www.example.com.", 1, false, &response(false, 0), &list, t0 + Duration::from_secs(600), t0);
        assert!(ask(&cache, &query(1, "www.example.com", None), &allowlist(), t0).is_none());
    }

    #[test]
    fn edns_and_plain_queries_have_their_own_entries_and_the_opt_payload_is_the_clients() {
        let cache = AnswerCache::new(64);
        let list = allowlist();
        let t0 = Instant::now();
        cache.store("www.example.com.", 1, true, &response(true, 0), &list, t0 + Duration::from_secs(600), t0);
        assert!(ask(&cache, &query(1, "www.example.com", None), &list, t0).is_none(), "no OPT for a plain query");
        let m = ask(&cache, &query(1, "www.example.com", Some(1400)), &list, t0).unwrap();
        assert_eq!(m.edns.unwrap().max_payload(), 1400);
        let m = ask(&cache, &query(1, "www.example.com", Some(100)), &list, t0).unwrap();
        assert_eq!(m.edns.unwrap().max_payload(), 512);
    }

    #[test]
    fn a_response_larger_than_the_clients_udp_limit_is_left_to_the_full_path_which_truncates() {
        let cache = AnswerCache::new(64);
        let list = allowlist();
        let t0 = Instant::now();
        let big = response(true, 40); // 40 more A records: about 700 bytes
        assert!(big.len() > 512);
        cache.store("www.example.com.", 1, true, &big, &list, t0 + Duration::from_secs(600), t0);
        assert!(ask(&cache, &query(1, "www.example.com", Some(512)), &list, t0).is_none());
        let m = ask(&cache, &query(1, "www.example.com", Some(1232)), &list, t0).unwrap();
        assert_eq!(m.answers.len(), 42);
        assert!(!m.metadata.truncation);
    }

    #[test]
    fn the_cache_is_bounded() {
        let cache = AnswerCache::new(32);
        let list = allowlist();
        let t0 = Instant::now();
        for i in 0..1000 {
            cache.store(&format!("n{i}.example.com."), 1, false, &response(false, 0), &list, t0, t0);
        }
        assert!(cache.len() <= 32, "{}", cache.len());
        for s in cache.shards.iter() {
            assert!(s.lock().unwrap().order.len() <= 2 * 2);
        }
    }
}
