//! The DNS wire format as the UDP fast path needs it: a query read in place (no allocation), the
//! denial written from a template, and the offsets of an encoded response's TTLs. Anything
//! unusual (compression in the question, several questions, an additional record that is not
//! OPT, an EDNS version other than 0, a class other than IN, bytes after the message, a name with
//! characters outside letters, digits, `-` and `_`) is not read here: the caller hands the packet
//! to the hickory path, which answers it as before.

/// The OPT pseudo-record's type (RFC 6891).
pub(crate) const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// RFC 8914 §4.16: "Blocked" — the resolver blocked the name by policy.
pub(crate) const EDE_BLOCKED: u16 = 15;
/// The EDNS option code of Extended DNS Errors (RFC 8914 §2).
pub(crate) const EDNS_EDE: u16 = 15;
pub(crate) const EDE_TEXT: &str = "blocked by cordon: not in the egress allowlist";
/// The largest name in text form: 255 wire bytes make at most 254 characters plus the root dot.
pub(crate) const NAME_TEXT_MAX: usize = 256;

/// A query read in place from a UDP packet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Query<'a> {
    pub id: u16,
    /// The flags byte with RD (byte 2) and CD (byte 3), copied into the response as hickory does.
    pub rd: bool,
    pub cd: bool,
    /// The question section exactly as sent: name, type, class.
    pub question: &'a [u8],
    pub qtype: u16,
    /// The client's EDNS UDP payload size when the query carried an OPT record.
    pub edns_payload: Option<u16>,
}

impl Query<'_> {
    /// The largest UDP response the client accepts: its EDNS payload size (never below 512),
    /// or 512 without EDNS (RFC 1035 §4.2.1, RFC 6891 §6.2.3).
    pub(crate) fn udp_limit(&self) -> usize {
        usize::from(self.edns_payload.map_or(512, |p| p.max(512)))
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Reads a standard query with one IN question, and writes its name in text form (lowercase,
/// dots between labels and one at the end, as `Name::to_ascii` writes it for the hickory path)
/// into `text`; returns the query and the text's length. None: not a query this path answers.
pub(crate) fn parse_query<'a>(packet: &'a [u8], text: &mut [u8; NAME_TEXT_MAX]) -> Option<(Query<'a>, usize)> {
    if packet.len() < 12 {
        return None;
    }
    let (flags, flags2) = (packet[2], packet[3]);
    // QR = 0 (a query), opcode 0 (QUERY); the other header bits are copied or ignored.
    if flags & 0x80 != 0 || (flags >> 3) & 0x0f != 0 {
        return None;
    }
    let (qd, an, ns, ar) = (u16_at(packet, 4)?, u16_at(packet, 6)?, u16_at(packet, 8)?, u16_at(packet, 10)?);
    if qd != 1 || an != 0 || ns != 0 || ar > 1 {
        return None;
    }
    let mut at = 12;
    let mut len = 0;
    loop {
        let label = usize::from(*packet.get(at)?);
        at += 1;
        if label == 0 {
            break;
        }
        // Compression pointers (0xc0) and extended labels are left to hickory.
        if label > 63 || at + label > packet.len() || len + label + 1 > NAME_TEXT_MAX {
            return None;
        }
        for &b in &packet[at..at + label] {
            if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return None;
            }
            text[len] = b.to_ascii_lowercase();
            len += 1;
        }
        text[len] = b'.';
        len += 1;
        at += label;
    }
    if len == 0 || at - 12 > 255 {
        return None;
    }
    let qtype = u16_at(packet, at)?;
    if u16_at(packet, at + 2)? != CLASS_IN || qtype == TYPE_OPT {
        return None;
    }
    let question = &packet[12..at + 4];
    at += 4;
    let mut edns_payload = None;
    if ar == 1 {
        // The OPT record: root owner, type 41, class = payload size, TTL = extended rcode,
        // version, flags; then its options, which this path does not need.
        if *packet.get(at)? != 0 || u16_at(packet, at + 1)? != TYPE_OPT || *packet.get(at + 6)? != 0 {
            return None;
        }
        edns_payload = Some(u16_at(packet, at + 3)?);
        let rdlen = usize::from(u16_at(packet, at + 9)?);
        at += 11 + rdlen;
    }
    if at != packet.len() {
        return None;
    }
    let query = Query {
        id: u16::from_be_bytes([packet[0], packet[1]]),
        rd: flags & 0x01 != 0,
        cd: flags2 & 0x10 != 0,
        question,
        qtype,
        edns_payload,
    };
    Some((query, len))
}

/// Writes the header of a response to `q` with `rcode` and the given counts.
fn write_header(q: &Query<'_>, rcode: u8, counts: [u16; 4], out: &mut [u8]) {
    out[..2].copy_from_slice(&q.id.to_be_bytes());
    out[2] = 0x80 | u8::from(q.rd);
    out[3] = 0x80 | if q.cd { 0x10 } else { 0 } | rcode;
    for (i, c) in counts.iter().enumerate() {
        out[4 + 2 * i..6 + 2 * i].copy_from_slice(&c.to_be_bytes());
    }
}

