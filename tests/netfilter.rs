//! The firewall and the ipset netlink client against the real kernel, each test in a fresh
//! network namespace of its own thread (network namespaces are per thread; children spawned
//! from the thread inherit it), so the host's firewall is never touched.

mod harness;

use std::process::Command;

use cordon::egress::firewall::{self, Family, Plan};
use cordon::egress::ipset::Ipset;

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
        upstreams: vec!["192.0.2.1:53".parse().unwrap()],
        ports: vec![80, 443],
        extra_ports: vec![8443],
    }
}

#[test]
fn firewall_applies_atomically_and_twice_without_duplicating_the_jump() {
    in_fresh_netns(|| {
        firewall::apply(&plan(), 300).expect("apply");
        firewall::apply(&plan(), 300).expect("apply again");
        for (tool, family) in [("iptables", Family::V4), ("ip6tables", Family::V6)] {
            let output = sh(&format!("{tool} -S OUTPUT"));
            assert_eq!(output.matches("-j CORDON_AGENT").count(), 1, "{output}");
            let chain = sh(&format!("{tool} -S CORDON_AGENT"));
            let expected = firewall::render_rules(&plan(), family);
            assert_eq!(
                chain.lines().filter(|l| l.starts_with("-A")).count(),
                expected.lines().filter(|l| l.starts_with("-A")).count(),
                "{chain}"
            );
            assert!(firewall::counters(family).unwrap().len() > 5);
        }
        let sets = sh("ipset list -n");
        for name in ["cordon4", "cordon6", "cordon4-p8443", "cordon6-p8443"] {
            assert!(sets.lines().any(|l| l == name), "{sets}");
        }
    });
}

#[test]
fn ipset_netlink_adds_renews_and_deletes_entries_with_timeouts() {
    in_fresh_netns(|| {
        firewall::apply(&plan(), 300).expect("apply");
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
