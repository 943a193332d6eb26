//! Reading a TLS ClientHello without terminating TLS: enough to learn the server name the client
//! asks for (SNI), whether it uses Encrypted Client Hello, and its ALPN list.
//!
//! The caller owns the buffer: it appends what it receives and calls [`scan_client_hello`] on
//! everything received so far. The answer is [`HelloScan::Hello`] only once the whole ClientHello
//! handshake message is in (and every TLS record that carries part of it), never on a prefix. A
//! ClientHello may be fragmented over several TLS records (RFC 8446 5.1) and any number of TCP
//! segments; both are reassembled here. Everything else is refused: a first record that is not a
//! handshake, a first handshake message that is not a ClientHello, framing whose lengths do not
//! add up, a duplicated extension, more than one SNI host name, a name that is not a DNS name,
//! and anything over the caller's byte bound.
//!
//! Framing fields are parsed with `tls-parser`; the loops around them only stitch fragments.

use tls_parser::{
    SNIType, TlsExtension, TlsRecordType, parse_tls_extension_alpn_content, parse_tls_extension_sni_hostname,
    parse_tls_extension_unknown, parse_tls_handshake_client_hello, parse_tls_record_header,
};

/// TLS record header: type (1), legacy version (2), length (2). RFC 8446 5.1.
const RECORD_HEADER_LEN: usize = 5;
/// Handshake message header: type (1), length (3). RFC 8446 4.
const HANDSHAKE_HEADER_LEN: usize = 4;
/// A plaintext record carries at most 2^14 bytes (RFC 8446 5.1).
const MAX_PLAINTEXT_RECORD: usize = 1 << 14;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
/// encrypted_client_hello (draft-ietf-tls-esni-18+, IANA TLS ExtensionType 0xfe0d).
const EXT_ECH: u16 = 0xfe0d;
/// The older encrypted_server_name draft: the real name is hidden just the same.
const EXT_ESNI: u16 = 0xffce;
/// A DNS name is at most 253 characters in text form (RFC 1035 2.3.4, without the final dot).
const MAX_NAME_LEN: usize = 253;

/// The default bound on the bytes a ClientHello may take: far above any real one (post-quantum
/// key shares bring browsers to about 2 KiB), low enough that a pending connection stays small.
pub const DEFAULT_MAX_HELLO_BYTES: usize = 64 * 1024;

/// What the bytes received so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloScan {
    /// Not the whole ClientHello yet, and nothing wrong so far: read more.
    NeedMore,
    /// The whole ClientHello is in.
    Hello(ClientHello),
    /// Not a ClientHello cordon can judge: refuse the connection.
    Invalid(&'static str),
}

/// What cordon judges a TLS connection by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The SNI host name, canonical: lowercase ASCII, no trailing dot. With ECH this is the outer
    /// (public) name, the only one visible.
    pub sni: Option<String>,
    /// The encrypted_client_hello (or older encrypted_server_name) extension is present.
    pub ech: bool,
    /// The ALPN protocol names offered, in order (lossy UTF-8, for display only).
    pub alpn: Vec<String>,
    /// How many bytes of the buffer the records carrying the ClientHello take. Bytes after them
    /// are whatever the client sent next (e.g. a ChangeCipherSpec) and are not judged.
    pub len: usize,
}

/// Judges the bytes a client sent first, `max_bytes` at most (see [`DEFAULT_MAX_HELLO_BYTES`]).
pub fn scan_client_hello(buf: &[u8], max_bytes: usize) -> HelloScan {
    match reassemble(buf, max_bytes) {
        Ok(Some((message, len))) => match parse_hello(&message, len) {
            Ok(hello) => HelloScan::Hello(hello),
            Err(reason) => HelloScan::Invalid(reason),
        },
        Ok(None) => HelloScan::NeedMore,
        Err(reason) => HelloScan::Invalid(reason),
    }
}

