//! The floor for the DNS benchmarks (`bench/run.sh`): a server that does no DNS work. It reads
//! the queries waiting on its socket with one `recvmmsg`, turns each into an answer in place
//! (the header's QR and RA set, one A record appended after the question), and sends them back
//! with one `sendmmsg`, through cordon's own batch calls (`sys::net`), pacing itself as
//! cordon's loop does (`src/egress/dns/udp.rs`: after a read that found a queue it naps 30 µs,
//! after a full batch it reads again at once, otherwise it waits in poll(2)). What it costs is
//! what any UDP server costs on the machine: the system calls and the kernel's path for each
//! datagram. Its queries/s against dnsmasq's is the most any server could show on that machine
//! with that client. It answers only queries with no record but the question (dnsperf's; not
//! `dig`'s, which carry an OPT record unless +noedns).
//! Usage: bench_floor ADDR [NAP_MICROSECONDS] (default 30; 0 never naps: it waits in poll(2)
//! whenever a read finds the socket empty and reads again at once otherwise).

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::time::Duration;

use cordon::sys::net::{BATCH, Received, recv_many, send_many};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

const SIZE: usize = 512;
const UNSPECIFIED: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0));
/// The record appended to every answer: the question's name (a pointer to offset 12), type A,
/// class IN, TTL 3600, 198.51.100.1.
const ANSWER: [u8; 16] = [0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0x0e, 0x10, 0, 4, 198, 51, 100, 1];

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().expect("usage: bench_floor ADDR [NAP_MICROSECONDS]");
    let nap_us: u64 = args.next().map_or(30, |v| v.parse().expect("NAP_MICROSECONDS: a whole number"));
    let nap = Duration::from_micros(nap_us);
    let sock = UdpSocket::bind(&addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    sock.set_nonblocking(true).expect("non-blocking socket");
    // The same timer slack as cordon's loop, so a nap is 30 µs and not 80.
    nix::sys::prctl::set_timerslack(1_000).expect("timer slack");
    let mut bufs = vec![0u8; BATCH * SIZE];
    let mut got = [Received::default(); BATCH];
    let mut napping = false;
    loop {
        if napping {
            std::thread::sleep(nap);
        }
        let n = match recv_many(sock.as_fd(), &mut bufs, SIZE, &mut got) {
            Ok(n) if n > 0 => n,
            _ => {
                let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::NONE);
                napping = false;
                continue;
            }
        };
        // Each answer made in place, then the batch of them: (its chunk, its length, the client).
        let mut made = [(0, 0, UNSPECIFIED); BATCH];
        let mut count = 0;
        for (i, (chunk, received)) in bufs.chunks_exact_mut(SIZE).zip(&got[..n]).enumerate() {
            let len = received.len;
            // A query with no answer, authority or additional records, that fits once answered.
            let (Some(from), false) = (received.from, received.truncated) else { continue };
            if len < 12 || len + ANSWER.len() > SIZE || chunk[6..12] != [0; 6] {
                continue;
            }
            chunk[2] |= 0x80;
            chunk[3] = 0x80;
            chunk[7] = 1;
            chunk[len..len + ANSWER.len()].copy_from_slice(&ANSWER);
            made[count] = (i, len + ANSWER.len(), from);
            count += 1;
        }
        let mut answers: [(&[u8], SocketAddr); BATCH] = [(&[], UNSPECIFIED); BATCH];
        for (slot, &(i, len, to)) in answers.iter_mut().zip(&made[..count]) {
            *slot = (&bufs[i * SIZE..i * SIZE + len], to);
        }
        let answers = &answers[..count];
        let mut sent = 0;
        while sent < answers.len() {
            match send_many(sock.as_fd(), &answers[sent..]) {
                Ok(k) if k > 0 => sent += k,
                _ => break,
            }
        }
        napping = nap_us > 0 && (2..BATCH).contains(&n);
    }
}
