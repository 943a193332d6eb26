//! Following a client's HTTP/1.x request stream on an inspected plain-HTTP port, so that every
//! request head, not only the first on a keep-alive connection, is judged by its host.
//!
//! The caller owns the buffer of bytes received from the client and not yet passed on, and calls
//! [`RequestTracker::next`] on it. Each answer consumes a prefix of it: a [`Step::Request`] head
//! to judge before it goes upstream, [`Step::Forward`] body bytes to pass on as they are, or
//! [`Step::NeedMore`]; [`Step::Invalid`] ends the connection. Request framing depends only on the
//! request's own headers (RFC 9112 6.3), so the tracker never needs the server's responses.
//!
//! Decisions, each refused with a reason rather than guessed at:
//! - The effective host is the `Host` header; exactly one is required (RFC 9112 3.2 makes it
//!   mandatory in HTTP/1.1; cordon requires it of HTTP/1.0 too). With an absolute-form target
//!   (`GET http://name/ HTTP/1.1`) the server must use the target's authority (RFC 9112 3.2.2),
//!   so it must name the same host as the `Host` header or the request is refused: whatever a
//!   server or an intermediary goes by, it is the judged name.
//! - Hosts are compared without their port (`name:80` is `name`); IP literals are not names.
//! - CONNECT, the HTTP/2 prior-knowledge preface, and any request carrying `Upgrade` are
//!   refused: after a `101 Switching Protocols` the stream is no longer HTTP/1.x and its later
//!   bytes could not be judged, and telling a granted upgrade from a declined one needs the
//!   response. WebSocket over TLS (`wss://`, port 443) is unaffected: TLS is judged once.
//! - Request smuggling shapes: `Content-Length` with `Transfer-Encoding`, two of either, a
//!   `Transfer-Encoding` other than exactly `chunked`, a non-numeric length, a bare LF line end
//!   in a head or trailer, a chunk size line that is not hex then CRLF. Whatever a lenient
//!   server might read differently is refused here.
//! - A head or trailer section is bounded ([`DEFAULT_MAX_HEAD_BYTES`]); a chunk size line is
//!   bounded by [`MAX_CHUNK_LINE`].

use super::hello::canonical_name;

/// The default bound on one request head (request line and headers) or trailer section.
pub const DEFAULT_MAX_HEAD_BYTES: usize = 64 * 1024;
/// A chunk size line with extensions; real ones are a few bytes.
pub const MAX_CHUNK_LINE: usize = 4096;
/// More header fields than any real client sends; httparse needs a fixed slot array.
const MAX_HEADERS: usize = 128;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// What the tracker makes of the start of the caller's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing can be decided on these bytes yet: append more and call again.
    NeedMore,
    /// The first `n` bytes are message body (or chunk framing): pass them on unchanged.
    Forward(usize),
    /// The first `len` bytes are a whole request head for `host`: judge it, then pass them on.
    Request { host: String, len: usize },
    /// The stream is not HTTP/1.x cordon can follow: refuse the connection.
    Invalid(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers,
}

/// Where the client's request stream is: in a head, a body, or a chunk.
#[derive(Debug)]
pub struct RequestTracker {
    state: State,
    max_head: usize,
}

impl RequestTracker {
    pub fn new(max_head: usize) -> Self {
        RequestTracker { state: State::Head, max_head }
    }

    /// The next step for `buf`, the client's bytes not yet consumed. The caller drops the bytes
    /// a `Forward` or `Request` covers from the front of its buffer before calling again.
    pub fn next(&mut self, buf: &[u8]) -> Step {
        if buf.is_empty() {
            return Step::NeedMore;
        }
        match self.state {
            State::Head => self.head(buf),
            State::Body(remaining) => {
                let n = remaining.min(buf.len() as u64);
                self.state = if n == remaining { State::Head } else { State::Body(remaining - n) };
                Step::Forward(n as usize)
            }
            State::ChunkSize => self.chunk_size(buf),
            State::ChunkData(remaining) => {
                let n = remaining.min(buf.len() as u64);
                self.state = if n == remaining { State::ChunkDataEnd } else { State::ChunkData(remaining - n) };
                Step::Forward(n as usize)
            }
            State::ChunkDataEnd => match buf {
                [b'\r'] => Step::NeedMore,
                [b'\r', b'\n', ..] => {
                    self.state = State::ChunkSize;
                    Step::Forward(2)
                }
                _ => Step::Invalid("chunk data not followed by CRLF"),
            },
            State::Trailers => self.trailers(buf),
        }
    }

