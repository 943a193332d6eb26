//! The firewall and the ipset netlink client against the real kernel, each test in a fresh
//! network namespace of its own thread (network namespaces are per thread; children spawned
//! from the thread inherit it), so the host's firewall is never touched.

mod harness;

use std::process::Command;

use cordon::egress::firewall::{self, Family, Plan};
use cordon::egress::ipset::Ipset;
use cordon::sys::effects::Host;

/// Runs `f` on a thread inside a new, empty network namespace.
fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    harness::require_root();
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        f()
    })
    .join()
    .expect("netns thread")
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn plan() -> Plan {
    Plan {
        listen: "127.0.0.53:53".parse().unwrap(),
        resolvers: vec!["192.0.2.1".parse().unwrap(), "127.0.0.11".parse().unwrap()],
        ports: vec![80, 443],
        extra_ports: vec![8443],
        raw_ports: vec![22],
        loopback_ports: vec![],
        proxy_port: Some(15443),
        log: true,
        metrics_port: None,
    }
}

#[test]
fn firewall_applies_atomically_and_twice_without_duplicating_the_jump() {
    in_fresh_netns(|| {
        firewall::apply(&plan(), 300, &Host).expect("apply");
        firewall::apply(&plan(), 300, &Host).expect("apply again");
        for (tool, family) in [("iptables", Family::V4), ("ip6tables", Family::V6)] {
            let output = sh(&format!("{tool} -S OUTPUT"));
            assert_eq!(
                output.lines().filter(|l| l.contains("CORDON")).collect::<Vec<_>>(),
                ["-A OUTPUT -j CORDON_OUTPUT"]
            );
            let nat_output = sh(&format!("{tool} -t nat -S OUTPUT"));
            assert_eq!(
                nat_output.lines().filter(|l| l.contains("CORDON")).collect::<Vec<_>>(),
                ["-A OUTPUT -j CORDON_NAT"]
            );
            let expected = firewall::render_rules(&plan(), family, "", "");
            for (table, chain) in [
                ("filter", "CORDON_OUTPUT"),
                ("filter", "CORDON_AGENT"),
                ("filter", "CORDON_ALLOW"),
                ("nat", "CORDON_NAT"),
            ] {
                let listed = sh(&format!("{tool} -t {table} -S {chain}"));
                let prefix = format!("-A {chain} ");
                assert_eq!(
                    listed.lines().filter(|l| l.starts_with(&prefix)).count(),
                    expected.lines().filter(|l| l.starts_with(&prefix)).count(),
                    "{listed}"
                );
            }
            assert!(firewall::counters(family, &Host).unwrap().len() > 5);
        }
        let sets = sh("ipset list -n");
        for name in ["cordon4", "cordon6", "cordon4-p8443", "cordon6-p8443", "cordon4-r22", "cordon6-r22"] {
            assert!(sets.lines().any(|l| l == name), "{sets}");
        }
    });
}

#[test]
fn ipset_netlink_adds_renews_and_deletes_entries_with_timeouts() {
    in_fresh_netns(|| {
        firewall::apply(&plan(), 300, &Host).expect("apply");
        let mut set = Ipset::open().unwrap();
        set.add("cordon4", "192.0.2.10".parse().unwrap(), 120).unwrap();
        set.add("cordon6", "2001:db8::10".parse().unwrap(), 90).unwrap();
        set.add("cordon4", "192.0.2.10".parse().unwrap(), 200).unwrap();
        let v4 = sh("ipset list cordon4");
        assert!(v4.contains("192.0.2.10 timeout 200") || v4.contains("192.0.2.10 timeout 199"), "{v4}");
        assert!(sh("ipset list cordon6").contains("2001:db8::10 timeout"));
        set.del("cordon4", "192.0.2.10".parse().unwrap()).unwrap();
        assert!(!sh("ipset list cordon4").contains("192.0.2.10"));
        let err = set.add("no-such-set", "192.0.2.1".parse().unwrap(), 10).unwrap_err();
        assert!(err.to_string().contains("No such file") || err.to_string().contains("ipset error"), "{err}");
        let err = set.add("cordon4", "2001:db8::1".parse().unwrap(), 10).unwrap_err();
        assert!(!err.to_string().is_empty(), "a v6 address in a v4 set is refused");
    });
}