/// The OPT record of a denial after its payload size: extended rcode, version and flags 0, and
/// one option, the Extended DNS Error "Blocked" with its text.
const DENIAL_OPT_TAIL: [u8; 4 + 2 + 4 + 2 + EDE_TEXT.len()] = {
    let mut t = [0u8; 4 + 2 + 4 + 2 + EDE_TEXT.len()];
    let rdlen = (4 + 2 + EDE_TEXT.len()) as u16;
    let optlen = (2 + EDE_TEXT.len()) as u16;
    t[4] = (rdlen >> 8) as u8;
    t[5] = rdlen as u8;
    t[6] = (EDNS_EDE >> 8) as u8;
    t[7] = EDNS_EDE as u8;
    t[8] = (optlen >> 8) as u8;
    t[9] = optlen as u8;
    t[10] = (EDE_BLOCKED >> 8) as u8;
    t[11] = EDE_BLOCKED as u8;
    let text = EDE_TEXT.as_bytes();
    let mut i = 0;
    while i < text.len() {
        t[12 + i] = text[i];
        i += 1;
    }
    t
};

/// The largest denial: header, a 255-byte name's question, the OPT record.
pub(crate) const DENIAL_MAX: usize = 12 + 255 + 4 + 3 + 2 + DENIAL_OPT_TAIL.len();

/// Writes the denial of `q` into `out` (at least [`DENIAL_MAX`] bytes): NXDOMAIN, the question
/// copied, and when the query had EDNS the OPT record with the Extended DNS Error "Blocked".
/// The same bytes as the hickory path's denial; returns their length.
pub(crate) fn write_denial(q: &Query<'_>, out: &mut [u8]) -> usize {
    const NXDOMAIN: u8 = 3;
    write_header(q, NXDOMAIN, [1, 0, 0, u16::from(q.edns_payload.is_some())], out);
    let mut at = 12;
    out[at..at + q.question.len()].copy_from_slice(q.question);
    at += q.question.len();
    if let Some(payload) = q.edns_payload {
        out[at] = 0;
        out[at + 1..at + 3].copy_from_slice(&TYPE_OPT.to_be_bytes());
        out[at + 3..at + 5].copy_from_slice(&payload.max(512).to_be_bytes());
        at += 5;
        out[at..at + DENIAL_OPT_TAIL.len()].copy_from_slice(&DENIAL_OPT_TAIL);
        at += DENIAL_OPT_TAIL.len();
    }
    at
}

/// Where a response's patchable fields are: the end of its question, the offset of every TTL
/// (answer, authority and additional records, not OPT), with its value, and the offset of the
/// OPT record's payload size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    pub question_end: usize,
    pub ttls: Vec<(u16, u32)>,
    pub opt_payload: Option<u16>,
}

fn skip_name(b: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *b.get(at)?;
        match len {
            0 => return Some(at + 1),
            l if l & 0xc0 == 0xc0 => return Some(at + 2),
            l if l <= 63 => at += 1 + usize::from(l),
            _ => return None,
        }
    }
}

