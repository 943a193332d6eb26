//! cordon's own UDP receive loop, on a thread of its own, reading the one UDP socket.
//! Denials and cache hits are answered inline, from the loop's own buffers: no task, no channel,
//! no allocation. Everything else (a miss, an unusual query) becomes a hickory `Request` handled
//! by the same [`Handler`] in a task on the runtime, its response encoded with the client's UDP
//! limit (TC when it does not fit) and sent from this socket. TCP stays hickory-server's.
//!
//! **Pacing.** When a read finds more than one query waiting, there is a queue: the loop then
//! naps [`NAP`] before it reads again, instead of waiting on the socket. Under load a query
//! arrives while the loop naps: the client's send wakes no one, and what arrived during the nap
//! is read in one `recvmmsg`. A server that waits on its socket is woken by every query that
//! finds it empty, and on a machine it shares with its clients (the agent, the tools it runs)
//! the client pays for that wake-up in its send. When a read finds one query or none, the loop
//! waits in poll(2) as before: at a light load a nap would cost more wake-ups than it saves,
//! and idle the loop costs nothing. A nap adds at most `NAP` to an answer. The socket is in no
//! epoll set, so tokio is woken neither by a query nor by a sent answer's freed buffer
//! (docs/benchmarks.md).

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hickory_server::net::NetError;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::MessageType;
use hickory_server::proto::rr::Record;
use hickory_server::proto::serialize::binary::BinEncoder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::Handler;
use super::cache::MAX_RESPONSE;
use crate::sys;
use crate::sys::net::{BATCH, Received};

/// The largest query read whole; longer datagrams are not DNS queries a resolver sends over
/// UDP and are dropped.
const QUERY_MAX: usize = 4096;

/// How long the loop naps after a read that found a queue. At 80,000 queries a second (the
/// bench's rate on 2 cores) a nap collects two or three; it is also the most it adds to an
/// answer's latency under load.
const NAP: Duration = Duration::from_micros(30);

/// The thread's timer slack: a nap is `NAP` plus this. The default, 50 µs, would more than
/// double it.
const TIMER_SLACK_NS: libc::c_ulong = 1_000;

/// Asks the UDP loop to stop: a flag, and an eventfd its wait in poll(2) includes.
pub(crate) struct Stop {
    flag: AtomicBool,
    event: EventFd,
}

impl Stop {
    pub(crate) fn new() -> std::io::Result<Arc<Stop>> {
        let event = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        Ok(Arc::new(Stop { flag: AtomicBool::new(false), event }))
    }

    /// The loop ends within one nap, or at once from its wait.
    pub(crate) fn stop(&self) {
        self.flag.store(true, Ordering::Release);
        if let Err(e) = self.event.write(1) {
            tracing::warn!("cannot wake the DNS UDP loop to stop it: {e}");
        }
    }

    fn requested(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }
}

/// Serves UDP queries on `socket` (non-blocking) until `stop` is requested; runs on a thread of
/// its own, handing the full path's requests to `runtime`. Under load the queries waiting on
/// the socket are read in one `recvmmsg` (up to `BATCH`), answered in turn, and the inline
/// answers sent in one `sendmmsg`: two system calls for a batch instead of two per query.
pub(crate) fn serve(
    socket: std::net::UdpSocket,
    handler: Arc<Handler>,
    runtime: tokio::runtime::Handle,
    stop: Arc<Stop>,
) {
    if let Err(e) = nix::sys::prctl::set_timerslack(TIMER_SLACK_NS) {
        tracing::debug!("cannot set the DNS UDP loop's timer slack: {e}");
    }
    let socket = Arc::new(socket);
    let mut queries = vec![0u8; BATCH * QUERY_MAX];
    // Inline answers are packed one after the other; a batch is flushed early when less than
    // the largest answer is left (rare: a typical answer is under 200 bytes).
    let mut answers = vec![0u8; 2 * MAX_RESPONSE];
    let mut got = [Received::default(); BATCH];
    let mut pending: Vec<(usize, usize, SocketAddr)> = Vec::with_capacity(BATCH);
    let mut next = Next::Wait;
    while !stop.requested() {
        match next {
            Next::Read => {}
            Next::Nap => std::thread::sleep(NAP),
            Next::Wait => wait_readable(&socket, &stop),
        }
        let n = match sys::net::recv_many(socket.as_fd(), &mut queries, QUERY_MAX, &mut got) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                next = Next::Wait;
                continue;
            }
            Err(e) => {
                tracing::debug!("cannot receive a DNS query: {e}");
                // Not expected on a bound UDP socket; a pause keeps a persistent error from
                // spinning the thread.
                std::thread::sleep(Duration::from_millis(10));
                next = Next::Wait;
                continue;
            }
        };
        // A full batch: more is waiting. Two or more: a queue, so nap. One: wait.
        next = match n {
            BATCH => Next::Read,
            2.. => Next::Nap,
            _ => Next::Wait,
        };
        let mut used = 0;
        for (i, received) in got[..n].iter().enumerate() {
            // What hickory-server drops too: nothing can be sent back there.
            let Some(src) = received.from.filter(|&src| answerable(src)) else {
                continue;
            };
            if received.truncated {
                continue;
            }
            let packet = &queries[i * QUERY_MAX..i * QUERY_MAX + received.len];
            if answers.len() - used < MAX_RESPONSE {
                flush(&socket, &answers, &mut pending);
                used = 0;
            }
            if let Some(len) = handler.answer_fast(packet, &mut answers[used..]) {
                pending.push((used, len, src));
                used += len;
                continue;
            }
            full_path(&socket, &handler, &runtime, packet, src);
        }
        flush(&socket, &answers, &mut pending);
    }
}