/// The firewall a cordon of an earlier version left: its single owner jump, its chain, its
/// sets with another timeout, an admitted address, and a set for a port no longer configured.
fn leave_an_old_firewall() {
    sh("ipset create cordon4 hash:ip family inet timeout 900 maxelem 1048576");
    sh("ipset create cordon6 hash:ip family inet6 timeout 900 maxelem 1048576");
    sh("ipset create cordon4-p9999 hash:ip family inet timeout 900");
    sh("ipset create cordon6-p8443.new hash:ip family inet6 timeout 900");
    sh("ipset add cordon4 192.0.2.99");
    for tool in ["iptables", "ip6tables"] {
        sh(&format!("{tool} -N CORDON_AGENT"));
        sh(&format!("{tool} -A CORDON_AGENT -o lo -j ACCEPT"));
        sh(&format!("{tool} -I OUTPUT 1 -m owner --uid-owner 1-4294967294 -j CORDON_AGENT"));
        sh(&format!("{tool} -A OUTPUT -m owner --uid-owner 1-4294967294 -j CORDON_AGENT"));
    }
    sh("iptables -A CORDON_AGENT -m set --match-set cordon4-p9999 dst -j ACCEPT");
}

#[test]
fn applying_over_an_earlier_run_replaces_its_sets_chains_and_jumps_whatever_their_parameters() {
    in_fresh_netns(|| {
        leave_an_old_firewall();
        firewall::apply(&plan(), 300, &Host).expect("apply over the old firewall");
        for tool in ["iptables", "ip6tables"] {
            let output = sh(&format!("{tool} -S OUTPUT"));
            let ours: Vec<&str> = output.lines().filter(|l| l.contains("CORDON")).collect();
            assert_eq!(ours, ["-A OUTPUT -j CORDON_OUTPUT"], "exactly one jump, the new one");
            assert!(!sh(&format!("{tool} -S CORDON_AGENT")).contains("-o lo -j ACCEPT"), "old rules gone");
        }
        let sets = sh("ipset list -n");
        let mut names: Vec<&str> = sets.lines().collect();
        names.sort();
        assert_eq!(
            names,
            ["cordon4", "cordon4-p8443", "cordon4-r22", "cordon6", "cordon6-p8443", "cordon6-r22"],
            "stale and temporary sets gone"
        );
        let v4 = sh("ipset list cordon4");
        assert!(v4.contains("timeout 300"), "the new timeout: {v4}");
        assert!(!v4.contains("192.0.2.99"), "old admissions do not carry over: {v4}");

        // Once more with other parameters, as a restart after a config change does.
        let mut changed = plan();
        changed.extra_ports = vec![2222];
        firewall::apply(&changed, 60, &Host).expect("apply with changed parameters");
        let sets = sh("ipset list -n");
        assert!(!sets.contains("cordon4-p8443") && sets.contains("cordon6-p2222"), "{sets}");
        assert!(sh("ipset list cordon6").contains("timeout 60"));
        assert!(sh("iptables -t nat -S CORDON_NAT").contains("--dport 2222"));
        assert!(!sh("iptables -t nat -S CORDON_NAT").contains("--dport 8443"));

        // And with name binding turned off: the nat chain stays, empty, and the ports are
        // accepted by address again.
        let off = Plan { proxy_port: None, ..plan() };
        firewall::apply(&off, 60, &Host).expect("apply without name binding");
        for tool in ["iptables", "ip6tables"] {
            let nat = sh(&format!("{tool} -t nat -S"));
            assert!(!nat.contains("REDIRECT"), "{nat}");
            assert_eq!(nat.lines().filter(|l| *l == "-A OUTPUT -j CORDON_NAT").count(), 1, "{nat}");
            assert!(sh(&format!("{tool} -S CORDON_AGENT")).contains("--dports 80,443"));
        }
    });
}

#[test]
fn a_failed_apply_leaves_no_cordon_chain_jump_or_set() {
    in_fresh_netns(|| {
        let mut bad = plan();
        // No ports: the multiport match has no list and the IPv4 restore fails, after the sets
        // were made. (The IPv6 side failing after IPv4 succeeded is tests/egress.rs's
        // `a_runtime_without_ip6tables_fails_the_firewall_stage_and_leaves_no_partial_policy`.)
        bad.ports = vec![];
        let e = firewall::apply(&bad, 300, &Host).expect_err("a plan the kernel refuses");
        assert!(
            matches!(e, firewall::FirewallError::Failed { .. } | firewall::FirewallError::NoNetfilter { .. }),
            "{e}"
        );
        for tool in ["iptables", "ip6tables"] {
            let all = sh(&format!("{tool} -S; {tool} -t nat -S"));
            assert!(!all.contains("CORDON"), "{tool} kept a part of the policy: {all}");
        }
        assert_eq!(sh("ipset list -n").trim(), "", "sets left behind");
    });
}
