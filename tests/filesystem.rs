//! Filesystem lockdown by the real binary in a private mount namespace: tmpfs mounts, the
//! runtime's tmpfs adopted rather than mounted over, symlinks, and the read-only root, which
//! must stay a per-mount change that never reaches the host.

mod harness;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use cordon::mounts::{MountInfo, mount_at, parse_mountinfo};
use harness::{AGENT_UID, Mode, Phase, Sandbox, TestConfig};
use nix::sys::signal::Signal;

const BOOT: Duration = Duration::from_secs(20);

fn mounts_of(pid: i32) -> Vec<MountInfo> {
    parse_mountinfo(&fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap())
}

#[test]
fn tmpfs_is_mounted_with_configured_size_mode_owner_and_options() {
    let sb = Sandbox::new("tmpfs");
    let mut c = sb.start(&TestConfig::default(), &[], Mode::Pid1);
    c.wait_phase(Phase::Ready, BOOT);
    let mounts = mounts_of(c.reaper());
    for (rel, size, mode) in [("ws", 8 << 20, 0o755), ("home", 4 << 20, 0o700)] {
        let path = sb.path(rel);
        let m = mount_at(&mounts, &path).unwrap_or_else(|| panic!("no mount at {}", path.display()));
        assert_eq!(m.fstype, "tmpfs");
        assert!(m.has("rw") && m.has("nosuid") && m.has("nodev"), "{:?}", m.options);
        assert_eq!(m.tmpfs_size(), Some(size), "{:?}", m.super_options);
        let meta = fs::metadata(c.inside(&path)).unwrap();
        assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (AGENT_UID, AGENT_UID, mode), "{rel}");
    }
    // Nothing of it is visible on the host.
    let host = parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").unwrap());
    assert!(mount_at(&host, &sb.path("ws")).is_none(), "the tmpfs leaked to the host");
    c.kill(c.reaper(), Signal::SIGTERM);
    c.wait_exit(Duration::from_secs(20));
}

#[test]
fn a_tmpfs_at_the_agents_home_without_an_owner_is_the_agents_to_write() {
    let sb = Sandbox::new("homeowner");
    // What a user migrating from the replaced system writes: no owner, no mode.
    let cfg = sb
        .render_config(&TestConfig::default())
        .replace("path = \"~\"\nsize = \"4M\"\nmode = \"0700\"\nowner = \"agent\"", "path = \"~\"\nsize = \"4M\"");
    assert!(!cfg.contains("size = \"4M\"\nmode"), "the home tmpfs still names its owner:\n{cfg}");
    let mut c = sb.launch(&sb.write_file("cordon.toml", &cfg), &[], Mode::Pid1, "");
    c.wait_phase(Phase::Ready, BOOT);
    let meta = fs::metadata(c.inside(&sb.path("home"))).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (AGENT_UID, 0o755));
    let out = c.agent_exec(&format!("touch {0}/written && mkdir {0}/.config", sb.path("home").display()));
    assert!(out.status.success(), "the agent cannot write its home: {}", String::from_utf8_lossy(&out.stderr));
    c.kill(c.reaper(), Signal::SIGTERM);
    c.wait_exit(Duration::from_secs(20));
}

#[test]
fn runtime_provided_tmpfs_is_verified_and_adopted_not_mounted_over() {
    let sb = Sandbox::new("adopt");
    // As `docker run --tmpfs` would: a 3M tmpfs without nodev, before the entrypoint starts.
    let ws = sb.path("ws");
    let before = format!("mount -t tmpfs -o size=3m,nosuid tmpfs {}", ws.display());
    let mut c = sb.launch(&sb.write_config(&TestConfig::default()), &[], Mode::Pid1, &before);
    c.wait_phase(Phase::Ready, BOOT);
    let mounts = mounts_of(c.reaper());
    let at_ws: Vec<&MountInfo> = mounts.iter().filter(|m| m.mount_point == ws).collect();
    assert_eq!(at_ws.len(), 1, "cordon mounted over the runtime's tmpfs: {at_ws:?}");
    assert_eq!(at_ws[0].tmpfs_size(), Some(3 << 20), "the runtime's size must be kept");
    assert!(at_ws[0].has("nodev"), "cordon adds nodev where it can: {:?}", at_ws[0].options);
    let meta = fs::metadata(c.inside(&ws)).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (AGENT_UID, 0o755));
    let detail = c.state().unwrap().stages.iter().find(|s| s.name == "filesystem").unwrap().detail.clone().unwrap();
    assert!(detail.contains("1 provided by the runtime"), "{detail}");
    c.kill(c.reaper(), Signal::SIGTERM);
    c.wait_exit(Duration::from_secs(20));
}

