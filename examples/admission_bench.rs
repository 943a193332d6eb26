//! Admission latency (`bench/run.sh`): the cost that admit-before-release adds to an allowed
//! answer. In a fresh network namespace, admits 10,000 distinct addresses through cordon's
//! Admitter into real ipset sets (one netlink round trip each), then admits them again while
//! their entries are fresh (no kernel call), and prints p50/p99/max of each. Needs root.

use std::time::{Duration, Instant};

use cordon::config::allowlist::Reach;
use cordon::egress::admission::{Admitter, Lifetimes};
use cordon::egress::firewall::{self, Plan};

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p) as usize];
    (at(0.50), at(0.99), *v.last().unwrap())
}

fn main() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): run as root");
    let plan = Plan {
        listen: "127.0.0.53:53".parse().unwrap(),
        resolvers: vec!["192.0.2.1".parse().unwrap()],
        ports: vec![80, 443],
        extra_ports: vec![],
        raw_ports: vec![],
        loopback_ports: vec![],
        proxy_port: Some(cordon::config::DEFAULT_PROXY_PORT),
        log: false,
        metrics_port: None,
    };
    firewall::apply(&plan, 360, &cordon::sys::effects::Host).expect("firewall in the private namespace");
    let sets = cordon::egress::ipset::Ipset::open().unwrap();
    let lifetimes = Lifetimes { min_ttl: Duration::from_secs(60), grace: Duration::from_secs(300) };
    let admitter = Admitter::new(Box::new(sets), vec![], lifetimes);
    let reach = Reach { default_ports: true, ..Reach::default() };
    let n = 10_000u32;
    let addr =
        |i: u32| std::net::IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, (i >> 16) as u16, i as u16));
    for (label, pass) in [("new address (netlink add)", 0), ("fresh address (no kernel call)", 1)] {
        let mut times = Vec::with_capacity(n as usize);
        for i in 0..n {
            let t = Instant::now();
            admitter.admit("bench.test", addr(i), 3600, &reach).expect("admit");
            times.push(t.elapsed());
        }
        let (p50, p99, max) = percentiles(times);
        println!(
            "admission, {label}: p50 {:.1} us, p99 {:.1} us, max {:.1} us ({n} addresses, pass {pass})",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            max.as_secs_f64() * 1e6
        );
    }
}
