//! The kernel's packet log (NFLOG, `NETLINK_NETFILTER` subsystem ULOG), read in-process: the
//! firewall's refusal chains log every refused packet of the agent to one group (rate-limited in
//! the kernel first, see `firewall`), and cordon binds that group and reads each logged packet's
//! prefix (the refusal's reason), owner uid and first bytes. No ulogd, no log scraping.
//!
//! Message layout from `linux/netfilter/nfnetlink_log.h` and `linux/netfilter/nfnetlink.h`;
//! the configuration sequence is libnetfilter_log's (`nflog_bind_group`, `nflog_set_mode`).
//! The socket is `sys::net::NetfilterSocket`; everything but [`start`] is bytes, and pure.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::egress::journal::{Journal, Reason, Refused};
use crate::egress::namebound::bindings::Bindings;
use crate::service::Service;
use crate::sys::net::{NetfilterSocket, netlink_attr as attr};

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_NLBUFSIZ: u16 = 3;
const NFULA_CFG_TIMEOUT: u16 = 4;
const NFULA_CFG_QTHRESH: u16 = 5;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_TIMESTAMP: u16 = 3;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NFULA_UID: u16 = 11;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
/// Attribute type bits that are flags, not the type (`NLA_TYPE_MASK`).
const NLA_TYPE_MASK: u16 = !((1 << 15) | (1 << 14));
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The NFLOG group the refusal chains log to. Groups are per network namespace; one a
/// container's own tools are unlikely to take (ulogd's examples use 0..=2).
pub const GROUP: u16 = 7710;

/// Bytes of each packet the kernel copies: an IPv6 header (40) with a few extension headers and
/// the TCP or UDP ports fit; nothing of the payload's data is needed.
pub const COPY_RANGE: u32 = 128;

/// One configuration request for `group` (`nfgenmsg.res_id`, big-endian) with `attrs`.
fn config(seq: u32, group: u16, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = vec![0u8, 0]; // nfgenmsg: AF_UNSPEC, NFNETLINK_V0
    body.extend_from_slice(&group.to_be_bytes());
    for (kind, payload) in attrs {
        attr(&mut body, *kind, payload);
    }
    let mut msg = Vec::with_capacity(16 + body.len());
    msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG).to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&body);
    msg
}

/// Binds `group` to the sending socket, copying the first `range` bytes of each packet, and
/// delivering each packet at once (queue threshold 1, flush timeout 10 ms) in buffers of at
/// most 16 KiB.
pub fn bind_request(seq: u32, group: u16, range: u32) -> Vec<u8> {
    let mut mode = range.to_be_bytes().to_vec(); // struct nfulnl_msg_config_mode, packed
    mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
    config(
        seq,
        group,
        &[
            (NFULA_CFG_CMD, vec![NFULNL_CFG_CMD_BIND]),
            (NFULA_CFG_MODE, mode),
            (NFULA_CFG_NLBUFSIZ, 16384u32.to_be_bytes().to_vec()),
            (NFULA_CFG_TIMEOUT, 1u32.to_be_bytes().to_vec()),
            (NFULA_CFG_QTHRESH, 1u32.to_be_bytes().to_vec()),
        ],
    )
}

/// The acknowledgement of request `seq` in `buf`: Some(Ok) or the errno it carries; None when
/// `buf` holds no answer to it.
pub fn ack(buf: &[u8], seq: u32) -> Option<io::Result<()>> {
    messages(buf).find_map(|m| {
        (m.kind == NLMSG_ERROR && m.seq == seq && m.body.len() >= 4).then(|| {
            match -i32::from_ne_bytes(m.body[0..4].try_into().expect("4 bytes")) {
                0 => Ok(()),
                errno => Err(io::Error::from_raw_os_error(errno)),
            }
        })
    })
}

/// One netlink message: its type, sequence number and body (after the 16-byte header).
struct Message<'a> {
    kind: u16,
    seq: u32,
    body: &'a [u8],
}

/// The messages of one datagram; a truncated one ends the walk.
fn messages(mut buf: &[u8]) -> impl Iterator<Item = Message<'_>> {
    std::iter::from_fn(move || {
        if buf.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().ok()?) as usize;
        if len < 16 || len > buf.len() {
            return None;
        }
        let kind = u16::from_ne_bytes(buf[4..6].try_into().ok()?);
        let seq = u32::from_ne_bytes(buf[8..12].try_into().ok()?);
        let body = &buf[16..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some(Message { kind, seq, body })
    })
}

/// The attributes after a message's fixed header: (type without flags, payload).
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        if len < 4 || len > buf.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        let payload = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((kind, payload))
    })
}

