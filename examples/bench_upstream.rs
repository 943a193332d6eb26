//! A synthetic authoritative DNS server for the benchmarks (`bench/run.sh`): it answers every
//! A query with an address in 198.51.100.0/24 and every AAAA query with 2001:db8:1::<n>, where
//! n is the number in the first label (`n4711.bench.test` -> 2001:db8:1::1267), TTL 3600, so
//! distinct names give distinct admitted addresses. Usage: bench_upstream ADDR

use std::net::{Ipv4Addr, Ipv6Addr, UdpSocket};

use hickory_server::proto::op::{Message, MessageType};
use hickory_server::proto::rr::rdata::{A, AAAA};
use hickory_server::proto::rr::{RData, Record, RecordType};

fn main() {
    let addr = std::env::args().nth(1).expect("usage: bench_upstream ADDR");
    let sock = UdpSocket::bind(&addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let mut buf = [0u8; 4096];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
        let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
        let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
        reply.metadata.message_type = MessageType::Response;
        reply.metadata.authoritative = true;
        reply.metadata.recursion_desired = query.metadata.recursion_desired;
        reply.metadata.recursion_available = true;
        if let Some(q) = query.queries.first() {
            reply.add_query(q.clone());
            let label = q.name().iter().next().map(|l| String::from_utf8_lossy(l).into_owned()).unwrap_or_default();
            let number: u32 = label.trim_start_matches(|c: char| !c.is_ascii_digit()).parse().unwrap_or(0);
            let data = match q.query_type() {
                RecordType::A => Some(RData::A(A(Ipv4Addr::new(198, 51, 100, (number % 254 + 1) as u8)))),
                RecordType::AAAA => Some(RData::AAAA(AAAA(Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    1,
                    0,
                    0,
                    0,
                    (number >> 16) as u16,
                    number as u16,
                )))),
                _ => None,
            };
            if let Some(data) = data {
                reply.add_answer(Record::from_rdata(q.name().clone(), 3600, data));
            }
        }
        if let Ok(bytes) = reply.to_vec() {
            let _ = sock.send_to(&bytes, from);
        }
    }
}
