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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
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

/// Appends one netlink attribute (type, payload), padded to 4 bytes (`linux/netlink.h`,
/// `NLA_ALIGN`): how the ipset and packet-log requests are built.
pub(crate) fn netlink_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
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

/// How many datagrams [`recv_many`] and [`send_many`] move in one system call at most.
pub const BATCH: usize = 16;

/// One datagram [`recv_many`] received: its length in its buffer and where it came from (None:
/// an address family other than IPv4 or IPv6). `truncated`: it was longer than its buffer
/// (`MSG_TRUNC`), and only the buffer's length of it was kept.
#[derive(Debug, Clone, Copy, Default)]
pub struct Received {
    pub len: usize,
    pub from: Option<SocketAddr>,
    pub truncated: bool,
}

/// Receives up to [`BATCH`] datagrams waiting on the UDP socket `fd`, without waiting
/// (recvmmsg(2) with `MSG_DONTWAIT`): datagram `i` into `bufs.chunks_mut(size).nth(i)`, its
/// length and source into `got[i]`. Returns how many; `WouldBlock` when none is waiting.
pub fn recv_many(fd: BorrowedFd<'_>, bufs: &mut [u8], size: usize, got: &mut [Received; BATCH]) -> io::Result<usize> {
    // SAFETY: all-zero is a valid value of these plain C structs (integers and null pointers).
    let mut addrs: [libc::sockaddr_storage; BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    let mut iovs = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; BATCH];
    let mut n = 0;
    for (chunk, ((iov, hdr), addr)) in
        bufs.chunks_exact_mut(size.max(1)).zip(iovs.iter_mut().zip(hdrs.iter_mut()).zip(addrs.iter_mut()))
    {
        *iov = libc::iovec { iov_base: chunk.as_mut_ptr().cast(), iov_len: chunk.len() };
        hdr.msg_hdr.msg_name = (addr as *mut libc::sockaddr_storage).cast();
        hdr.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        hdr.msg_hdr.msg_iov = iov;
        hdr.msg_hdr.msg_iovlen = 1;
        n += 1;
    }
    // SAFETY: the first `n` headers point at `n` distinct, live chunks of `bufs` (exclusively
    // borrowed for this call) and at `n` sockaddr_storage of the right length, all outliving
    // the call; the kernel writes at most `iov_len` and `msg_namelen` bytes into them. Nothing
    // is kept after the call returns.
    let got_n = unsafe {
        libc::recvmmsg(fd.as_raw_fd(), hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT, std::ptr::null_mut())
    };
    if got_n < 0 {
        return Err(io::Error::last_os_error());
    }
    let got_n = got_n as usize;
    for i in 0..got_n {
        got[i] = Received {
            len: (hdrs[i].msg_len as usize).min(size),
            from: from_storage(&addrs[i], hdrs[i].msg_hdr.msg_namelen),
            truncated: hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        };
    }
    Ok(got_n)
}

/// Sends `msgs` (at most [`BATCH`]: the rest is left) from the UDP socket `fd` in one system
/// call, without waiting (sendmmsg(2) with `MSG_DONTWAIT`). Returns how many the kernel took,
/// from the first: fewer than asked means the next one failed or would block (the error, when
/// none was taken).
pub fn send_many(fd: BorrowedFd<'_>, msgs: &[(&[u8], SocketAddr)]) -> io::Result<usize> {
    // SAFETY: all-zero is a valid value of these plain C structs (integers and null pointers).
    let mut addrs: [libc::sockaddr_storage; BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    let mut iovs = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; BATCH];
    let n = msgs.len().min(BATCH);
    for i in 0..n {
        let (bytes, dst) = msgs[i];
        // The kernel only reads through iov_base on a send; the pointer is *mut by C's type.
        iovs[i] = libc::iovec { iov_base: bytes.as_ptr().cast_mut().cast(), iov_len: bytes.len() };
        hdrs[i].msg_hdr.msg_namelen = to_storage(dst, &mut addrs[i]);
        hdrs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
        hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
    }
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: the first `n` headers point at `n` live iovecs over the callers' byte slices
    // (only read by the kernel on a send) and at `n` filled sockaddr_storage of the stated
    // lengths, all outliving the call; the kernel writes only `msg_len` of each header.
    let sent = unsafe { libc::sendmmsg(fd.as_raw_fd(), hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

/// The IPv4 or IPv6 socket address in `storage` (as recvmmsg filled it, `len` bytes).
fn from_storage(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match i32::from(storage.ss_family) {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, which is smaller than
            // sockaddr_storage, suitably aligned (storage's alignment is the strictest), and
            // plain data whatever its bytes.
            let sin = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for a sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Writes `addr` into `storage` as a sockaddr_in or sockaddr_in6; returns its length.
fn to_storage(addr: SocketAddr, storage: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_in is smaller than sockaddr_storage, suitably aligned, plain data.
            let sin = unsafe { &mut *(storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr { s_addr: u32::from(*a.ip()).to_be() };
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for a sockaddr_in6.
            let sin6 = unsafe { &mut *(storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            sin6.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
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

    #[test]
    fn socket_addresses_survive_the_trip_through_sockaddr_storage() {
        for text in ["192.0.2.1:53", "[2001:db8::1]:5353"] {
            let addr: SocketAddr = text.parse().unwrap();
            // SAFETY: all-zero is a valid sockaddr_storage.
            let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let len = to_storage(addr, &mut storage);
            assert_eq!(from_storage(&storage, len), Some(addr));
        }
    }

    #[test]
    fn a_batch_of_datagrams_goes_out_and_comes_back_in_one_call_each() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = server.local_addr().unwrap();
        let msgs: Vec<(&[u8], SocketAddr)> = vec![(b"one", to), (b"two!", to), (b"three", to)];
        assert_eq!(send_many(client.as_fd(), &msgs).unwrap(), 3);
        let mut bufs = vec![0u8; 4 * BATCH];
        let mut got = [Received::default(); BATCH];
        let mut seen = Vec::new();
        // Bounded: loopback delivers at once, but give it a few tries.
        for _ in 0..100 {
            match recv_many(server.as_fd(), &mut bufs, 4, &mut got) {
                Ok(n) => seen.extend(
                    got[..n]
                        .iter()
                        .enumerate()
                        .map(|(i, r)| (bufs[i * 4..i * 4 + r.len].to_vec(), r.from, r.truncated)),
                ),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("recvmmsg: {e}"),
            }
            if seen.len() == 3 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let from = Some(client.local_addr().unwrap());
        assert_eq!(
            seen,
            [(b"one".to_vec(), from, false), (b"two!".to_vec(), from, false), (b"thre".to_vec(), from, true)]
        );
        let none = recv_many(server.as_fd(), &mut bufs, 4, &mut got);
        assert_eq!(none.unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }
}