/// What one logged packet says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    /// The rule's `--nflog-prefix`.
    pub prefix: String,
    /// The owner of the sending socket; None for a packet without one.
    pub uid: Option<u32>,
    /// When the kernel stamped the packet; None when it did not (locally generated packets
    /// usually carry no timestamp in `OUTPUT`).
    pub at: Option<SystemTime>,
    pub packet: Option<Packet>,
}

/// The headers of a logged packet that say where it went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub protocol: Protocol,
    pub destination: IpAddr,
    /// TCP and UDP only (the first fragment's).
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    /// Any other IP protocol number (SCTP 132, GRE 47, ...).
    Other(u8),
}

impl Protocol {
    fn of(number: u8) -> Protocol {
        match number {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            1 => Protocol::Icmp,
            58 => Protocol::Icmpv6,
            n => Protocol::Other(n),
        }
    }

    /// "tcp", "udp", "icmp", "icmpv6", or the protocol number.
    pub fn name(self) -> String {
        match self {
            Protocol::Tcp => "tcp".into(),
            Protocol::Udp => "udp".into(),
            Protocol::Icmp => "icmp".into(),
            Protocol::Icmpv6 => "icmpv6".into(),
            Protocol::Other(n) => n.to_string(),
        }
    }
}

/// Every logged packet in one datagram from the group's socket; other messages (acks) are
/// skipped.
pub fn parse(buf: &[u8]) -> Vec<Logged> {
    messages(buf)
        .filter(|m| m.kind == ((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET) && m.body.len() >= 4)
        .map(|m| {
            let family = m.body[0];
            let mut logged = Logged { prefix: String::new(), uid: None, at: None, packet: None };
            for (kind, payload) in attributes(&m.body[4..]) {
                match kind {
                    NFULA_PREFIX => {
                        let text = payload.split(|b| *b == 0).next().unwrap_or_default();
                        logged.prefix = String::from_utf8_lossy(text).into_owned();
                    }
                    NFULA_UID if payload.len() >= 4 => {
                        logged.uid = Some(u32::from_be_bytes(payload[0..4].try_into().expect("4 bytes")));
                    }
                    NFULA_TIMESTAMP if payload.len() >= 16 => {
                        let sec = u64::from_be_bytes(payload[0..8].try_into().expect("8 bytes"));
                        let usec = u64::from_be_bytes(payload[8..16].try_into().expect("8 bytes"));
                        logged.at =
                            SystemTime::UNIX_EPOCH.checked_add(Duration::new(sec, 0) + Duration::from_micros(usec));
                    }
                    NFULA_PAYLOAD => logged.packet = packet(family, payload),
                    _ => {}
                }
            }
            logged
        })
        .collect()
}

/// The destination, protocol and port of an IPv4 or IPv6 packet (`family` is the message's
/// `nfgenmsg.nfgen_family`; the IP version nibble decides when it is unspecified).
pub fn packet(family: u8, bytes: &[u8]) -> Option<Packet> {
    let version = bytes.first()? >> 4;
    match (family, version) {
        (AF_INET, _) | (_, 4) if version == 4 => {
            let ihl = usize::from(bytes[0] & 0x0f) * 4;
            if ihl < 20 || bytes.len() < 20 {
                return None;
            }
            let destination = IpAddr::V4(Ipv4Addr::new(bytes[16], bytes[17], bytes[18], bytes[19]));
            // A later fragment has no transport header (fragment offset non-zero).
            let first_fragment = u16::from_be_bytes([bytes[6], bytes[7]]) & 0x1fff == 0;
            let protocol = Protocol::of(bytes[9]);
            let port = if first_fragment { port(protocol, bytes.get(ihl..)) } else { None };
            Some(Packet { protocol, destination, port })
        }
        (AF_INET6, _) | (_, 6) if version == 6 => {
            if bytes.len() < 40 {
                return None;
            }
            let destination = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&bytes[24..40]).ok()?));
            // Skip extension headers (hop-by-hop 0, routing 43, destination options 60) to the
            // transport header; a fragment header (44) or anything else ends the walk there.
            let (mut next, mut at) = (bytes[6], 40usize);
            while matches!(next, 0 | 43 | 60) {
                let header = bytes.get(at..at + 2)?;
                next = header[0];
                at += (usize::from(header[1]) + 1) * 8;
            }
            let protocol = Protocol::of(next);
            Some(Packet { protocol, destination, port: port(protocol, bytes.get(at..)) })
        }
        _ => None,
    }
}

/// The destination port of a TCP or UDP header (bytes 2..4 of both).
fn port(protocol: Protocol, transport: Option<&[u8]>) -> Option<u16> {
    match protocol {
        Protocol::Tcp | Protocol::Udp => transport.and_then(|t| t.get(2..4)).map(|p| u16::from_be_bytes([p[0], p[1]])),
        _ => None,
    }
}

