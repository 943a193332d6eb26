//! A minimal ipset client over netlink (NETLINK_NETFILTER, subsystem IPSET): adding an address
//! with a timeout is one message and one acknowledgement, microseconds, where running the
//! `ipset` program would cost a fork and exec per DNS answer. Message layout from
//! `linux/netfilter/ipset/ip_set.h` and `linux/netfilter/nfnetlink.h`.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use crate::sys::net::{NetfilterSocket, netlink_attr as attr};

const NFNL_SUBSYS_IPSET: u16 = 6;
const IPSET_CMD_ADD: u16 = 9;
const IPSET_CMD_DEL: u16 = 10;
const IPSET_PROTOCOL: u8 = 7;
const IPSET_ATTR_PROTOCOL: u16 = 1;
const IPSET_ATTR_SETNAME: u16 = 2;
const IPSET_ATTR_DATA: u16 = 7;
const IPSET_ATTR_IP: u16 = 1;
const IPSET_ATTR_IPADDR_IPV4: u16 = 1;
const IPSET_ATTR_IPADDR_IPV6: u16 = 2;
const IPSET_ATTR_TIMEOUT: u16 = 6;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NLMSG_ERROR: u16 = 2;
/// `nlmsghdr` flags (`linux/netlink.h`).
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
/// ipset's own error numbers start here (`IPSET_ERR_PRIVATE`).
const IPSET_ERR_PRIVATE: i32 = 4096;

/// Builds an add (with a timeout) or delete request for `ip` in `set`.
pub fn request(command: u16, seq: u32, set: &str, ip: IpAddr, timeout_secs: Option<u32>) -> Vec<u8> {
    let (family, addr_attr, addr): (u8, u16, Vec<u8>) = match ip {
        IpAddr::V4(a) => (NFPROTO_IPV4, IPSET_ATTR_IPADDR_IPV4, a.octets().to_vec()),
        IpAddr::V6(a) => (NFPROTO_IPV6, IPSET_ATTR_IPADDR_IPV6, a.octets().to_vec()),
    };
    let mut ip_nest = Vec::new();
    attr(&mut ip_nest, addr_attr | NLA_F_NET_BYTEORDER, &addr);
    let mut data = Vec::new();
    attr(&mut data, IPSET_ATTR_IP | NLA_F_NESTED, &ip_nest);
    if let Some(t) = timeout_secs {
        attr(&mut data, IPSET_ATTR_TIMEOUT | NLA_F_NET_BYTEORDER, &t.to_be_bytes());
    }
    let mut body = vec![family, 0, 0, 0]; // struct nfgenmsg: family, version 0, res_id 0
    attr(&mut body, IPSET_ATTR_PROTOCOL, &[IPSET_PROTOCOL]);
    let mut name = set.as_bytes().to_vec();
    name.push(0);
    attr(&mut body, IPSET_ATTR_SETNAME, &name);
    attr(&mut body, IPSET_ATTR_DATA | NLA_F_NESTED, &data);

    let mut msg = Vec::with_capacity(16 + body.len());
    msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&((NFNL_SUBSYS_IPSET << 8) | command).to_ne_bytes());
    // Without NLM_F_EXCL the kernel treats an existing entry as success and renews its timeout.
    let flags = NLM_F_REQUEST | NLM_F_ACK;
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&body);
    msg
}

/// A netlink socket to the kernel's ipset subsystem.
pub struct Ipset {
    socket: NetfilterSocket,
    seq: u32,
}

impl Ipset {
    pub fn open() -> io::Result<Ipset> {
        // An answer that never comes must not hang a DNS reply forever.
        let socket = NetfilterSocket::open(Duration::from_secs(2))?;
        Ok(Ipset { socket, seq: 0 })
    }

    /// Adds `ip` to `set`, or renews its timeout when it is already there.
    pub fn add(&mut self, set: &str, ip: IpAddr, timeout_secs: u32) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        self.exchange(&request(IPSET_CMD_ADD, self.seq, set, ip, Some(timeout_secs)))
    }

    pub fn del(&mut self, set: &str, ip: IpAddr) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        self.exchange(&request(IPSET_CMD_DEL, self.seq, set, ip, None))
    }

    fn exchange(&mut self, msg: &[u8]) -> io::Result<()> {
        self.socket.send(msg)?;
        let mut buf = [0u8; 8192];
        loop {
            let n = self.socket.recv(&mut buf)?;
            match parse_ack(&buf[..n], self.seq) {
                Some(result) => return result,
                None => continue, // a stale answer to an earlier, timed-out request
            }
        }
    }
}

/// Reads the acknowledgement for `seq`: Ok, the error it carries, or None when the message is
/// about another sequence number.
fn parse_ack(buf: &[u8], seq: u32) -> Option<io::Result<()>> {
    if buf.len() < 20 {
        return Some(Err(io::Error::new(io::ErrorKind::InvalidData, "short netlink answer")));
    }
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    let got = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
    if got != seq {
        return None;
    }
    if kind != NLMSG_ERROR {
        return Some(Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected netlink message {kind}"))));
    }
    let code = -i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
    Some(match code {
        0 => Ok(()),
        c if c >= IPSET_ERR_PRIVATE => Err(io::Error::other(format!("ipset error {c} (see IPSET_ERR_* in ip_set.h)"))),
        c => Err(io::Error::from_raw_os_error(c)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_request_layout_matches_the_kernel_abi() {
        let msg = request(IPSET_CMD_ADD, 7, "cordon4", "192.0.2.10".parse().unwrap(), Some(300));
        // nlmsghdr
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize, msg.len());
        assert_eq!(u16::from_ne_bytes(msg[4..6].try_into().unwrap()), (6 << 8) | 9);
        assert_eq!(u32::from_ne_bytes(msg[8..12].try_into().unwrap()), 7);
        // nfgenmsg
        assert_eq!(&msg[16..20], &[NFPROTO_IPV4, 0, 0, 0]);
        // protocol attribute: len 5, type 1, value 7, padded
        assert_eq!(&msg[20..28], &[5, 0, 1, 0, 7, 0, 0, 0]);
        // set name, NUL-terminated, padded
        assert_eq!(&msg[28..32], &[12, 0, 2, 0]);
        assert_eq!(&msg[32..40], b"cordon4\0");
        // address in network byte order, timeout big-endian
        let tail = &msg[40..];
        assert!(tail.windows(4).any(|w| w == [192, 0, 2, 10]));
        assert!(tail.windows(4).any(|w| w == 300u32.to_be_bytes()));
        assert_eq!(msg.len() % 4, 0);
    }

    #[test]
    fn ack_parsing_reports_errno_and_ipset_errors() {
        let ack = |seq: u32, code: i32| {
            let mut b = vec![0u8; 36];
            b[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
            b[8..12].copy_from_slice(&seq.to_ne_bytes());
            b[16..20].copy_from_slice(&code.to_ne_bytes());
            b
        };
        assert!(parse_ack(&ack(3, 0), 3).unwrap().is_ok());
        assert!(parse_ack(&ack(2, 0), 3).is_none());
        assert_eq!(parse_ack(&ack(3, -1), 3).unwrap().unwrap_err().raw_os_error(), Some(1));
        assert!(parse_ack(&ack(3, -4097), 3).unwrap().unwrap_err().to_string().contains("ipset error 4097"));
    }
}
