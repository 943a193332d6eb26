//! cordon's own UDP receive loop, one per runtime worker, all reading the one UDP socket.
//! Denials and cache hits are answered inline, from the loop's own buffers: no task, no channel,
//! no allocation. Everything else (a miss, an unusual query) becomes a hickory `Request` handled
//! by the same [`Handler`] in a task of its own, its response encoded with the client's UDP
//! limit (TC when it does not fit) and sent from this socket. TCP stays hickory-server's.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;

use hickory_server::net::NetError;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::MessageType;
use hickory_server::proto::rr::Record;
use hickory_server::proto::serialize::binary::BinEncoder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::Handler;
use super::cache::MAX_RESPONSE;
use crate::sys;
use crate::sys::net::{BATCH, Received};

/// The largest query read whole; longer datagrams are not DNS queries a resolver sends over
/// UDP and are dropped.
const QUERY_MAX: usize = 4096;

/// Serves UDP queries on `socket` until the task is dropped. Under load the queries waiting on
/// the socket are read in one `recvmmsg` (up to `BATCH`), answered in turn, and the inline
/// answers sent in one `sendmmsg`: two system calls for a batch instead of two per query.
pub(crate) async fn serve(socket: UdpSocket, handler: Arc<Handler>) {
    let socket = Arc::new(socket);
    // On the heap once, not in the task's future.
    let mut queries = vec![0u8; BATCH * QUERY_MAX];
    // Inline answers are packed one after the other; a batch is flushed early when less than
    // the largest answer is left (rare: a typical answer is under 200 bytes).
    let mut answers = vec![0u8; 2 * MAX_RESPONSE];
    let mut got = [Received::default(); BATCH];
    let mut pending: Vec<(usize, usize, SocketAddr)> = Vec::with_capacity(BATCH);
    loop {
        let n = match socket.readable().await {
            Ok(()) => match socket
                .try_io(Interest::READABLE, || sys::net::recv_many(socket.as_fd(), &mut queries, QUERY_MAX, &mut got))
            {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    receive_failed(&e).await;
                    continue;
                }
            },
            Err(e) => {
                receive_failed(&e).await;
                continue;
            }
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
                flush(&socket, &answers, &mut pending).await;
                used = 0;
            }
            if let Some(len) = handler.answer_fast(packet, &mut answers[used..]) {
                pending.push((used, len, src));
                used += len;
                continue;
            }
            full_path(&socket, &handler, packet, src).await;
        }
        flush(&socket, &answers, &mut pending).await;
    }
}

/// Not expected on a bound UDP socket; a pause keeps a persistent error from spinning a worker.
async fn receive_failed(e: &std::io::Error) {
    tracing::debug!("cannot receive a DNS query: {e}");
    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
}

/// Sends the answers `pending` points at in `answers` (offset, length, client), in one
/// `sendmmsg` when the socket takes them all, and empties `pending`. One the kernel refuses
/// or cannot take now goes out alone, waiting for the socket: the rest follow.
async fn flush(socket: &UdpSocket, answers: &[u8], pending: &mut Vec<(usize, usize, SocketAddr)>) {
    let mut batch: [(&[u8], SocketAddr); BATCH] = [(&[], UNSPECIFIED); BATCH];
    let mut from = 0;
    while from < pending.len() {
        let n = (pending.len() - from).min(BATCH);
        for (slot, &(at, len, dst)) in batch.iter_mut().zip(&pending[from..from + n]) {
            *slot = (&answers[at..at + len], dst);
        }
        let sent = socket.try_io(Interest::WRITABLE, || sys::net::send_many(socket.as_fd(), &batch[..n]));
        match sent {
            Ok(sent) if sent == n => from += n,
            Ok(sent) => {
                let (bytes, dst) = batch[sent];
                send(socket, bytes, dst).await;
                from += sent + 1;
            }
            Err(_) => {
                send(socket, batch[0].0, batch[0].1).await;
                from += 1;
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

async fn send(socket: &UdpSocket, bytes: &[u8], dst: SocketAddr) {
    let sent = match socket.try_send_to(bytes, dst) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => socket.send_to(bytes, dst).await,
        other => other,
    };
    if let Err(e) = sent {
        tracing::debug!("cannot send a DNS response to {dst}: {e}");
    }
}

/// Hands `packet` to the hickory path, in a task of its own (it may wait for upstream).
async fn full_path(socket: &Arc<UdpSocket>, handler: &Arc<Handler>, packet: &[u8], src: SocketAddr) {
    match Request::from_bytes(packet.to_vec(), src, Protocol::Udp) {
        Ok(request) => {
            // Never answer a response: no reflection loops.
            if request.metadata.message_type == MessageType::Response {
                return;
            }
            let responder = UdpResponder { socket: socket.clone(), dst: src };
            let handler = handler.clone();
            tokio::spawn(async move {
                handler.handle_request::<_, TokioTime>(&request, responder).await;
            });
        }
        // A header that parses with a body that does not: FORMERR, as hickory-server answers.
        Err(_) if packet.len() >= 12 && packet[2] & 0x80 == 0 => {
            let mut header = [0u8; 12];
            header[..2].copy_from_slice(&packet[..2]);
            header[2] = 0x80 | (packet[2] & 0x78);
            header[3] = 1;
            send(socket, &header, src).await;
        }
        Err(_) => {}
    }
}

/// Sends a hickory response from cordon's socket, to the client that asked.
#[derive(Clone)]
struct UdpResponder {
    socket: Arc<UdpSocket>,
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
