//! The namespace test harness: runs the real `cordon` binary as PID 1 (or as a subreaper under
//! another init) inside fresh pid, mount, uts and network namespaces, with its network
//! namespace joined by a veth pair to a "world" namespace that hosts the fake internet on
//! documentation addresses. Nothing it does touches the host's network, firewall, resolv.conf
//! or root mount: every mount happens in the private mount namespace, and the agent user exists
//! only in a passwd file bind-mounted there.
//!
//! Privileged tests call [`require_root`] first: without root they fail saying so, never pass.

#![allow(dead_code, reason = "each test binary uses a different part of the harness")]
#![allow(unreachable_pub, reason = "`pub` here is the harness's interface to the test files that include it")]

pub mod docker;
pub mod world;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use cordon::state::report::{Phase, State};

/// uid/gid of the test agent user. Not 1000: that uid belongs to another account on CI hosts.
pub const AGENT_UID: u32 = 4242;
pub const AGENT_USER: &str = "cagent";

/// World side of the veth pair, and cordon's side.
pub const WORLD_V4: &str = "192.0.2.1";
pub const CORDON_V4: &str = "192.0.2.2";
pub const WORLD_V6: &str = "2001:db8::1";
pub const CORDON_V6: &str = "2001:db8::2";

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "this test needs root: it creates pid, mount and network namespaces and runs cordon as PID 1 in them. \
             Run the suite as root (sudo make test); it is not skipped, because a skipped security test proves nothing."
        );
    }
    for tool in ["ip", "unshare", "nsenter", "mount"] {
        let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"].iter().any(|d| Path::new(d).join(tool).exists());
        assert!(found, "this test needs `{tool}` (apt-get install iproute2 util-linux mount)");
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Two network namespaces: `world` (fake internet) and `inner` (cordon's), joined by veth.
pub struct Net {
    pub world: String,
    pub inner: String,
    /// The world's end of the veth pair.
    dev: String,
}

impl Net {
    fn new(tag: &str) -> Net {
        let net = Net { world: format!("cw-{tag}"), inner: format!("cc-{tag}"), dev: format!("vw{tag}") };
        run("ip", &["netns", "add", &net.world]);
        run("ip", &["netns", "add", &net.inner]);
        let vi = format!("vi{tag}");
        run(
            "ip",
            &["link", "add", &net.dev, "netns", &net.world, "type", "veth", "peer", "name", &vi, "netns", &net.inner],
        );
        configure_world_end(&net.world, &net.dev);
        run("ip", &["-n", &net.inner, "link", "set", "lo", "up"]);
        configure_inner_end(&["ip", "-n", &net.inner], &vi, true);
        net
    }

    /// Adds a host address to the world (one of the documentation ranges).
    pub fn add_world_addr(&self, ip: &str) {
        add_world_addr(&self.world, &self.dev, ip);
    }
}

/// The world's end of the veth pair: 192.0.2.1/24 and 2001:db8::1/64, up, with loopback.
fn configure_world_end(world: &str, dev: &str) {
    run("ip", &["-n", world, "link", "set", "lo", "up"]);
    run("ip", &["-n", world, "addr", "add", &format!("{WORLD_V4}/24"), "dev", dev]);
    run("ip", &["-n", world, "addr", "add", &format!("{WORLD_V6}/64"), "dev", dev, "nodad"]);
    run("ip", &["-n", world, "link", "set", dev, "up"]);
}

/// cordon's end of the veth pair: 192.0.2.2/24 (and 2001:db8::2/64), up, with default routes
/// via the world. `ip` is how to run `ip` in cordon's namespace (`ip -n NAME`, or `nsenter -t
/// PID -n ip` for a container's).
fn configure_inner_end(ip: &[&str], dev: &str, ipv6: bool) {
    let mut commands = vec![
        format!("addr add {CORDON_V4}/24 dev {dev}"),
        format!("link set {dev} up"),
        format!("route add default via {WORLD_V4}"),
    ];
    if ipv6 {
        commands.insert(1, format!("addr add {CORDON_V6}/64 dev {dev} nodad"));
        commands.push(format!("-6 route add default via {WORLD_V6}"));
    }
    for c in &commands {
        let args: Vec<&str> = ip[1..].iter().copied().chain(c.split(' ')).collect();
        run(ip[0], &args);
    }
}

/// Adds a host address (one of the documentation ranges) to the world's end `dev`.
fn add_world_addr(world: &str, dev: &str, ip: &str) {
    let cidr = if ip.contains(':') { format!("{ip}/64") } else { format!("{ip}/24") };
    let mut args = vec!["-n", world, "addr", "add", cidr.as_str(), "dev", dev];
    if ip.contains(':') {
        args.push("nodad");
    }
    run("ip", &args);
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.inner, &self.world] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// How cordon is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// cordon is PID 1 of its pid namespace (Docker, Kubernetes).
    Pid1,
    /// A shell is PID 1 and runs cordon as its child (Fly's init owns PID 1).
    Subreaper,
}

/// A test's private directory, network and agent user.
pub struct Sandbox {
    pub dir: PathBuf,
    pub net: Net,
}

/// The parts of a test configuration that tests vary; rendered over a base that points every
/// path into the sandbox directory.
pub struct TestConfig {
    pub agent_command: String,
    pub on_exit: &'static str,
    pub stop_grace: &'static str,
    pub on_boot_failure: &'static str,
    pub required_secrets: Vec<&'static str>,
    /// Run the agent in tmux (the product's default); the harness defaults to a plain child.
    pub tmux: bool,
    /// Raw TOML keys added to the [network] table.
    pub network: String,
    /// Raw TOML appended at the end (new tables only).
    pub extra: String,
}

impl Default for TestConfig {
    fn default() -> Self {
        TestConfig {
            agent_command: "exec sleep 1000".into(),
            on_exit: "shutdown",
            stop_grace: "3s",
            on_boot_failure: "exit",
            required_secrets: vec![],
            tmux: false,
            network: String::new(),
            extra: String::new(),
        }
    }
}

impl Sandbox {
    pub fn new(name: &str) -> Sandbox {
        require_root();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{tag}"));
        let _ = fs::remove_dir_all(&dir);
        for sub in ["home", "ws", "state", "host"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let mut passwd = fs::read_to_string("/etc/passwd").unwrap();
        writeln!(passwd, "{AGENT_USER}:x:{AGENT_UID}:{AGENT_UID}::{}:/bin/sh", dir.join("home").display()).unwrap();
        fs::write(dir.join("passwd"), passwd).unwrap();
        let mut group = fs::read_to_string("/etc/group").unwrap();
        writeln!(group, "{AGENT_USER}:x:{AGENT_UID}:").unwrap();
        fs::write(dir.join("group"), group).unwrap();
        fs::write(dir.join("domains.conf"), "example.com\n*.example.org\n").unwrap();
        // The namespace's own resolv.conf, bind-mounted over /etc/resolv.conf: cordon rewrites
        // it, and must never touch the host's. The world's resolver is the upstream.
        fs::write(dir.join("resolv.conf"), format!("nameserver {WORLD_V4}\noptions ndots:1\n")).unwrap();
        Sandbox { net: Net::new(&tag), dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// The config file for `c`, written into the sandbox as `cordon.toml`.
    pub fn write_config(&self, c: &TestConfig) -> PathBuf {
        self.write_file("cordon.toml", &self.render_config(c))
    }

    pub fn write_file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        fs::write(&path, text).unwrap();
        path
    }

    pub fn render_config(&self, c: &TestConfig) -> String {
        let d = self.dir.display();
        let secrets: Vec<String> = c.required_secrets.iter().map(|s| format!("\"{s}\"")).collect();
        let command = c.agent_command.replace('\\', "\\\\").replace('"', "\\\"");
        let text = format!(
            r#"[secrets]
required = [{secrets}]

[[tmpfs]]
path = "{d}/ws"
size = "8M"
mode = "0755"
owner = "agent"

[[tmpfs]]
path = "~"
size = "4M"
mode = "0700"
owner = "agent"

[network]
allowlist = "{d}/domains.conf"
{network}

[agent]
user = "{AGENT_USER}"
command = ["/bin/sh", "-c", "{command}"]
workdir = "{d}/ws"
on_exit = "{on_exit}"
tmux = {tmux}

[supervisor]
state_dir = "{d}/state"
stop_grace = "{grace}"
on_boot_failure = "{obf}"
{extra}"#,
            secrets = secrets.join(", "),
            on_exit = c.on_exit,
            grace = c.stop_grace,
            obf = c.on_boot_failure,
            network = c.network,
            tmux = c.tmux,
            extra = c.extra,
        );
        text
    }

    /// Starts cordon with `config` and exactly the environment `env` (plus PATH).
    pub fn start(&self, config: &TestConfig, env: &[(&str, &str)], mode: Mode) -> Cordon {
        self.launch(&self.write_config(config), env, mode, "")
    }

    /// Starts cordon with the config file `cfg`, running `before` (shell) inside the namespaces
    /// first, as a container runtime would prepare mounts before starting the entrypoint.
    /// `/run` is a private tmpfs in there, as in a container. `before` may set `WRAP` to a
    /// command prefix for cordon (e.g. `setpriv ... --`).
    pub fn launch(&self, cfg: &Path, env: &[(&str, &str)], mode: Mode, before: &str) -> Cordon {
        let exe = env!("CARGO_BIN_EXE_cordon");
        let d = &self.dir;
        // fd 7 stands for a descriptor a runtime leaks into the entrypoint: it must not reach
        // the agent.
        let setup = format!(
            "set -e\nmount -t tmpfs -o size=16m,mode=755 tmpfs /run\nmount --bind {p} /etc/passwd\nmount --bind {g} /etc/group\nmount --bind {r} /etc/resolv.conf\n{before}\nexec 7</dev/null\n",
            p = d.join("passwd").display(),
            g = d.join("group").display(),
            r = d.join("resolv.conf").display(),
        );
        let launch = match mode {
            Mode::Pid1 => format!("exec ${{WRAP:-}} {exe} init --config {}", cfg.display()),
            Mode::Subreaper => {
                format!("set +e; ${{WRAP:-}} {exe} init --config {}; echo \"cordon exited $?\"; exit 0", cfg.display())
            }
        };
        let stdout = fs::File::create(d.join("stdout.log")).unwrap();
        let stderr = fs::File::create(d.join("stderr.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.net.inner])
            .args(["unshare", "--pid", "--fork", "--mount", "--uts", "--mount-proc", "--propagation", "private", "--"])
            .args(["/bin/sh", "-c", &(setup + &launch)])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("start unshare");
        Cordon { child, mode, dir: d.clone(), started: Instant::now(), status: None }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A running cordon under test.
pub struct Cordon {
    child: Child,
    mode: Mode,
    dir: PathBuf,
    pub started: Instant,
    status: Option<ExitStatus>,
}

fn children_of(pid: i32) -> Vec<i32> {
    let text = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    text.split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline")).map(|b| String::from_utf8_lossy(&b).replace('\0', " ")).unwrap_or_default()
}

pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Cordon {
    /// Host pid of the namespace's PID 1 (cordon's reaper in Pid1 mode, the shell otherwise).
    pub fn ns_init(&self) -> i32 {
        let unshare = self.child.id() as i32;
        wait_until("the namespace's PID 1", Duration::from_secs(10), || {
            let init = children_of(unshare).first().copied();
            if init.is_none() && fs::read_to_string(format!("/proc/{unshare}/stat")).is_ok_and(|s| s.contains(") Z")) {
                panic!("cordon's namespace is gone (cordon exited); stderr:\n{}", self.stderr());
            }
            init
        })
    }

    /// Host pid of cordon's reaper.
    pub fn reaper(&self) -> i32 {
        let init = self.ns_init();
        match self.mode {
            Mode::Pid1 => init,
            Mode::Subreaper => wait_until("cordon's reaper under the shell", Duration::from_secs(10), || {
                children_of(init).into_iter().find(|&p| cmdline(p).contains(" init "))
            }),
        }
    }

    /// Host pid of the supervisor.
    pub fn supervisor(&self) -> i32 {
        let reaper = self.reaper();
        wait_until("the supervisor", Duration::from_secs(10), || {
            children_of(reaper).into_iter().find(|&p| cmdline(p).contains("supervise"))
        })
    }

    /// Host pid of the agent (a child of the supervisor).
    pub fn agent(&self) -> i32 {
        let sup = self.supervisor();
        wait_until("the agent", Duration::from_secs(10), || children_of(sup).first().copied())
    }

    /// A path inside cordon's mount namespace, seen from the host.
    pub fn inside(&self, path: &Path) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.reaper())).join(path.strip_prefix("/").unwrap_or(path))
    }

    /// The state file, from the sandbox's state directory or, when the config could not be
    /// read, the default one.
    pub fn state(&self) -> Option<State> {
        [self.dir.join("state"), PathBuf::from(cordon::config::DEFAULT_STATE_DIR)]
            .iter()
            .find_map(|d| cordon::state::report::read_state(&self.inside(d)).ok())
    }

    pub fn boot_log(&self) -> String {
        [self.dir.join("state"), PathBuf::from(cordon::config::DEFAULT_STATE_DIR)]
            .iter()
            .find_map(|d| fs::read_to_string(self.inside(&d.join("boot.log"))).ok())
            .unwrap_or_default()
    }

    pub fn wait_phase(&mut self, phase: Phase, timeout: Duration) -> State {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.state().filter(|s| s.phase == phase) {
                return s;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("cordon exited ({status}) before reaching {phase:?}; stderr:\n{}", self.stderr());
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {phase:?}; state: {:?}\nstderr:\n{}", self.state(), self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        fs::read_to_string(self.dir.join("stdout.log")).unwrap_or_default()
    }

    /// Runs a shell command inside cordon's namespaces (as `docker exec` would), as root.
    pub fn exec(&self, script: &str) -> std::process::Output {
        self.exec_as(None, script)
    }

    /// Runs a bash command inside cordon's namespaces as the agent's uid and gid.
    pub fn agent_exec(&self, script: &str) -> std::process::Output {
        self.exec_as(Some(AGENT_UID), script)
    }

    fn exec_as(&self, uid: Option<u32>, script: &str) -> std::process::Output {
        let init = self.ns_init().to_string();
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &init, "-p", "-m", "-u", "-n"]);
        if let Some(uid) = uid {
            cmd.args(["-S", &uid.to_string(), "-G", &uid.to_string()]);
        }
        cmd.args(["--", "/bin/bash", "-c", script])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", "/")
            .output()
            .expect("nsenter")
    }

    /// Sends a signal to the host pid `pid`.
    pub fn kill(&self, pid: i32, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("kill");
    }

    /// Every process in cordon's pid namespace: (host pid, ppid, state).
    pub fn processes(&self) -> Vec<cordon::sys::ProcEntry> {
        let init = self.ns_init();
        let Ok(ns) = fs::read_link(format!("/proc/{init}/ns/pid")) else { return vec![] };
        cordon::sys::processes()
            .into_iter()
            .filter(|p| fs::read_link(format!("/proc/{}/ns/pid", p.pid)).is_ok_and(|l| l == ns))
            .collect()
    }

    /// Waits for cordon (the unshare wrapper around it) to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.status = Some(status);
                return status;
            }
            if Instant::now() > deadline {
                panic!("cordon did not exit within {timeout:?}; stderr:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Cordon {
    fn drop(&mut self) {
        if self.status.is_none() {
            // SIGKILL to the namespace's PID 1 takes the whole namespace down.
            if let Some(&init) = children_of(self.child.id() as i32).first() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(init), nix::sys::signal::Signal::SIGKILL);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