#[test]
fn a_volume_where_a_tmpfs_is_configured_fails_the_boot_with_a_hint() {
    let sb = Sandbox::new("volume");
    let ws = sb.path("ws");
    let before = format!("mount --bind {} {}", sb.path("host").display(), ws.display());
    let cfg = TestConfig { on_boot_failure: "hold", ..Default::default() };
    let mut c = sb.launch(&sb.write_config(&cfg), &[], Mode::Pid1, &before);
    let state = c.wait_phase(Phase::Failed, BOOT);
    let fs_stage = state.stages.iter().find(|s| s.name == "filesystem").unwrap();
    assert!(fs_stage.error.as_deref().unwrap().contains("not a tmpfs"), "{fs_stage:?}");
    assert!(fs_stage.hint.as_deref().unwrap().contains("filesystem.writable"), "{fs_stage:?}");
    assert!(state.agent.is_none(), "the agent must not start after a failed boot");
    c.kill(c.reaper(), Signal::SIGTERM);
    assert_eq!(c.wait_exit(Duration::from_secs(20)).code(), Some(1));
}

#[test]
fn root_is_read_only_inside_and_still_writable_on_the_host() {
    let sb = Sandbox::new("rootro");
    let mut c = sb.start(&TestConfig::default(), &[], Mode::Pid1);
    c.wait_phase(Phase::Ready, BOOT);
    let probe = sb.path("host/probe");
    let out = c.exec(&format!("touch {}", probe.display()));
    assert!(!out.status.success(), "a write to the root succeeded inside");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Read-only file system"), "{out:?}");
    let out = c.exec("touch /cordon-root-probe");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Read-only file system"), "{out:?}");
    // The tmpfs mounts stay writable, for root and the agent.
    assert!(c.exec(&format!("touch {}", sb.path("ws/ok").display())).status.success());
    let mounts = mounts_of(c.reaper());
    assert!(mount_at(&mounts, Path::new("/")).unwrap().read_only());
    // The host's root mount is untouched.
    fs::write(&probe, "host").expect("the host's filesystem became read-only");
    let host = parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").unwrap());
    assert!(!mount_at(&host, Path::new("/")).unwrap().read_only());
    let stage = c.state().unwrap().stages.into_iter().find(|s| s.name == "readonly_root").unwrap();
    assert!(stage.detail.unwrap().contains("EROFS"));
    c.kill(c.reaper(), Signal::SIGTERM);
    c.wait_exit(Duration::from_secs(20));
}

#[test]
fn symlinks_hidden_by_the_tmpfs_are_recreated_owned_by_the_agent() {
    let sb = Sandbox::new("links");
    let cfg = TestConfig {
        extra: "[filesystem]\nlinks = [{ path = \"~/.local/bin/tool\", target = \"/bin/true\" }]\n".into(),
        ..Default::default()
    };
    let mut c = sb.start(&cfg, &[], Mode::Pid1);
    c.wait_phase(Phase::Ready, BOOT);
    let link = c.inside(&sb.path("home/.local/bin/tool"));
    assert_eq!(fs::read_link(&link).unwrap(), Path::new("/bin/true"));
    let parent = fs::metadata(c.inside(&sb.path("home/.local"))).unwrap();
    assert_eq!(parent.uid(), AGENT_UID, "directories created for a link belong to the tmpfs owner");
    assert_eq!(fs::symlink_metadata(&link).unwrap().uid(), AGENT_UID);
    c.kill(c.reaper(), Signal::SIGTERM);
    c.wait_exit(Duration::from_secs(20));
}

#[test]
fn readonly_root_can_be_turned_off() {
    let sb = Sandbox::new("rwroot");
    let cfg = TestConfig { extra: "[filesystem]\nreadonly_root = false\n".into(), ..Default::default() };
    let mut c = sb.start(&cfg, &[], Mode::Pid1);
    let state = c.wait_phase(Phase::Ready, BOOT);
    let stage = state.stages.iter().find(|s| s.name == "readonly_root").unwrap();
    assert_eq!(stage.outcome, cordon::state::report::Outcome::Skipped);
    assert!(c.exec(&format!("touch {}", sb.path("host/probe").display())).status.success());
    c.kill(c.reaper(), Signal::SIGTERM);
    c.wait_exit(Duration::from_secs(20));
}