/// How long one receive waits before the reader checks whether it must stop.
const RECEIVE_TIMEOUT: Duration = Duration::from_millis(500);

/// The socket's receive buffer: about 2000 logged packets of 128 bytes with their attributes
/// wait there while cordon is busy; beyond, the kernel drops them and says so (ENOBUFS).
const RECEIVE_BUFFER: usize = 1 << 20;

/// Binds the refusal chains' group ([`GROUP`]) and reads it into `journal`, on a blocking
/// thread, until the service is stopped. Fails when the kernel has no packet log
/// (`nfnetlink_log`) or another process holds the group (EBUSY).
pub fn start(journal: Arc<Journal>, bindings: Arc<Bindings>) -> io::Result<Service> {
    let socket = NetfilterSocket::open(RECEIVE_TIMEOUT)?;
    // Best effort: without it the default buffer is smaller, and more bursts are lost.
    let _ = socket.set_receive_buffer(RECEIVE_BUFFER);
    socket.send(&bind_request(1, GROUP, COPY_RANGE))?;
    let mut buf = vec![0u8; 65536];
    // The acknowledgement is the first answer on a fresh socket; a few tries, each bounded by
    // the receive timeout, so a kernel that never answers cannot hold the boot.
    let mut acked = Err(io::Error::new(io::ErrorKind::TimedOut, "no acknowledgement of the NFLOG bind"));
    for _ in 0..4 {
        let n = socket.recv(&mut buf)?;
        if let Some(result) = ack(&buf[..n], 1) {
            acked = result;
            break;
        }
    }
    acked?;
    Ok(Service::spawn("journal", move |mut stop| async move {
        let running = Arc::new(AtomicBool::new(true));
        let flag = running.clone();
        // However this task ends (a stop, an abort, the runtime shutting down), the thread
        // sees it within one receive timeout: the runtime waits for its blocking threads.
        let stops_reader = StopsReader(running);
        let reader = tokio::task::spawn_blocking(move || read(&socket, &journal, &bindings, &flag, &mut buf));
        stop.requested().await;
        drop(stops_reader);
        let _ = reader.await;
    }))
}

/// Clears the reader's flag when dropped.
struct StopsReader(Arc<AtomicBool>);

