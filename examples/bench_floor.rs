//! The floor for the DNS benchmarks (`bench/run.sh`): a server that does no DNS work. It reads
//! the queries waiting on its socket with one `recvmmsg`, turns each into an answer in place
//! (the header's QR and RA set, one A record appended after the question), and sends them back
//! with one `sendmmsg`, pacing itself as cordon's loop does (`src/egress/dns/udp.rs`: after a
//! read that found a queue it naps 30 µs, after a full batch it reads again at once, otherwise
//! it waits in poll(2)). What it costs is what any UDP server costs on the machine: the system
//! calls and the kernel's path for each datagram. Its queries/s against dnsmasq's is the most
//! any server could show on that machine with that client. It answers only queries with no
//! record but the question (dnsperf's; not `dig`'s, which carry an OPT record unless +noedns).
//! Usage: bench_floor ADDR [NAP_MICROSECONDS] (default 30; 0 never naps: it waits in poll(2)
//! whenever a read finds the socket empty and reads again at once otherwise).

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::Duration;

const BATCH: usize = 16;
const SIZE: usize = 512;
/// The record appended to every answer: the question's name (a pointer to offset 12), type A,
/// class IN, TTL 3600, 198.51.100.1.
const ANSWER: [u8; 16] = [0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0x0e, 0x10, 0, 4, 198, 51, 100, 1];

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().expect("usage: bench_floor ADDR [NAP_MICROSECONDS]");
    let nap_us: u64 = args.next().map_or(30, |v| v.parse().expect("NAP_MICROSECONDS: a whole number"));
    let nap_time = Duration::from_micros(nap_us);
    let sock = UdpSocket::bind(&addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    sock.set_nonblocking(true).expect("non-blocking socket");
    // The same timer slack as cordon's loop, so a nap is 30 µs and not 80.
    // SAFETY: prctl(PR_SET_TIMERSLACK) takes an integer and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1_000 as libc::c_ulong) };
    let fd = sock.as_raw_fd();
    let mut bufs = vec![[0u8; SIZE]; BATCH];
    let mut addrs: Vec<libc::sockaddr_storage> = vec![zeroed(); BATCH];
    let mut iovs: Vec<libc::iovec> = vec![zeroed(); BATCH];
    let mut msgs: Vec<libc::mmsghdr> = vec![zeroed(); BATCH];
    let mut nap = false;
    loop {
        if nap {
            std::thread::sleep(nap_time);
        }
        for i in 0..BATCH {
            iovs[i] = libc::iovec { iov_base: bufs[i].as_mut_ptr().cast(), iov_len: SIZE };
            msgs[i].msg_hdr.msg_name = (&raw mut addrs[i]).cast();
            msgs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            msgs[i].msg_hdr.msg_iov = &raw mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at a buffer, an iovec and an address slot that live as
        // long as the call, with their true lengths.
        let n =
            unsafe { libc::recvmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, libc::MSG_DONTWAIT, std::ptr::null_mut()) };
        if n <= 0 {
            let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one pollfd, alive for the call.
            unsafe { libc::poll(&mut pfd, 1, -1) };
            nap = false;
            continue;
        }
        let n = n as usize;
        let mut out = 0;
        for i in 0..n {
            let len = msgs[i].msg_len as usize;
            // A query with no answer, authority or additional records, that fits once answered.
            let buf = &mut bufs[i];
            if len < 12 || len + ANSWER.len() > SIZE || buf[6..12] != [0; 6] {
                continue;
            }
            buf[2] |= 0x80;
            buf[3] = 0x80;
            buf[7] = 1;
            buf[len..len + ANSWER.len()].copy_from_slice(&ANSWER);
            iovs[out] = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: len + ANSWER.len() };
            msgs[out].msg_hdr.msg_name = (&raw mut addrs[i]).cast();
            msgs[out].msg_hdr.msg_namelen = msgs[i].msg_hdr.msg_namelen;
            msgs[out].msg_hdr.msg_iov = &raw mut iovs[out];
            msgs[out].msg_hdr.msg_iovlen = 1;
            out += 1;
        }
        let mut sent = 0;
        while sent < out {
            // SAFETY: as above; the first `out` headers are filled.
            let r = unsafe { libc::sendmmsg(fd, msgs[sent..].as_mut_ptr(), (out - sent) as u32, 0) };
            if r <= 0 {
                break;
            }
            sent += r as usize;
        }
        nap = nap_us > 0 && (2..BATCH).contains(&n);
    }
}

/// A plain C struct (sockaddr_storage, iovec, mmsghdr) with every byte zero.
fn zeroed<T: Copy>() -> T {
    // SAFETY: only called for C structs of integers and pointers, for which all zero bytes is a
    // valid value (null pointers, zero lengths).
    unsafe { std::mem::zeroed() }
}