/// Walks the handshake records at the start of `buf`. Returns the whole ClientHello message
/// (header included) and the bytes its records take once it is complete, `None` while it is not.
fn reassemble(buf: &[u8], max_bytes: usize) -> Result<Option<(Vec<u8>, usize)>, &'static str> {
    let mut pos = 0;
    // Only the first record's payload is borrowed until a second record is needed, so the
    // common single-record hello costs one copy (into the returned message).
    let mut message: Vec<u8> = Vec::new();
    let mut wanted: Option<usize> = None;
    loop {
        let Some(header_bytes) = buf.get(pos..pos + RECORD_HEADER_LEN) else {
            return need_more(buf, max_bytes);
        };
        let (_, header) = parse_tls_record_header(header_bytes).map_err(|_| "malformed TLS record header")?;
        if header.record_type != TlsRecordType::Handshake {
            return Err(if pos == 0 {
                "first record is not a TLS handshake"
            } else {
                "ClientHello interrupted by a non-handshake record"
            });
        }
        if header.version.0 >> 8 != 3 {
            return Err("TLS record version is not 3.x");
        }
        let record_len = usize::from(header.len);
        if record_len == 0 {
            // RFC 8446 5.1: zero-length handshake fragments MUST NOT be sent.
            return Err("empty TLS handshake record");
        }
        if record_len > MAX_PLAINTEXT_RECORD {
            return Err("TLS record over 2^14 bytes");
        }
        let body_start = pos + RECORD_HEADER_LEN;
        let body_end = body_start + record_len;
        if body_end > max_bytes {
            return Err("ClientHello over the byte bound");
        }
        // Peek into a record still arriving, so a wrong message type or an oversized length is
        // refused without waiting for the rest.
        let available = &buf[body_start..body_end.min(buf.len())];
        let before = message.len();
        message.extend_from_slice(available);
        if wanted.is_none() && !message.is_empty() && message[0] != HANDSHAKE_CLIENT_HELLO {
            return Err("first handshake message is not a ClientHello");
        }
        if wanted.is_none() && message.len() >= HANDSHAKE_HEADER_LEN {
            let body_len = u32::from_be_bytes([0, message[1], message[2], message[3]]) as usize;
            let total = HANDSHAKE_HEADER_LEN + body_len;
            if total > max_bytes {
                return Err("ClientHello over the byte bound");
            }
            wanted = Some(total);
        }
        if body_end > buf.len() {
            return need_more(buf, max_bytes);
        }
        if let Some(total) = wanted
            && message.len() >= total
        {
            if message.len() > total && before < total {
                // The record that completes the ClientHello carries more handshake bytes after
                // it: a client's first flight has nothing else there (RFC 8446 4.1.2).
                return Err("extra handshake data after the ClientHello");
            }
            message.truncate(total);
            return Ok(Some((message, body_end)));
        }
        pos = body_end;
    }
}

fn need_more<T>(buf: &[u8], max_bytes: usize) -> Result<Option<T>, &'static str> {
    if buf.len() >= max_bytes { Err("ClientHello over the byte bound") } else { Ok(None) }
}

fn parse_hello(message: &[u8], len: usize) -> Result<ClientHello, &'static str> {
    let body = &message[HANDSHAKE_HEADER_LEN..];
    let (rest, contents) = parse_tls_handshake_client_hello(body).map_err(|_| "malformed ClientHello")?;
    if !rest.is_empty() {
        return Err("trailing bytes after the ClientHello extensions");
    }
    let mut hello = ClientHello { sni: None, ech: false, alpn: Vec::new(), len };
    let Some(mut extensions) = contents.ext else {
        // A ClientHello without extensions (SSL 3.0 style) has no SNI: the policy refuses it.
        return Ok(hello);
    };
    let mut seen: Vec<u16> = Vec::with_capacity(24);
    while !extensions.is_empty() {
        // Every extension is framed the same way; only the few cordon reads are parsed further,
        // so an extension tls-parser is strict about cannot refuse a valid hello.
        let (rest, extension) = parse_tls_extension_unknown(extensions).map_err(|_| "malformed extension framing")?;
        extensions = rest;
        let TlsExtension::Unknown(kind, data) = extension else {
            return Err("malformed extension framing");
        };
        // RFC 8446 4.2: no two extensions of the same type. Two SNIs would let a server read
        // another name than cordon did.
        if seen.contains(&kind.0) {
            return Err("duplicate TLS extension");
        }
        seen.push(kind.0);
        match kind.0 {
            EXT_SERVER_NAME => hello.sni = Some(server_name(data)?),
            EXT_ALPN => hello.alpn = alpn(data)?,
            EXT_ECH | EXT_ESNI => hello.ech = true,
            _ => {}
        }
    }
    Ok(hello)
}