impl Drop for StopsReader {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// The reader's loop: every logged packet becomes a refusal of its chain's reason, if the
/// journal's rate limit lets it through (the names bound to its address are looked up only
/// then).
fn read(socket: &NetfilterSocket, journal: &Journal, bindings: &Bindings, running: &AtomicBool, buf: &mut [u8]) {
    while running.load(Ordering::Relaxed) {
        let n = match socket.recv(buf) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                journal.overflowed();
                continue;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => {
                tracing::error!("the journal stopped reading the kernel's packet log: {e}");
                return;
            }
        };
        let received = SystemTime::now();
        for logged in parse(&buf[..n]) {
            let (Some(reason), Some(packet)) = (Reason::parse(&logged.prefix), logged.packet) else { continue };
            let now = Instant::now();
            if !journal.admit(reason, now) {
                continue;
            }
            let address = packet.destination.to_canonical();
            let refused = Refused {
                at: logged.at.unwrap_or(received),
                uid: logged.uid,
                protocol: packet.protocol.name(),
                address,
                port: packet.port,
                reason,
                sent_name: None,
                detail: None,
            };
            journal.push(refused.event(bindings.names_for(address, now)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn the_bind_request_carries_the_group_big_endian_and_the_copy_mode_packed() {
        let msg = bind_request(5, GROUP, 128);
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize, msg.len());
        assert_eq!(u16::from_ne_bytes(msg[4..6].try_into().unwrap()), (4 << 8) | 1);
        assert_eq!(u16::from_ne_bytes(msg[6..8].try_into().unwrap()), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32::from_ne_bytes(msg[8..12].try_into().unwrap()), 5);
        assert_eq!(&msg[16..20], &[0, 0, (GROUP >> 8) as u8, GROUP as u8]);
        // NFULA_CFG_CMD: len 5, type 1, BIND, padded.
        assert_eq!(&msg[20..28], &[5, 0, 1, 0, 1, 0, 0, 0]);
        // NFULA_CFG_MODE: len 10, type 2, range 128 big-endian, COPY_PACKET, pad; padded to 12.
        assert_eq!(&msg[28..40], &[10, 0, 2, 0, 0, 0, 0, 128, 2, 0, 0, 0]);
        assert_eq!(msg.len() % 4, 0);
    }

    #[test]
    fn an_ack_reports_success_or_the_errno_for_its_own_request_only() {
        let ack_of = |seq: u32, code: i32| {
            let mut b = vec![0u8; 36];
            b[0..4].copy_from_slice(&36u32.to_ne_bytes());
            b[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
            b[8..12].copy_from_slice(&seq.to_ne_bytes());
            b[16..20].copy_from_slice(&code.to_ne_bytes());
            b
        };
        assert!(ack(&ack_of(3, 0), 3).unwrap().is_ok());
        assert!(ack(&ack_of(2, 0), 3).is_none());
        assert_eq!(ack(&ack_of(3, -16), 3).unwrap().unwrap_err().raw_os_error(), Some(libc::EBUSY));
    }

    /// Datagrams the kernel (Linux 6.18) sent for group 7710 in a test namespace, read with a
    /// plain Python netlink socket: uid 1000 connecting to 192.0.2.11:443 (a rule with prefix
    /// "not-admitted" logged the SYN), and uid 1000 sending UDP to [2001:db8::53]:53 (prefix
    /// "resolver"). Each: packet header (hook 3, LOCAL_OUT), out interface, prefix, uid, gid,
    /// the packet; no timestamp.
    const CAPTURED_V4: &str = "8800000000040000000000000000000002001e1e080001000800030011000a006e6f742d61646d697474656400000000080005000000000308000b00000003e808000e00000003e8400009004500003c161040004006386bc6336402c000020b960001bbe45e878800000000a002faf0ec6f0000020405b40402080ae1d29766000000000103030a";
    const CAPTURED_V6: &str = "7c0000000004000000000000000000000a001e1e0800010086dd03000d000a007265736f6c76657200000000080005000000000308000b00000003e808000e00000003e8360009006000702e000a114020010db800000000000000000000000220010db8000000000000000000000053810b0035000a5be2780a0000";

    #[test]
    fn a_captured_ipv4_refusal_gives_its_reason_uid_address_and_port() {
        let buf = hex(CAPTURED_V4);
        let logged = parse(&buf);
        assert_eq!(logged.len(), 1, "{logged:?}");
        let l = &logged[0];
        assert_eq!(l.prefix, "not-admitted");
        assert_eq!(l.uid, Some(1000));
        assert_eq!(l.at, None);
        assert_eq!(
            l.packet,
            Some(Packet { protocol: Protocol::Tcp, destination: "192.0.2.11".parse().unwrap(), port: Some(443) })
        );
        let logged = parse(&hex(CAPTURED_V6));
        assert_eq!(logged.len(), 1, "{logged:?}");
        assert_eq!((logged[0].prefix.as_str(), logged[0].uid), ("resolver", Some(1000)));
        assert_eq!(
            logged[0].packet,
            Some(Packet { protocol: Protocol::Udp, destination: "2001:db8::53".parse().unwrap(), port: Some(53) })
        );
        // Two messages in one datagram are both read.
        let mut two = hex(CAPTURED_V4);
        two.extend(hex(CAPTURED_V6));
        assert_eq!(parse(&two).len(), 2);
    }

    #[test]
    fn ipv6_headers_are_walked_past_extension_headers_to_the_port() {
        // UDP to 2001:db8::53 port 53 behind a hop-by-hop header.
        let mut p = hex("60000000 00100001 fe800000000000000000000000000001 20010db8000000000000000000000053");
        p.extend(hex("11000000 00000000")); // hop-by-hop: next UDP, 8 bytes
        p.extend(hex("c3500035 00080000")); // UDP: 50000 -> 53
        assert_eq!(
            packet(AF_INET6, &p),
            Some(Packet { protocol: Protocol::Udp, destination: "2001:db8::53".parse().unwrap(), port: Some(53) })
        );
        // ICMPv6 echo: no port.
        let mut echo = hex("60000000 0008 3a40 fe800000000000000000000000000001 20010db8000000000000000000000001");
        echo.extend(hex("80000000 00010001"));
        assert_eq!(packet(AF_INET6, &echo).unwrap().port, None);
        assert_eq!(packet(AF_INET6, &echo).unwrap().protocol, Protocol::Icmpv6);
    }

    #[test]
    fn truncated_or_foreign_bytes_never_panic_and_give_no_packet() {
        assert_eq!(packet(AF_INET, &[]), None);
        assert_eq!(packet(AF_INET, &[0x45, 0, 0]), None);
        assert_eq!(packet(AF_INET6, &[0x60; 39]), None);
        // A later IPv4 fragment: the address, but no port.
        let frag = hex("45000020 00010010 40110000 c0000201 c6336401");
        assert_eq!(packet(AF_INET, &frag).unwrap().port, None);
        // A message whose length overruns the datagram ends the walk.
        let mut buf = hex(CAPTURED_V4);
        buf.truncate(100);
        assert!(parse(&buf).is_empty());
        // Every prefix of a real datagram parses without panicking.
        let whole = hex(CAPTURED_V4);
        for n in 0..whole.len() {
            let _ = parse(&whole[..n]);
        }
    }
}