    fn head(&mut self, buf: &[u8]) -> Step {
        if buf.starts_with(H2_PREFACE) {
            return Step::Invalid("HTTP/2 prior-knowledge preface");
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let len = match request.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return self.partial(buf, "request head over the bound"),
            Err(httparse::Error::TooManyHeaders) => return Step::Invalid("too many header fields"),
            Err(_) => return Step::Invalid("malformed request head"),
        };
        if len > self.max_head {
            return Step::Invalid("request head over the bound");
        }
        if has_bare_lf(&buf[..len]) {
            return Step::Invalid("bare LF in request head");
        }
        let head = match RequestHead::read(&request) {
            Ok(head) => head,
            Err(reason) => return Step::Invalid(reason),
        };
        self.state = match head.body {
            Body::None => State::Head,
            Body::Length(n) => State::Body(n),
            Body::Chunked => State::ChunkSize,
        };
        Step::Request { host: head.host, len }
    }

    fn chunk_size(&mut self, buf: &[u8]) -> Step {
        // httparse reads an empty or blank size line as 0 (the last chunk); servers refuse it.
        if !buf[0].is_ascii_hexdigit() {
            return Step::Invalid("malformed chunk size line");
        }
        match httparse::parse_chunk_size(buf) {
            Ok(httparse::Status::Complete((len, size))) => {
                if has_bare_lf(&buf[..len]) {
                    return Step::Invalid("malformed chunk size line");
                }
                self.state = if size == 0 { State::Trailers } else { State::ChunkData(size) };
                Step::Forward(len)
            }
            Ok(httparse::Status::Partial) if buf.len() > MAX_CHUNK_LINE => {
                Step::Invalid("chunk size line over the bound")
            }
            Ok(httparse::Status::Partial) => Step::NeedMore,
            Err(_) => Step::Invalid("malformed chunk size line"),
        }
    }

    fn trailers(&mut self, buf: &[u8]) -> Step {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match httparse::parse_headers(buf, &mut headers) {
            Ok(httparse::Status::Complete((len, _))) if len > self.max_head => {
                Step::Invalid("trailer section over the bound")
            }
            Ok(httparse::Status::Complete((len, _))) if has_bare_lf(&buf[..len]) => {
                Step::Invalid("bare LF in trailer section")
            }
            Ok(httparse::Status::Complete((len, _))) => {
                self.state = State::Head;
                Step::Forward(len)
            }
            Ok(httparse::Status::Partial) => self.partial(buf, "trailer section over the bound"),
            Err(_) => Step::Invalid("malformed trailer section"),
        }
    }

    fn partial(&self, buf: &[u8], over: &'static str) -> Step {
        if buf.len() >= self.max_head { Step::Invalid(over) } else { Step::NeedMore }
    }
}

/// A line end must be CRLF: a bare LF is where parsers disagree (RFC 9112 2.2 lets a recipient
/// accept it; not every server does).
fn has_bare_lf(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().any(|(i, b)| *b == b'\n' && (i == 0 || bytes[i - 1] != b'\r'))
}

enum Body {
    None,
    Length(u64),
    Chunked,
}

/// What a request head says about its host and its body.
struct RequestHead {
    host: String,
    body: Body,
}

