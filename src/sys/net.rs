//! Sockets beyond std and tokio: the destination a redirected connection was really addressed
//! to, which the name-bound proxy needs, and the netlink socket the ipset client and the
//! journal's packet-log reader talk to the kernel through.
//!
//! `iptables -t nat ... -j REDIRECT` rewrites the destination to the local listener; conntrack
//! keeps the original, which `getsockopt(SO_ORIGINAL_DST)` (IPv4, at `SOL_IP`) and
//! `getsockopt(IP6T_SO_ORIGINAL_DST)` (IPv6, at `SOL_IPV6`; both option number 80, from
//! `linux/netfilter_ipv4.h` and `linux/netfilter_ipv6/ip6_tables.h`) return. nix wraps both
//! safely, as it does the netlink socket, so there is no `unsafe` here.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, getsockopt, recv, sendto, setsockopt,
    socket, sockopt,
};
use nix::sys::time::TimeVal;

/// A netlink socket to the kernel's netfilter subsystems (`NETLINK_NETFILTER`, netlink(7)):
/// whole messages out to the kernel, whole messages back. The messages themselves are the
/// caller's (`egress::ipset` builds and parses them).
pub(crate) struct NetfilterSocket {
    fd: OwnedFd,
}

impl NetfilterSocket {
    /// Opens the socket (close-on-exec). A receive that waits longer than `receive_timeout`
    /// fails with `EAGAIN` instead of blocking forever.
    pub(crate) fn open(receive_timeout: Duration) -> io::Result<NetfilterSocket> {
        let fd = socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkNetFilter)?;
        let timeout = TimeVal::new(receive_timeout.as_secs() as _, receive_timeout.subsec_micros() as _);
        setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)?;
        Ok(NetfilterSocket { fd })
    }

    /// Asks for a receive buffer of `bytes` (the kernel caps it at `net.core.rmem_max`, or
    /// takes it whole with CAP_NET_ADMIN: `SO_RCVBUFFORCE`, socket(7)).
    pub(crate) fn set_receive_buffer(&self, bytes: usize) -> io::Result<()> {
        setsockopt(&self.fd, sockopt::RcvBufForce, &bytes)
            .or_else(|_| setsockopt(&self.fd, sockopt::RcvBuf, &bytes))?;
        Ok(())
    }

    /// Sends one message to the kernel (netlink port 0).
    pub(crate) fn send(&self, msg: &[u8]) -> io::Result<()> {
        sendto(self.fd.as_raw_fd(), msg, &NetlinkAddr::new(0, 0), MsgFlags::empty())?;
        Ok(())
    }

    /// Receives one message into `buf`; returns its length.
    pub(crate) fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(recv(self.fd.as_raw_fd(), buf, MsgFlags::empty())?)
    }
}

/// The original destination of a connection accepted on a REDIRECT target. `local` is the
/// accepted socket's own address and says which family to ask for. On a connection that was not
/// redirected the kernel returns the socket's own local address (or ENOENT without conntrack).
pub(crate) fn original_destination<F: AsFd>(socket: &F, local: SocketAddr) -> io::Result<SocketAddr> {
    let fd = socket.as_fd();
    match local {
        SocketAddr::V4(_) => {
            let addr = getsockopt(&fd, sockopt::OriginalDst).map_err(io::Error::from)?;
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
                u16::from_be(addr.sin_port),
            )))
        }
        SocketAddr::V6(_) => {
            let addr = getsockopt(&fd, sockopt::Ip6tOriginalDst).map_err(io::Error::from)?;
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(addr.sin6_addr.s6_addr),
                u16::from_be(addr.sin6_port),
                addr.sin6_flowinfo,
                addr.sin6_scope_id,
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_destination_of_an_unredirected_connection_is_not_invented() {
        // Without a REDIRECT rule the kernel has nothing to report but the socket's own
        // address, or ENOENT when no conntrack entry exists; either is a refusal upstream.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let local = accepted.local_addr().unwrap();
        match original_destination(&accepted, local) {
            Ok(dst) => assert_eq!(dst, local),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}"),
        }
    }
}
