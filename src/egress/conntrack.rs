//! Deleting the conntrack entries of connections to an address, in process over the netfilter
//! netlink socket (NETLINK_NETFILTER, subsystem CTNETLINK), as `conntrack -D -d ADDRESS` would:
//! a dump of the family's table, then one delete per entry whose original destination is the
//! address, naming it by its original tuple, copied from the dump as it came. Layout from
//! `linux/netfilter/nfnetlink_conntrack.h` and `linux/netfilter/nfnetlink.h`.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use crate::sys::net::NetfilterSocket;

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_IP: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_DST: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
/// The attribute type without NLA_F_NESTED and NLA_F_NET_BYTEORDER.
const NLA_TYPE_MASK: u16 = 0x3fff;

fn family(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

/// A ctnetlink request: header, nfgenmsg for `family`, then `attrs` as given.
fn request(command: u16, flags: u16, seq: u32, family: u8, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | command).to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&[family, 0, 0, 0]);
    msg.extend_from_slice(attrs);
    msg
}

/// The attributes in `buf`: (type without flags, the whole attribute, its payload).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8], &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let item = (kind, &buf[..len], &buf[4..len]);
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some(item)
    })
}

/// The original tuple attribute of one conntrack message body (after nfgenmsg), when its
/// destination is `ip`.
pub fn orig_tuple_to(body: &[u8], ip: IpAddr) -> Option<Vec<u8>> {
    let (_, whole, tuple) = attrs(body).find(|(k, _, _)| *k == CTA_TUPLE_ORIG)?;
    let (_, _, addrs) = attrs(tuple).find(|(k, _, _)| *k == CTA_TUPLE_IP)?;
    let (want, octets): (u16, Vec<u8>) = match ip {
        IpAddr::V4(a) => (CTA_IP_V4_DST, a.octets().to_vec()),
        IpAddr::V6(a) => (CTA_IP_V6_DST, a.octets().to_vec()),
    };
    attrs(addrs).any(|(k, _, v)| k == want && v == octets.as_slice()).then(|| whole.to_vec())
}

/// Deletes every conntrack entry whose original destination is `ip`; returns how many.
pub fn delete_by_destination(ip: IpAddr) -> io::Result<usize> {
    let socket = NetfilterSocket::open(Duration::from_secs(2))?;
    let fam = family(ip);
    socket.send(&request(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, 1, fam, &[]))?;
    let mut tuples = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    'dump: loop {
        let n = socket.recv(&mut buf)?;
        let mut rest = &buf[..n];
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let kind = u16::from_ne_bytes([rest[4], rest[5]]);
            if len < 16 || len > rest.len() {
                break;
            }
            match kind {
                NLMSG_DONE => break 'dump,
                NLMSG_ERROR => {
                    let code = -i32::from_ne_bytes([rest[16], rest[17], rest[18], rest[19]]);
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(code));
                    }
                }
                _ if len >= 20 => tuples.extend(orig_tuple_to(&rest[20..len], ip)),
                _ => {}
            }
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
    }
    let mut deleted = 0;
    for (i, tuple) in tuples.iter().enumerate() {
        let seq = 2 + i as u32;
        socket.send(&request(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, fam, tuple))?;
        loop {
            let n = socket.recv(&mut buf)?;
            if n < 20 || u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]) != seq {
                continue;
            }
            let code = -i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            match code {
                0 => deleted += 1,
                // Gone meanwhile (closed, timed out): what was wanted.
                libc::ENOENT => {}
                c => return Err(io::Error::from_raw_os_error(c)),
            }
            break;
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(payload);
        b.resize(b.len().next_multiple_of(4), 0);
        b
    }

    #[test]
    fn the_original_tuple_is_found_by_its_destination_and_copied_whole() {
        let nested = 1 << 15;
        let ip = [attr(1, &[10, 0, 0, 2]), attr(CTA_IP_V4_DST, &[192, 0, 2, 7])].concat();
        let tuple = attr(CTA_TUPLE_ORIG | nested, &attr(CTA_TUPLE_IP | nested, &ip));
        let body = [attr(7, &[0; 4]), tuple.clone(), attr(2 | nested, &[])].concat();
        assert_eq!(orig_tuple_to(&body, "192.0.2.7".parse().unwrap()), Some(tuple));
        assert_eq!(orig_tuple_to(&body, "192.0.2.8".parse().unwrap()), None);
        assert_eq!(orig_tuple_to(&body, "10.0.0.2".parse().unwrap()), None, "a source is no destination");
    }

    #[test]
    fn a_delete_request_names_the_subsystem_family_and_tuple() {
        let msg = request(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, 9, 2, &[1, 2, 3, 4]);
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize, msg.len());
        assert_eq!(u16::from_ne_bytes(msg[4..6].try_into().unwrap()), (1 << 8) | 2);
        assert_eq!(&msg[16..], &[2, 0, 0, 0, 1, 2, 3, 4]);
    }
}
