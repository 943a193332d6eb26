//! Docker for the image tests: the engine (started by `scripts/docker-engine.sh` when none
//! answers, without touching the host's network or firewall), the image (built once per test
//! binary by `scripts/build-image.sh`, as a user builds it), and containers whose network is
//! joined by veth to a world namespace of the test's own.
//!
//! Docker cannot put a container into a named network namespace, so each [`Pod`] starts a
//! `--network none` holder container, moves one end of a veth pair into the holder's network
//! namespace and the other into a fresh world namespace, and runs cordon's container with
//! `--network container:<holder>`. That container also shares the holder's resolv.conf.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{add_world_addr, configure_inner_end, configure_world_end, require_root, run};

/// The tag the tests build and run; the same one `scripts/build-image.sh` and the quick start use.
pub const IMAGE: &str = "cordon:dev";

/// The agent user the image creates.
pub const IMAGE_AGENT_UID: u32 = 1000;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Makes sure the engine answers and the image is built from this tree (once per test binary;
/// Docker's layer cache makes a rebuild of an unchanged tree quick). Fails, never skips, when
/// either is impossible.
pub fn image() -> &'static str {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    require_root();
    let built = BUILT.get_or_init(|| {
        let engine =
            Command::new("bash").arg(repo().join("scripts/docker-engine.sh")).output().map_err(|e| e.to_string())?;
        if !engine.status.success() {
            return Err(format!(
                "no Docker engine: {}\n(install one with `apt-get install docker.io`; the image tests are not skipped)",
                String::from_utf8_lossy(&engine.stderr)
            ));
        }
        let log = std::env::temp_dir().join("cordon-image-build.log");
        let started = Instant::now();
        let status = Command::new("bash")
            .arg(repo().join("scripts/build-image.sh"))
            .env("TAG", IMAGE)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).map_err(|e| e.to_string())?)
            .stderr(std::fs::File::options().append(true).open(&log).map_err(|e| e.to_string())?)
            .status()
            .map_err(|e| e.to_string())?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if !status.success() {
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!(
                "scripts/build-image.sh failed ({status}); the end of {}:\n{}",
                log.display(),
                tail.join("\n")
            ));
        }
        eprintln!("image {IMAGE} built in {:.0?} (log {})", started.elapsed(), log.display());
        Ok(())
    });
    if let Err(e) = built {
        panic!("{e}");
    }
    IMAGE
}

/// `docker ARGS`, its output whatever the exit status.
pub fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).stdin(Stdio::null()).output().expect("cannot run docker")
}

/// `docker ARGS`, which must succeed; its stdout, trimmed.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(out.status.success(), "docker {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A world namespace joined to a holder container's network namespace, and the containers
/// that share the holder's network. Everything is removed on drop.
pub struct Pod {
    pub world: String,
    pub holder: String,
    dev: String,
    containers: Vec<String>,
}

impl Pod {
    /// The holder's resolv.conf names `nameserver` (the world's DNS at 192.0.2.1, or cordon's
    /// 127.0.0.53 where the runtime makes the root read-only). Without `ipv6` the container's
    /// network has IPv6 disabled, as Docker leaves it by default. Container names start with
    /// `cordon-e2e-<tag>`.
    pub fn new(tag: &str, nameserver: &str, ipv6: bool) -> Pod {
        let image = image();
        let holder = format!("cordon-e2e-{tag}-net");
        let _ = docker(&["rm", "-f", &holder]);
        let pod =
            Pod { world: format!("cw-{tag}"), holder: holder.clone(), dev: format!("vw{tag}"), containers: Vec::new() };
        let _ = Command::new("ip").args(["netns", "del", &pod.world]).output();
        docker_ok(&[
            "run",
            "-d",
            "--name",
            &holder,
            "--network",
            "none",
            "--dns",
            nameserver,
            "--no-healthcheck",
            "--entrypoint",
            "sleep",
            image,
            "infinity",
        ]);
        let pid = docker_ok(&["inspect", "-f", "{{.State.Pid}}", &holder]);
        run("ip", &["netns", "add", &pod.world]);
        run(
            "ip",
            &["link", "add", &pod.dev, "netns", &pod.world, "type", "veth", "peer", "name", "eth0", "netns", &pid],
        );
        configure_world_end(&pod.world, &pod.dev);
        if ipv6 {
            // Docker disables IPv6 in a --network none namespace.
            let sysctl = "net.ipv6.conf.all.disable_ipv6=0";
            run("nsenter", &["-t", &pid, "-n", "sysctl", "-qw", sysctl, "net.ipv6.conf.eth0.disable_ipv6=0"]);
        }
        configure_inner_end(&["nsenter", "-t", &pid, "-n", "ip"], "eth0", ipv6);
        pod
    }