/// The one host_name of a server_name extension (RFC 6066 3), canonical.
fn server_name(data: &[u8]) -> Result<String, &'static str> {
    let [hi, lo, list @ ..] = data else {
        return Err("malformed server_name extension");
    };
    if usize::from(u16::from_be_bytes([*hi, *lo])) != list.len() || list.is_empty() {
        return Err("malformed server_name extension");
    }
    let mut rest = list;
    let mut name = None;
    while !rest.is_empty() {
        let (after, (kind, value)) =
            parse_tls_extension_sni_hostname(rest).map_err(|_| "malformed server_name extension")?;
        rest = after;
        if kind != SNIType::HostName {
            return Err("server_name of an unknown type");
        }
        // RFC 6066 3: the list MUST NOT hold more than one name of the same type.
        if name.replace(value).is_some() {
            return Err("more than one SNI host name");
        }
    }
    let name = name.ok_or("malformed server_name extension")?;
    canonical_name(name).ok_or("SNI is not a DNS host name")
}

fn alpn(data: &[u8]) -> Result<Vec<String>, &'static str> {
    match parse_tls_extension_alpn_content(data) {
        Ok(([], TlsExtension::ALPN(names))) => {
            Ok(names.into_iter().map(|name| String::from_utf8_lossy(name).into_owned()).collect())
        }
        _ => Err("malformed ALPN extension"),
    }
}