impl RequestHead {
    fn read(request: &httparse::Request) -> Result<Self, &'static str> {
        let method = request.method.ok_or("malformed request head")?;
        let target = request.path.ok_or("malformed request head")?;
        if method.eq_ignore_ascii_case("CONNECT") {
            return Err("CONNECT request");
        }
        let mut host = None;
        let mut content_length = None;
        let mut transfer_encoding = None;
        for header in request.headers.iter() {
            let name = header.name;
            if name.eq_ignore_ascii_case("host") {
                if host.replace(header.value).is_some() {
                    return Err("two Host headers");
                }
            } else if name.eq_ignore_ascii_case("content-length") {
                if content_length.replace(header.value).is_some() {
                    return Err("two Content-Length headers");
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                if transfer_encoding.replace(header.value).is_some() {
                    return Err("two Transfer-Encoding headers");
                }
            } else if name.eq_ignore_ascii_case("upgrade") {
                return Err("Upgrade request on an inspected HTTP port");
            }
        }
        let host = authority_host(host.ok_or("no Host header")?)?;
        if let Some(authority) = absolute_form_authority(target)?
            && authority_host(authority)? != host
        {
            return Err("Host header disagrees with the absolute-form target");
        }
        let body = match (content_length, transfer_encoding) {
            (Some(_), Some(_)) => return Err("Content-Length with Transfer-Encoding"),
            (None, Some(_)) if request.version == Some(0) => {
                // RFC 9112 6.1: a 1.0 recipient cannot know chunked; treat as faulty framing.
                return Err("Transfer-Encoding in an HTTP/1.0 request");
            }
            (None, Some(coding)) if trim(coding).eq_ignore_ascii_case(b"chunked") => Body::Chunked,
            (None, Some(_)) => return Err("Transfer-Encoding other than chunked"),
            (Some(length), None) => match content_length_value(length) {
                Some(0) => Body::None,
                Some(n) => Body::Length(n),
                None => return Err("malformed Content-Length"),
            },
            (None, None) => Body::None,
        };
        Ok(RequestHead { host, body })
    }
}

/// The authority of an absolute-form target, `None` for origin-form (`/path`) and asterisk-form
/// (`*`, OPTIONS only).
fn absolute_form_authority(target: &str) -> Result<Option<&[u8]>, &'static str> {
    if target.starts_with('/') || target == "*" {
        return Ok(None);
    }
    let bytes = target.as_bytes();
    let scheme = b"http://";
    if bytes.len() < scheme.len() || !bytes[..scheme.len()].eq_ignore_ascii_case(scheme) {
        return Err("request target is neither origin-form nor an http:// URL");
    }
    let rest = &bytes[scheme.len()..];
    let end = rest.iter().position(|b| matches!(b, b'/' | b'?' | b'#')).unwrap_or(rest.len());
    Ok(Some(&rest[..end]))
}

/// The host of `host[:port]`, canonical. IP literals, user info and non-numeric ports refused.
fn authority_host(authority: &[u8]) -> Result<String, &'static str> {
    let authority = trim(authority);
    if authority.contains(&b'@') {
        return Err("user info in the request authority");
    }
    if authority.first() == Some(&b'[') {
        return Err("IP literal as HTTP host");
    }
    let host = match authority.iter().rposition(|b| *b == b':') {
        Some(colon) => {
            let port = &authority[colon + 1..];
            if port.len() > 5 || !port.iter().all(u8::is_ascii_digit) {
                return Err("malformed port in the HTTP host");
            }
            &authority[..colon]
        }
        None => authority,
    };
    if is_ipv4_literal(host) {
        return Err("IP literal as HTTP host");
    }
    canonical_name(host).ok_or("HTTP host is not a DNS name")
}

fn is_ipv4_literal(host: &[u8]) -> bool {
    std::str::from_utf8(host).is_ok_and(|h| h.parse::<std::net::Ipv4Addr>().is_ok())
}