/// What `docker run --read-only` leaves: every directory mount read-only (memory and kernel
/// filesystems aside), the runtime's file bind mounts read-write.
const RUNTIME_READ_ONLY: &str = r#"findmnt -rn -o TARGET,FSTYPE | while read -r t f; do
  case "$f" in tmpfs|proc|sysfs|devtmpfs|devpts|mqueue|cgroup|cgroup2|nsfs|securityfs|debugfs|tracefs|bpf|pstore|fusectl|configfs|hugetlbfs|binfmt_misc|autofs) continue;; esac
  case "$t" in /proc*|/sys*|/dev*) continue;; esac
  if [ -d "$t" ]; then mount -o remount,bind,ro "$t" 2>/dev/null || true; fi
done"#;

#[test]
fn with_the_runtime_doing_the_filesystem_part_cordon_verifies_without_sys_admin() {
    // Docker `--read-only --tmpfs ...` with only NET_ADMIN: the runtime mounts the tmpfs and
    // makes the root read-only; its file bind mounts (resolv.conf here) stay read-write.
    let sb = Sandbox::new("runtime-ro");
    let (ws, home) = (sb.path("ws"), sb.path("home"));
    let text = sb
        .render_config(&TestConfig::default())
        .replace(&format!("state_dir = \"{}\"", sb.path("state").display()), "state_dir = \"/run/cordon\"");
    let before = format!(
        "mount -t tmpfs -o size=3m,nosuid,nodev tmpfs {}\nmount -t tmpfs -o size=3m,nosuid,nodev tmpfs {}\n{RUNTIME_READ_ONLY}\nWRAP='setpriv --bounding-set=-sys_admin --inh-caps=-sys_admin --'",
        ws.display(),
        home.display()
    );
    let mut c = sb.launch(&sb.write_file("runtime.toml", &text), &[], Mode::Pid1, &before);
    let state = c.wait_phase(Phase::Ready, BOOT);
    let fs_detail = state.stages.iter().find(|s| s.name == "filesystem").unwrap().detail.clone().unwrap();
    assert!(fs_detail.contains("2 provided by the runtime"), "{fs_detail}");
    assert!(
        state.stages.iter().find(|s| s.name == "readonly_root").unwrap().outcome == cordon::state::report::Outcome::Ok
    );
    assert!(
        state.warnings.iter().any(|w| w.contains("/etc/resolv.conf stays a writable bind mount")),
        "{:?}",
        state.warnings
    );
    let out = c.agent_exec("echo nameserver 192.0.2.66 >> /etc/resolv.conf");
    assert!(!out.status.success(), "the agent wrote resolv.conf");
    let out = c.exec("touch /cordon-probe");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Read-only file system"), "{out:?}");
    c.kill(c.reaper(), Signal::SIGTERM);
    assert_eq!(c.wait_exit(BOOT).code(), Some(0));
}

#[test]
fn without_sys_admin_a_writable_root_fails_closed_with_the_runtime_hint() {
    let sb = Sandbox::new("nosysadmin");
    let text = sb
        .render_config(&TestConfig { on_boot_failure: "hold", ..TestConfig::default() })
        .replace(&format!("state_dir = \"{}\"", sb.path("state").display()), "state_dir = \"/run/cordon\"");
    let before = format!(
        "mount -t tmpfs -o size=3m tmpfs {}\nmount -t tmpfs -o size=3m tmpfs {}\nWRAP='setpriv --bounding-set=-sys_admin --inh-caps=-sys_admin --'",
        sb.path("ws").display(),
        sb.path("home").display()
    );
    let mut c = sb.launch(&sb.write_file("runtime.toml", &text), &[], Mode::Pid1, &before);
    let state = c.wait_phase(Phase::Failed, BOOT);
    let failed = state.stages.last().unwrap();
    assert_eq!(failed.name, "readonly_root", "{state:?}");
    assert!(failed.hint.as_deref().unwrap().contains("docker --read-only"), "{failed:?}");
    c.kill(c.reaper(), Signal::SIGTERM);
    assert_eq!(c.wait_exit(BOOT).code(), Some(1));
}