/// A host name as cordon compares it: lowercase ASCII letters, digits, `-`, `_` and dots, no
/// empty label, no trailing dot, not an IPv4 literal (RFC 6066 3: "Literal IPv4 and IPv6
/// addresses are not permitted in HostName"; `:` and `[` are already outside the alphabet).
/// `None` when it is not such a name.
pub fn canonical_name(raw: &[u8]) -> Option<String> {
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    if raw.is_empty() || raw.len() > MAX_NAME_LEN {
        return None;
    }
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    if !raw.iter().all(allowed) || raw.split(|b| *b == b'.').any(<[u8]>::is_empty) {
        return None;
    }
    let name = String::from_utf8(raw.to_ascii_lowercase()).ok()?;
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return None;
    }
    Some(name)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    const MAX: usize = DEFAULT_MAX_HELLO_BYTES;

    /// Records the first flight a real TLS client sends to a listener that never answers: the
    /// client is run against 127.0.0.1, the bytes are collected until it has been quiet for
    /// 400 ms (so the capture does not depend on the parser under test), then it is killed.
    pub(crate) fn capture(client: &str, args: &[&str]) -> Vec<u8> {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a capture listener");
        let port = listener.local_addr().unwrap().port().to_string();
        let args: Vec<String> = args.iter().map(|a| a.replace("PORT", &port)).collect();
        let mut child = Command::new(client)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {client} to capture a ClientHello: {e}"));
        listener.set_nonblocking(false).unwrap();
        let (mut stream, _) = listener.accept().expect("the client connects");
        stream.set_read_timeout(Some(Duration::from_millis(400))).unwrap();
        let mut bytes = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut chunk = [0u8; 4096];
        while Instant::now() < deadline {
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
                Err(_) => break, // quiet for 400 ms: the first flight is over
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(!bytes.is_empty(), "{client} sent nothing");
        bytes
    }

    pub(crate) fn openssl_hello(name: Option<&str>) -> Vec<u8> {
        let mut args = vec!["s_client", "-connect", "127.0.0.1:PORT"];
        match name {
            Some(name) => args.extend(["-servername", name]),
            None => args.push("-noservername"),
        }
        capture("openssl", &args)
    }

    fn curl_hello(name: &str) -> Vec<u8> {
        let resolve = format!("{name}:PORT:127.0.0.1");
        let url = format!("https://{name}:PORT/");
        capture("curl", &["-sk", "--max-time", "5", "--resolve", &resolve, &url])
    }

    /// A ClientHello assembled from parts, for the cases no stock client sends. The fixed part
    /// (version, random, empty session id, one cipher suite, null compression) is what TLS 1.3
    /// clients send; `extensions` are (type, data) in order.
    pub(crate) fn synthetic_hello(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0x11; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        let mut ext = Vec::new();
        for (kind, data) in extensions {
            ext.extend_from_slice(&kind.to_be_bytes());
            ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext.extend_from_slice(data);
        }
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut message = vec![HANDSHAKE_CLIENT_HELLO];
        message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend_from_slice(&body);
        records(&message, MAX_PLAINTEXT_RECORD)
    }

    pub(crate) fn sni_extension(names: &[&str]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for name in names {
            list.push(0);
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name.as_bytes());
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        (EXT_SERVER_NAME, data)
    }

    /// A handshake message framed as handshake records of at most `fragment` bytes each.
    fn records(message: &[u8], fragment: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in message.chunks(fragment) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            out.extend_from_slice(piece);
        }
        out
    }

    /// The ClientHello handshake message inside captured records (single-record captures).
    fn message_of(captured: &[u8]) -> Vec<u8> {
        let HelloScan::Hello(hello) = scan_client_hello(captured, MAX) else {
            panic!("the capture is not a ClientHello");
        };
        let mut message = Vec::new();
        let mut pos = 0;
        while pos < hello.len {
            let len = u16::from_be_bytes([captured[pos + 3], captured[pos + 4]]) as usize;
            message.extend_from_slice(&captured[pos + 5..pos + 5 + len]);
            pos += 5 + len;
        }
        message
    }

    /// Feeding `bytes` cut at every offset into two TCP reads: the first part alone is never a
    /// Hello, the whole is the same Hello.
    fn assert_hello_only_when_complete(bytes: &[u8], expected: &ClientHello) {
        for cut in 0..expected.len {
            assert_eq!(
                scan_client_hello(&bytes[..cut], MAX),
                HelloScan::NeedMore,
                "a prefix of {cut} bytes must ask for more"
            );
        }
        assert_eq!(scan_client_hello(&bytes[..expected.len], MAX), HelloScan::Hello(expected.clone()));
        assert_eq!(scan_client_hello(bytes, MAX), HelloScan::Hello(expected.clone()));
    }

    #[test]
    fn openssl_hello_yields_its_sni_only_once_complete_at_every_cut() {
        let bytes = openssl_hello(Some("API.Example.COM."));
        let HelloScan::Hello(hello) = scan_client_hello(&bytes, MAX) else {
            panic!("an openssl ClientHello must parse");
        };
        assert_eq!(hello.sni.as_deref(), Some("api.example.com"));
        assert!(!hello.ech);
        assert_hello_only_when_complete(&bytes, &hello);
    }

    #[test]
    fn curl_hello_yields_its_sni_and_alpn() {
        let bytes = curl_hello("files.example.org");
        let HelloScan::Hello(hello) = scan_client_hello(&bytes, MAX) else {
            panic!("a curl ClientHello must parse");
        };
        assert_eq!(hello.sni.as_deref(), Some("files.example.org"));
        assert!(hello.alpn.iter().any(|p| p == "http/1.1"), "{:?}", hello.alpn);
        assert_hello_only_when_complete(&bytes, &hello);
    }

    #[test]
    fn openssl_hello_without_servername_has_no_sni() {
        let bytes = openssl_hello(None);
        let HelloScan::Hello(hello) = scan_client_hello(&bytes, MAX) else {
            panic!("an openssl ClientHello must parse");
        };
        assert_eq!(hello.sni, None);
    }

    #[test]
    fn hello_fragmented_over_many_records_is_reassembled_and_never_early() {
        // openssl 3.0 and curl here send the hello in one record; big hellos (post-quantum key
        // shares) and some stacks fragment it, so the captured message is re-framed in records
        // of 7 and 100 bytes (RFC 8446 5.1 allows any split).
        let message = message_of(&openssl_hello(Some("split.example.net")));
        for fragment in [7, 100] {
            let bytes = records(&message, fragment);
            let HelloScan::Hello(hello) = scan_client_hello(&bytes, MAX) else {
                panic!("a fragmented ClientHello must parse");
            };
            assert_eq!(hello.sni.as_deref(), Some("split.example.net"));
            assert_eq!(hello.len, bytes.len());
            assert_hello_only_when_complete(&bytes, &hello);
        }
    }

    #[test]
    fn hello_byte_by_byte_as_a_caller_appends_it() {
        let bytes = curl_hello("one.example.com");
        let mut buf = Vec::new();
        let mut answer = HelloScan::NeedMore;
        for byte in &bytes {
            assert_eq!(answer, HelloScan::NeedMore, "answered before the end");
            buf.push(*byte);
            answer = scan_client_hello(&buf, MAX);
        }
        let HelloScan::Hello(hello) = answer else {
            panic!("the whole hello must parse: {answer:?}");
        };
        assert_eq!(hello.sni.as_deref(), Some("one.example.com"));
    }

    #[test]
    fn bytes_after_the_hello_are_not_judged_and_not_counted_in_its_len() {
        let mut bytes = synthetic_hello(&[sni_extension(&["a.example.com"])]);
        let hello_len = bytes.len();
        bytes.extend_from_slice(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x01]); // ChangeCipherSpec
        let HelloScan::Hello(hello) = scan_client_hello(&bytes, MAX) else {
            panic!("must parse");
        };
        assert_eq!(hello.len, hello_len);
    }

    #[test]
    fn ech_hello_is_flagged_and_shows_the_outer_name() {
        // Hand-assembled: real ECH needs an ECHConfig from DNS, which no test server here has.
        // What matters to cordon is only that the extension type 0xfe0d is seen (its payload is
        // opaque: an outer ClientHello's ECH carries the encrypted inner hello).
        let outer = synthetic_hello(&[
            sni_extension(&["public.example.com"]),
            (EXT_ECH, vec![0, 0, 1, 0, 1, 0x2a, 0, 0x20, 7, 7]),
        ]);
        let HelloScan::Hello(hello) = scan_client_hello(&outer, MAX) else {
            panic!("must parse");
        };
        assert!(hello.ech);
        assert_eq!(hello.sni.as_deref(), Some("public.example.com"));
    }

    #[test]
    fn refuses_what_is_not_a_clienthello() {
        let good = synthetic_hello(&[sni_extension(&["a.example.com"])]);
        let mut server_hello = good.clone();
        server_hello[5] = 2;
        let mut truncated_inside = good.clone();
        // Handshake length says 3 bytes fewer than the record carries.
        let declared = u32::from_be_bytes([0, good[6], good[7], good[8]]) - 3;
        truncated_inside[6..9].copy_from_slice(&declared.to_be_bytes()[1..]);
        let mut lying_ext_len = good.clone();
        let ext_len_at = 5 + 4 + 2 + 32 + 1 + 2 + 2 + 2;
        lying_ext_len[ext_len_at + 1] += 1;
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("http", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), "first record is not a TLS handshake"),
            ("application data", vec![0x17, 3, 3, 0, 1, 0], "first record is not a TLS handshake"),
            ("sslv2 hello", vec![0x80, 0x2e, 1, 3, 1, 0, 0x15], "first record is not a TLS handshake"),
            ("server hello", server_hello, "first handshake message is not a ClientHello"),
            ("empty record", vec![0x16, 3, 1, 0, 0], "empty TLS handshake record"),
            ("record over 2^14", vec![0x16, 3, 1, 0x40, 1], "TLS record over 2^14 bytes"),
            ("record version 2", vec![0x16, 2, 0, 0, 4, 1, 0, 0, 0], "TLS record version is not 3.x"),
            ("extra data after hello", truncated_inside, "extra handshake data after the ClientHello"),
            ("extension lengths", lying_ext_len, "trailing bytes after the ClientHello extensions"),
            (
                "two sni extensions",
                synthetic_hello(&[sni_extension(&["a.example.com"]), sni_extension(&["b.example.com"])]),
                "duplicate TLS extension",
            ),
            (
                "two names in one sni",
                synthetic_hello(&[sni_extension(&["a.example.com", "b.example.com"])]),
                "more than one SNI host name",
            ),
            ("ip literal sni", synthetic_hello(&[sni_extension(&["192.0.2.1"])]), "SNI is not a DNS host name"),
            ("nul in sni", synthetic_hello(&[sni_extension(&["a.com\0.evil"])]), "SNI is not a DNS host name"),
            ("empty label", synthetic_hello(&[sni_extension(&["a..com"])]), "SNI is not a DNS host name"),
            ("empty sni list", synthetic_hello(&[(0, vec![0, 0])]), "malformed server_name extension"),
            (
                "non-handshake record between fragments",
                {
                    let message = message_of(&good);
                    let mut bytes = records(&message[..10], 10);
                    bytes.extend_from_slice(&[0x15, 3, 3, 0, 2, 1, 0]);
                    bytes.extend_from_slice(&records(&message[10..], 1000));
                    bytes
                },
                "ClientHello interrupted by a non-handshake record",
            ),
        ];
        for (case, bytes, reason) in cases {
            assert_eq!(scan_client_hello(&bytes, MAX), HelloScan::Invalid(reason), "{case}");
        }
    }

    #[test]
    fn a_truncated_hello_only_ever_asks_for_more() {
        let bytes = synthetic_hello(&[sni_extension(&["a.example.com"])]);
        assert_eq!(scan_client_hello(&bytes[..bytes.len() - 1], MAX), HelloScan::NeedMore);
        assert_eq!(scan_client_hello(&[0x16], MAX), HelloScan::NeedMore);
        assert_eq!(scan_client_hello(&[], MAX), HelloScan::NeedMore);
    }

    #[test]
    fn refuses_a_hello_over_the_byte_bound_before_it_arrives() {
        let padding = (21u16, vec![0u8; 3000]);
        let bytes = synthetic_hello(&[sni_extension(&["a.example.com"]), padding]);
        // The declared length alone is enough to refuse: only the first record header and the
        // handshake header have arrived.
        assert_eq!(scan_client_hello(&bytes[..9], 1024), HelloScan::Invalid("ClientHello over the byte bound"));
        assert!(matches!(scan_client_hello(&bytes, 4096), HelloScan::Hello(_)));
        // An endless stream of tiny records never grows past the bound either.
        let endless = records(&message_of(&bytes), 1);
        assert_eq!(scan_client_hello(&endless[..2048], 2048), HelloScan::Invalid("ClientHello over the byte bound"));
    }

    #[test]
    fn canonical_name_lowercases_and_drops_one_trailing_dot() {
        assert_eq!(canonical_name(b"GitHub.COM.").as_deref(), Some("github.com"));
        assert_eq!(canonical_name(b"_dmarc.example.com").as_deref(), Some("_dmarc.example.com"));
        for bad in [&b""[..], b".", b"a..b", b"a.com..", b"10.0.0.1", b"[::1]", b"caf\xc3\xa9.fr", b"a b"] {
            assert_eq!(canonical_name(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