/// What the loop does before its next read.
#[derive(Clone, Copy)]
enum Next {
    Read,
    Nap,
    Wait,
}

/// Waits in poll(2) until a query arrives on `socket` or `stop` is requested.
fn wait_readable(socket: &std::net::UdpSocket, stop: &Stop) {
    let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN), PollFd::new(stop.event.as_fd(), PollFlags::POLLIN)];
    if let Err(e) = poll(&mut fds, PollTimeout::NONE)
        && e != nix::errno::Errno::EINTR
    {
        tracing::debug!("cannot wait for a DNS query: {e}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How long an answer waits for room in a full socket buffer before it is dropped (the client
/// asks again, as over any lossy UDP path).
const SEND_WAIT_MS: u16 = 100;

/// Sends the answers `pending` points at in `answers` (offset, length, client), in one
/// `sendmmsg` when the socket takes them all, and empties `pending`. When the kernel cannot
/// take one now the loop waits for room, up to `SEND_WAIT_MS`, and drops it if none comes; one
/// the kernel refuses is dropped. The rest follow.
fn flush(socket: &std::net::UdpSocket, answers: &[u8], pending: &mut Vec<(usize, usize, SocketAddr)>) {
    let mut batch: [(&[u8], SocketAddr); BATCH] = [(&[], UNSPECIFIED); BATCH];
    let mut from = 0;
    let mut waited = false;
    while from < pending.len() {
        let n = (pending.len() - from).min(BATCH);
        for (slot, &(at, len, dst)) in batch.iter_mut().zip(&pending[from..from + n]) {
            *slot = (&answers[at..at + len], dst);
        }
        match sys::net::send_many(socket.as_fd(), &batch[..n]) {
            Ok(sent) => {
                from += sent.max(1);
                waited = false;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && !waited => {
                waited = true;
                let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLOUT)];
                let _ = poll(&mut fds, PollTimeout::from(SEND_WAIT_MS));
            }
            Err(e) => {
                tracing::debug!("cannot send a DNS response to {}: {e}", batch[0].1);
                from += 1;
                waited = false;
            }
        }
    }
    pending.clear();
}

const UNSPECIFIED: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0));

/// Whether a response can go to `src`: not port 0, not the unspecified or broadcast address.
fn answerable(src: SocketAddr) -> bool {
    let ip_ok = match src.ip() {
        std::net::IpAddr::V4(a) => !a.is_unspecified() && !a.is_broadcast(),
        std::net::IpAddr::V6(a) => !a.is_unspecified(),
    };
    src.port() != 0 && ip_ok
}

/// Sends one answer from the full path: at once, or after waiting for room in the socket's
/// buffer (up to `SEND_WAIT_MS`, a millisecond at a time on the runtime's timer), or not at all.
async fn send(socket: &std::net::UdpSocket, bytes: &[u8], dst: SocketAddr) {
    for _ in 0..SEND_WAIT_MS {
        match socket.send_to(bytes, dst) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => tokio::time::sleep(Duration::from_millis(1)).await,
            Err(e) => {
                tracing::debug!("cannot send a DNS response to {dst}: {e}");
                return;
            }
            Ok(_) => return,
        }
    }
    tracing::debug!("cannot send a DNS response to {dst}: the socket's buffer stayed full");
}

/// Hands `packet` to the hickory path, in a task of its own on `runtime` (it may wait for
/// upstream).
fn full_path(
    socket: &Arc<std::net::UdpSocket>,
    handler: &Arc<Handler>,
    runtime: &tokio::runtime::Handle,
    packet: &[u8],
    src: SocketAddr,
) {
    match Request::from_bytes(packet.to_vec(), src, Protocol::Udp) {
        Ok(request) => {
            // Never answer a response: no reflection loops.
            if request.metadata.message_type == MessageType::Response {
                return;
            }
            let responder = UdpResponder { socket: socket.clone(), dst: src };
            let handler = handler.clone();
            runtime.spawn(async move {
                handler.handle_request::<_, TokioTime>(&request, responder).await;
            });
        }
        // A header that parses with a body that does not: FORMERR, as hickory-server answers.
        Err(_) if packet.len() >= 12 && packet[2] & 0x80 == 0 => {
            let mut header = [0u8; 12];
            header[..2].copy_from_slice(&packet[..2]);
            header[2] = 0x80 | (packet[2] & 0x78);
            header[3] = 1;
            if let Err(e) = socket.send_to(&header, src) {
                tracing::debug!("cannot send a DNS response to {src}: {e}");
            }
        }
        Err(_) => {}
    }
}

/// Sends a hickory response from cordon's socket, to the client that asked.
#[derive(Clone)]
struct UdpResponder {
    socket: Arc<std::net::UdpSocket>,
    dst: SocketAddr,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpResponder {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        // The handler's response carries the client's payload size (never below 512) in its
        // OPT record, or none: 512 (RFC 1035 §4.2.1). What does not fit is cut, with TC set.
        let limit = response.edns().map_or(512, |e| e.max_payload().max(512));
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(limit);
        let info = response.destructive_emit(&mut encoder)?;
        send(&self.socket, &bytes, self.dst).await;
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_response_goes_to_port_0_or_the_unspecified_or_broadcast_address() {
        for bad in ["192.0.2.1:0", "0.0.0.0:5353", "255.255.255.255:5353", "[::]:5353"] {
            assert!(!answerable(bad.parse().unwrap()), "{bad}");
        }
        assert!(answerable("127.0.0.1:5353".parse().unwrap()));
        assert!(answerable("[2001:db8::1]:5353".parse().unwrap()));
    }
}