/// RFC 9110 8.6: `Content-Length = 1*DIGIT`. A list (`5, 5`) is refused, not merged.
fn content_length_value(value: &[u8]) -> Option<u64> {
    let value = trim(value);
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

fn trim(value: &[u8]) -> &[u8] {
    value.trim_ascii()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = DEFAULT_MAX_HEAD_BYTES;

    /// What a caller sees when the client's stream arrives in `pieces`: the hosts of the heads
    /// judged, in order, and the refusal if there was one. Also checks that what is passed on is
    /// exactly what came in, up to the refusal.
    fn follow(pieces: &[&[u8]]) -> (Vec<String>, Option<&'static str>) {
        let mut tracker = RequestTracker::new(MAX);
        let mut pending: Vec<u8> = Vec::new();
        let mut forwarded: Vec<u8> = Vec::new();
        let mut hosts = Vec::new();
        let input: Vec<u8> = pieces.concat();
        for piece in pieces {
            pending.extend_from_slice(piece);
            loop {
                match tracker.next(&pending) {
                    Step::NeedMore => break,
                    Step::Forward(n) => {
                        assert!(n > 0 && n <= pending.len());
                        forwarded.extend(pending.drain(..n));
                    }
                    Step::Request { host, len } => {
                        hosts.push(host);
                        forwarded.extend(pending.drain(..len));
                    }
                    Step::Invalid(reason) => return (hosts, Some(reason)),
                }
            }
        }
        assert_eq!(forwarded, &input[..forwarded.len()], "passed on unchanged");
        (hosts, None)
    }

    /// The same answer whether the stream comes whole, cut in two at any offset, or byte by
    /// byte.
    fn follow_every_split(stream: &[u8]) -> (Vec<String>, Option<&'static str>) {
        let whole = follow(&[stream]);
        for cut in 0..=stream.len() {
            assert_eq!(follow(&[&stream[..cut], &stream[cut..]]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(follow(&bytes), whole, "byte by byte");
        whole
    }

    fn hosts(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn keep_alive_second_request_for_another_host_is_seen() {
        let stream = b"GET / HTTP/1.1\r\nHost: allowed.example.com\r\n\r\n\
                       GET / HTTP/1.1\r\nHost: other.example.net\r\n\r\n";
        assert_eq!(follow_every_split(stream), (hosts(&["allowed.example.com", "other.example.net"]), None));
    }

    #[test]
    fn pipelined_requests_in_one_buffer_are_each_judged() {
        let stream = b"GET /a HTTP/1.1\r\nHost: a.example.com\r\n\r\n\
                       POST /b HTTP/1.1\r\nHost: A.Example.com:80\r\nContent-Length: 5\r\n\r\nhello\
                       HEAD /c HTTP/1.0\r\nHost: c.example.com.\r\n\r\n";
        assert_eq!(follow(&[stream]), (hosts(&["a.example.com", "a.example.com", "c.example.com"]), None));
    }

    #[test]
    fn content_length_body_that_looks_like_a_request_is_body() {
        let body = b"GET / HTTP/1.1\r\nHost: evil.example.net\r\n\r\n";
        let mut stream =
            format!("POST /up HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        stream.extend_from_slice(body);
        stream.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: b.example.com\r\n\r\n");
        assert_eq!(follow_every_split(&stream), (hosts(&["a.example.com", "b.example.com"]), None));
    }

    #[test]
    fn chunked_body_with_a_request_inside_and_trailers_is_body() {
        let stream = b"POST /up HTTP/1.1\r\nHost: a.example.com\r\nTransfer-Encoding: chunked\r\n\r\n\
                       2a;ext=1\r\nGET / HTTP/1.1\r\nHost: evil.example.net\r\n\r\n\r\n\
                       3\r\nabc\r\n\
                       0\r\nX-Checksum: 1\r\n\r\n\
                       GET /next HTTP/1.1\r\nHost: b.example.com\r\n\r\n";
        assert_eq!(follow_every_split(stream), (hosts(&["a.example.com", "b.example.com"]), None));
    }

    #[test]
    fn absolute_form_target_must_agree_with_host() {
        let agree = b"GET http://a.example.com:80/x?y HTTP/1.1\r\nHost: A.example.com\r\n\r\n";
        assert_eq!(follow(&[agree]), (hosts(&["a.example.com"]), None));
        let disagree = b"GET http://evil.example.net/ HTTP/1.1\r\nHost: a.example.com\r\n\r\n";
        assert_eq!(follow(&[disagree]), (vec![], Some("Host header disagrees with the absolute-form target")));
        let https = b"GET https://a.example.com/ HTTP/1.1\r\nHost: a.example.com\r\n\r\n";
        assert_eq!(follow(&[https]), (vec![], Some("request target is neither origin-form nor an http:// URL")));
    }

    #[test]
    fn refuses_heads_it_cannot_judge_safely() {
        let cases: &[(&str, &[u8], &str)] = &[
            ("no host", b"GET / HTTP/1.1\r\n\r\n", "no Host header"),
            ("http/1.0 no host", b"GET / HTTP/1.0\r\n\r\n", "no Host header"),
            (
                "two hosts",
                b"GET / HTTP/1.1\r\nHost: a.example.com\r\nhost: b.example.net\r\n\r\n",
                "two Host headers",
            ),
            ("ip host", b"GET / HTTP/1.1\r\nHost: 192.0.2.7\r\n\r\n", "IP literal as HTTP host"),
            ("ipv6 host", b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n", "IP literal as HTTP host"),
            ("empty host", b"GET / HTTP/1.1\r\nHost: \r\n\r\n", "HTTP host is not a DNS name"),
            ("userinfo", b"GET / HTTP/1.1\r\nHost: a@b.example.com\r\n\r\n", "user info in the request authority"),
            ("bad port", b"GET / HTTP/1.1\r\nHost: a.example.com:x\r\n\r\n", "malformed port in the HTTP host"),
            ("connect", b"CONNECT a.example.com:443 HTTP/1.1\r\nHost: a.example.com:443\r\n\r\n", "CONNECT request"),
            ("h2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "HTTP/2 prior-knowledge preface"),
            (
                "upgrade",
                b"GET / HTTP/1.1\r\nHost: a.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
                "Upgrade request on an inspected HTTP port",
            ),
            ("not http", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "malformed request head"),
            ("bare lf", b"GET / HTTP/1.1\nHost: a.example.com\n\n", "bare LF in request head"),
            ("space before colon", b"GET / HTTP/1.1\r\nHost : a.example.com\r\n\r\n", "malformed request head"),
            (
                "cl and te",
                b"POST / HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
                "Content-Length with Transfer-Encoding",
            ),
            (
                "two cl",
                b"POST / HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
                "two Content-Length headers",
            ),
            (
                "cl list",
                b"POST / HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: 4, 4\r\n\r\n",
                "malformed Content-Length",
            ),
            (
                "signed cl",
                b"POST / HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: +4\r\n\r\n",
                "malformed Content-Length",
            ),
            (
                "two te",
                b"POST / HTTP/1.1\r\nHost: a.example.com\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                "two Transfer-Encoding headers",
            ),
            (
                "te not chunked",
                b"POST / HTTP/1.1\r\nHost: a.example.com\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
                "Transfer-Encoding other than chunked",
            ),
            (
                "te in 1.0",
                b"POST / HTTP/1.0\r\nHost: a.example.com\r\nTransfer-Encoding: chunked\r\n\r\n",
                "Transfer-Encoding in an HTTP/1.0 request",
            ),
            (
                "empty chunk size",
                b"POST / HTTP/1.1\r\nHost: a.example.com\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
                "malformed chunk size line",
            ),
            (
                "chunk without crlf",
                b"POST / HTTP/1.1\r\nHost: a.example.com\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcGET",
                "chunk data not followed by CRLF",
            ),
            (
                "chunk size bare lf",
                b"POST / HTTP/1.1\r\nHost: a.example.com\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n",
                "malformed chunk size line",
            ),
        ];
        for (case, stream, reason) in cases {
            let (_, refusal) = follow(&[stream]);
            assert_eq!(refusal, Some(*reason), "{case}");
        }
    }

    #[test]
    fn refusal_comes_at_the_bad_request_not_before_or_after() {
        let stream = b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n\
                       GET / HTTP/1.1\r\nHost: b.example.com\r\nHost: c.example.com\r\n\r\n";
        assert_eq!(follow_every_split(stream), (hosts(&["a.example.com"]), Some("two Host headers")));
    }

    #[test]
    fn a_head_over_the_bound_is_refused_without_waiting_for_its_end() {
        let mut tracker = RequestTracker::new(1024);
        let mut stream = b"GET / HTTP/1.1\r\nHost: a.example.com\r\nX-Pad: ".to_vec();
        stream.resize(1024, b'a');
        assert_eq!(tracker.next(&stream[..1023]), Step::NeedMore);
        assert_eq!(tracker.next(&stream), Step::Invalid("request head over the bound"));
    }

    #[test]
    fn long_bodies_are_forwarded_in_the_pieces_they_arrive_in() {
        let mut tracker = RequestTracker::new(MAX);
        let head = b"PUT / HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: 10000000000\r\n\r\n";
        assert!(matches!(tracker.next(head), Step::Request { len, .. } if len == head.len()));
        let chunk = [b'G'; 65536];
        for _ in 0..10 {
            assert_eq!(tracker.next(&chunk), Step::Forward(chunk.len()));
        }
    }
}