/// The layout of an encoded response with one question; None when it does not parse or is
/// longer than 65,535 bytes.
pub(crate) fn layout(b: &[u8]) -> Option<Layout> {
    if b.len() > usize::from(u16::MAX) || u16_at(b, 4)? != 1 {
        return None;
    }
    let records = usize::from(u16_at(b, 6)?) + usize::from(u16_at(b, 8)?) + usize::from(u16_at(b, 10)?);
    let question_end = skip_name(b, 12)? + 4;
    let mut at = question_end;
    let mut out = Layout { question_end, ttls: Vec::with_capacity(records), opt_payload: None };
    for _ in 0..records {
        at = skip_name(b, at)?;
        let rtype = u16_at(b, at)?;
        if rtype == TYPE_OPT {
            out.opt_payload = Some(at as u16 + 2);
        } else {
            let ttl = u32::from_be_bytes(b.get(at + 4..at + 8)?.try_into().ok()?);
            out.ttls.push((at as u16 + 4, ttl));
        }
        at += 10 + usize::from(u16_at(b, at + 8)?);
    }
    (at == b.len()).then_some(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A query as dig sends it: `id`, RD, one question, and an OPT record when `edns`.
    pub(crate) fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
        for label in name.trim_end_matches('.').split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        if let Some(p) = edns {
            q.extend_from_slice(&[0, 0, 41]);
            q.extend_from_slice(&p.to_be_bytes());
            q.extend_from_slice(&[0, 0, 0x80, 0, 0, 0]);
        }
        q
    }

    #[test]
    fn a_query_is_read_in_place_with_its_name_lowercased() {
        let packet = query(0xbeef, "WWW.Example.com", 28, Some(1232));
        let mut text = [0u8; NAME_TEXT_MAX];
        let (q, len) = parse_query(&packet, &mut text).unwrap();
        assert_eq!(&text[..len], b"www.example.com.");
        assert_eq!((q.id, q.qtype, q.edns_payload, q.rd, q.cd), (0xbeef, 28, Some(1232), true, false));
        assert_eq!(q.question, &packet[12..packet.len() - 11]);
        assert_eq!(q.udp_limit(), 1232);
    }

    #[test]
    fn unusual_queries_are_left_to_the_full_path() {
        let mut text = [0u8; NAME_TEXT_MAX];
        let mut response = query(1, "a.test", 1, None);
        response[2] |= 0x80;
        let mut trailing = query(1, "a.test", 1, None);
        trailing.push(0);
        let mut version1 = query(1, "a.test", 1, Some(1232));
        let v = version1.len() - 5;
        version1[v] = 1;
        let mut chaos = query(1, "a.test", 1, None);
        let c = chaos.len() - 1;
        chaos[c] = 3;
        for (why, p) in [
            ("a response", response),
            ("bytes after the message", trailing),
            ("EDNS version 1", version1),
            ("class CHAOS", chaos),
            ("a dot inside a label", query(1, "a\\.b", 1, None)),
            ("the root name", vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1]),
            ("a short packet", vec![0; 11]),
        ] {
            assert!(parse_query(&p, &mut text).is_none(), "{why}");
        }
    }

    /// The template's denial is byte for byte what the hickory path encodes for the same query.
    #[test]
    fn the_denial_template_matches_hickorys_encoding_with_and_without_edns() {
        use hickory_server::proto::op::{Edns, Message, Metadata, ResponseCode};
        use hickory_server::proto::rr::rdata::opt::EdnsOption;
        use hickory_server::proto::serialize::binary::{BinDecodable, BinDecoder};
        for edns in [None, Some(4096), Some(100)] {
            let packet = query(0x1234, "X1.Denied.test", 1, edns);
            let mut text = [0u8; NAME_TEXT_MAX];
            let (q, _) = parse_query(&packet, &mut text).unwrap();
            let mut out = [0u8; DENIAL_MAX];
            let len = write_denial(&q, &mut out);

            let request = Message::from_vec(&packet).unwrap();
            let mut md = Metadata::response_from_request(&request.metadata);
            md.recursion_available = true;
            md.response_code = ResponseCode::NXDomain;
            let mut expected = Message::response(0, hickory_server::proto::op::OpCode::Query);
            expected.metadata = md;
            expected.add_queries(request.queries.clone());
            if let Some(req) = &request.edns {
                let mut e = Edns::new();
                e.set_max_payload(req.max_payload().max(512));
                let mut data = EDE_BLOCKED.to_be_bytes().to_vec();
                data.extend_from_slice(EDE_TEXT.as_bytes());
                e.options_mut().insert(EdnsOption::Unknown(EDNS_EDE, data));
                expected.set_edns(e);
            }
            assert_eq!(&out[..len], expected.to_vec().unwrap(), "edns {edns:?}");
            let mut d = BinDecoder::new(&out[..len]);
            assert!(Message::read(&mut d).is_ok());
        }
    }

    #[test]
    fn a_layout_finds_every_ttl_and_the_opt_payload() {
        use hickory_server::proto::op::{Edns, Message, Query as Q};
        use hickory_server::proto::rr::rdata::{A, CNAME};
        use hickory_server::proto::rr::{Name, RData, Record, RecordType};
        let n = |s: &str| Name::from_ascii(s).unwrap();
        let mut m = Message::response(7, hickory_server::proto::op::OpCode::Query);
        m.add_query(Q::query(n("www.example.com."), RecordType::A));
        m.add_answer(Record::from_rdata(n("www.example.com."), 300, RData::CNAME(CNAME(n("e.example.net.")))));
        m.add_answer(Record::from_rdata(n("e.example.net."), 60, RData::A(A::new(192, 0, 2, 7))));
        m.set_edns(Edns::new());
        let bytes = m.to_vec().unwrap();
        let l = layout(&bytes).unwrap();
        let ttls: Vec<u32> = l.ttls.iter().map(|&(_, t)| t).collect();
        assert_eq!(ttls, [300, 60]);
        for &(at, t) in &l.ttls {
            assert_eq!(u32::from_be_bytes(bytes[usize::from(at)..usize::from(at) + 4].try_into().unwrap()), t);
        }
        let p = usize::from(l.opt_payload.unwrap());
        assert_eq!(u16::from_be_bytes([bytes[p], bytes[p + 1]]), Edns::new().max_payload());
        assert!(layout(&bytes[..bytes.len() - 1]).is_none());
    }
}