    /// Adds a host address to the world (one of the documentation ranges).
    pub fn add_world_addr(&self, ip: &str) {
        add_world_addr(&self.world, &self.dev, ip);
    }

    /// A container started by something else (the quick start) that joins the pod's network;
    /// removed with the pod.
    pub fn adopt(&mut self, name: &str) -> Container {
        let _ = docker(&["rm", "-f", name]);
        self.containers.push(name.to_string());
        Container { name: name.to_string() }
    }

    /// `docker run -d` of the image on the pod's network, with `args` before the image name.
    pub fn run(&mut self, name: &str, args: &[&str]) -> Container {
        let name = format!("{}-{name}", self.holder.trim_end_matches("-net"));
        let _ = docker(&["rm", "-f", &name]);
        let net = format!("container:{}", self.holder);
        let mut all = vec!["run", "-d", "--name", name.as_str(), "--network", net.as_str()];
        all.extend_from_slice(args);
        all.push(IMAGE);
        docker_ok(&all);
        self.containers.push(name.clone());
        Container { name }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for c in self.containers.iter().chain([&self.holder]) {
            let _ = docker(&["rm", "-f", "-v", c]);
        }
        let _ = Command::new("ip").args(["netns", "del", &self.world]).output();
    }
}

/// One of the pod's containers.
pub struct Container {
    pub name: String,
}

impl Container {
    /// `docker exec NAME ARGS` as root.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["exec", self.name.as_str()];
        all.extend_from_slice(args);
        docker(&all)
    }

    /// A bash script run by `docker exec` as the image's agent user.
    pub fn agent_sh(&self, script: &str) -> Output {
        docker(&["exec", "-u", "agent", &self.name, "bash", "-c", script])
    }

    /// `cordon status --json` inside the container, and its exit code.
    pub fn status(&self) -> (Option<serde_json::Value>, i32) {
        let out = self.exec(&["cordon", "status", "--json"]);
        (serde_json::from_slice(&out.stdout).ok(), out.status.code().unwrap_or(-1))
    }

    pub fn phase(&self) -> Option<String> {
        self.status().0.and_then(|v| v["phase"].as_str().map(String::from))
    }

    /// Waits for the phase `want`; panics with the container's log on any other settled phase
    /// or on timeout.
    pub fn wait_phase(&self, want: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (doc, _) = self.status();
            let phase = doc.as_ref().and_then(|v| v["phase"].as_str()).unwrap_or("");
            if phase == want {
                return doc.unwrap();
            }
            let settled = ["ready", "failed", "stopped"].contains(&phase);
            if settled || Instant::now() > deadline || !self.running() {
                panic!("{}: phase {phase:?}, wanted {want:?}; its log:\n{}", self.name, self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn running(&self) -> bool {
        docker(&["inspect", "-f", "{{.State.Running}}", &self.name]).stdout.starts_with(b"true")
    }

    /// stdout and stderr of the container's PID 1 so far.
    pub fn logs(&self) -> String {
        let out = docker(&["logs", &self.name]);
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    pub fn inspect(&self, format: &str) -> String {
        docker_ok(&["inspect", "-f", format, &self.name])
    }

    /// The tmux clients on the agent's server, as "uid WxH".
    pub fn tmux_clients(&self) -> Vec<String> {
        let out = docker(&[
            "exec",
            "-u",
            "agent",
            &self.name,
            "tmux",
            "-S",
            "/run/cordon/tmux/agent.sock",
            "list-clients",
            "-F",
            "#{client_uid}",
        ]);
        String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect()
    }
}

/// A temporary directory on the host for files the containers mount.
pub fn host_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cordon-e2e-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
