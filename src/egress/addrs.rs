//! Which addresses may be admitted for a public name. A public name that answers with a private,
//! loopback, link-local (169.254.0.0/16 is the cloud metadata service), CGNAT or ULA address is a
//! DNS-rebinding attempt or a misconfiguration: never admitted unless the operator lists the
//! range in `network.allow_cidrs`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::Cidr;

/// Ranges never admitted by default, with the reason shown in logs and `status`.
/// Sources: RFC 6890 (special-purpose registries), RFC 6598 (CGNAT), RFC 4193 (ULA).
const NEVER_ADMIT: [(Cidr, &str); 15] = [
    (Cidr::new(IpAddr::V4(Ipv4Addr::new(0, 0, 0, 0)), 8), "this-network"),
    (Cidr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)), 8), "private"),
    (Cidr::new(IpAddr::V4(Ipv4Addr::new(100, 64, 0, 0)), 10), "CGNAT"),
    (Cidr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8), "loopback"),
    (Cidr::new(IpAddr::V4(Ipv4Addr::new(169, 254, 0, 0)), 16), "link-local (metadata service)"),
    (Cidr::new(IpAddr::V4(Ipv4Addr::new(172, 16, 0, 0)), 12), "private"),
    (Cidr::new(IpAddr::V4(Ipv4Addr::new(192, 168, 0, 0)), 16), "private"),
    (Cidr::new(IpAddr::V4(Ipv4Addr::new(224, 0, 0, 0)), 4), "multicast"),
    (Cidr::new(IpAddr::V4(Ipv4Addr::new(240, 0, 0, 0)), 4), "reserved"),
    (Cidr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 128), "unspecified"),
    (Cidr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 128), "loopback"),
    (Cidr::new(IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)), 10), "link-local"),
    (Cidr::new(IpAddr::V6(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0)), 7), "unique-local (ULA)"),
    (Cidr::new(IpAddr::V6(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0)), 8), "multicast"),
    (Cidr::new(IpAddr::V6(Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0)), 10), "site-local"),
];

/// Why `ip` may not be admitted, or None when it may. IPv4-mapped IPv6 addresses are judged
/// by the IPv4 address they carry.
pub(crate) fn refusal(ip: IpAddr, allow_cidrs: &[Cidr]) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    if allow_cidrs.iter().any(|c| c.contains(ip)) {
        return None;
    }
    NEVER_ADMIT.iter().find(|(c, _)| c.contains(ip)).map(|(_, why)| *why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rebinding_truth_table() {
        let table = [
            ("8.8.8.8", None),
            ("192.0.2.10", None),
            ("2001:db8::10", None),
            ("2606:4700::1111", None),
            ("10.1.2.3", Some("private")),
            ("172.31.255.255", Some("private")),
            ("172.32.0.1", None),
            ("192.168.1.1", Some("private")),
            ("127.0.0.1", Some("loopback")),
            ("169.254.169.254", Some("link-local (metadata service)")),
            ("100.100.100.100", Some("CGNAT")),
            ("0.0.0.0", Some("this-network")),
            ("::1", Some("loopback")),
            ("fe80::1", Some("link-local")),
            ("fd00::1", Some("unique-local (ULA)")),
            ("::ffff:10.0.0.1", Some("private")),
            ("::ffff:8.8.8.8", None),
        ];
        for (addr, expect) in table {
            assert_eq!(refusal(ip(addr), &[]), expect, "{addr}");
        }
    }

    #[test]
    fn operator_listed_ranges_are_admitted() {
        let allow: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        assert_eq!(refusal(ip("10.9.8.7"), &allow), None);
        assert_eq!(refusal(ip("fd12::1"), &allow), None);
        assert_eq!(refusal(ip("192.168.0.1"), &allow), Some("private"));
    }
}
