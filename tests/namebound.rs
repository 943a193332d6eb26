//! The name-bound egress layer as the agent meets it (issue 12): one world address serves an
//! allowlisted name and a name that is not, chosen by TLS SNI and by HTTP Host, and logs every
//! connection, SNI and request it gets, so a test can prove a refused connection never reached
//! it. Real clients (curl, openssl s_client, python3) run as the agent uid inside cordon's
//! namespaces; root's are the control that the layer is the agent's only.

mod harness;

use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use harness::world::{FakeDns, Rec};
use harness::{Cordon, Mode, Phase, Sandbox, TestConfig, WORLD_V4};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(30);
/// The world address that serves both names.
const SHARED: &str = "192.0.2.90";
const SHARED_V6: &str = "2001:db8::90";
/// Where only `other.example.com` lives.
const OTHER: &str = "192.0.2.91";
/// other.example.com's IPv6 address, where nothing listens.
const OTHER_V6_DEAD: &str = "2001:db8::91";
/// A plain-TCP service that speaks first, as ssh does: `ssh.example.com:2222:raw`.
const SSH: &str = "192.0.2.92";

/// The world's server: TLS on :443 (logs the SNI of each handshake; answers HTTP/1.1 inside)
/// and plain HTTP on :80, on every address given. Log lines: `accept tls|http PORT`,
/// `sni NAME|-`, `request tls|http HOST PATH`, `upload SHA`. `/big` is 64 MiB whose sha256 is
/// logged as `bigsha SHA` at start; POST `/upload` answers the body's sha256; `/repo.git/...`
/// serves `$GIT_ROOT/repo.git` (git's dumb HTTP protocol).
const SERVER_PY: &str = r#"
import hashlib, os, socket, ssl, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
cert, key, log, *binds = sys.argv[1:]
lock = threading.Lock()
def note(line):
    with lock, open(log, "a") as f:
        f.write(line + "\n")
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["http/1.1"])
ctx.sni_callback = lambda sock, name, c: note("sni %s" % (name or "-"))
BIG = os.urandom(64 << 20)
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_GET(self):
        note("request %s %s %s" % (self.server.kind, self.headers.get("Host"), self.path))
        if self.path.startswith("/repo.git/"):
            path = os.path.join(os.environ["GIT_ROOT"], self.path.split("?")[0].lstrip("/"))
            if ".." in self.path or not os.path.isfile(path):
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = open(path, "rb").read()
        else:
            body = BIG if self.path == "/big" else ("hello %s\n" % self.headers.get("Host")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        left = int(self.headers["Content-Length"])
        h = hashlib.sha256()
        while left:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
        note("upload %s" % h.hexdigest())
        body = (h.hexdigest() + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
def server(host, port, kind):
    class S(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True
        def finish_request(self, request, addr):
            note("accept %s %s" % (kind, port))
            if kind == "tls":
                try:
                    request = ctx.wrap_socket(request, server_side=True)
                except Exception as e:
                    note("handshake failed %s" % e)
                    return
            self.RequestHandlerClass(request, addr, self)
    s = S((host, port), H)
    s.kind = kind
    threading.Thread(target=s.serve_forever, daemon=True).start()
for b in binds:
    host, port, kind = b.rsplit(":", 2)
    server(host.strip("[]"), int(port), kind)
note("bigsha %s" % hashlib.sha256(BIG).hexdigest())
note("ready")
threading.Event().wait()
"#;

/// `hello_split.py HOST ADDR PORT`: a TLS client whose ClientHello goes out in 50-byte writes
/// with TCP_NODELAY and a pause between them (so in many segments); then completes the
/// handshake, sends `GET /` and prints the answer's last line, or the error's name.
const SPLIT_PY: &str = r#"
import socket, ssl, sys, time
host, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(inc, out, server_hostname=host)
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = out.read()
try:
    s = socket.create_connection((addr, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(0, len(hello), 50):
        s.sendall(hello[i:i + 50])
        time.sleep(0.01)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            pending = out.read()
            if pending:
                s.sendall(pending)
            data = s.recv(65536)
            if not data:
                raise ConnectionResetError("closed during the handshake")
            inc.write(data)
    s.sendall(out.read())
    tls.write(b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host.encode())
    s.sendall(out.read())
    answer = b""
    while True:
        try:
            answer += tls.read(65536)
        except ssl.SSLWantReadError:
            data = s.recv(65536)
            if not data:
                break
            inc.write(data)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            break
    print(answer.decode().strip().splitlines()[-1])
except OSError as e:
    print(type(e).__name__)
"#;

/// `raw.py ADDR PORT HEX...`: connects, sends each hex-encoded message in turn and reads what
/// comes back until the peer is quiet for half a second; prints one line per message:
/// `LAST|END`, the last non-empty line of the answer and how reading ended (`quiet`, `eof`, or
/// the error's name).
const RAW_PY: &str = r#"
import socket, sys
addr, port, msgs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
try:
    s = socket.create_connection((addr, port), timeout=3)
except OSError as e:
    print("|" + type(e).__name__)
    sys.exit()
s.settimeout(0.5)
for m in msgs:
    data, end = b"", "quiet"
    try:
        s.sendall(bytes.fromhex(m))
        while True:
            chunk = s.recv(65536)
            if not chunk:
                end = "eof"
                break
            data += chunk
    except socket.timeout:
        pass
    except OSError as e:
        end = type(e).__name__
    lines = [l for l in data.decode(errors="replace").splitlines() if l.strip()]
    print("%s|%s" % (lines[-1] if lines else "", end))
"#;

struct World {
    _dns: FakeDns,
    _greeter: harness::world::Greeter,
    server: Child,
    log: PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

impl World {
    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().map(String::from).collect()
    }

    /// What the server logged since `from` lines, for the connections made by `f`.
    fn during<T>(&self, f: impl FnOnce() -> T) -> (T, Vec<String>) {
        let before = self.lines().len();
        let value = f();
        // The server logs before it answers; a refused connection never reaches it at all.
        std::thread::sleep(Duration::from_millis(100));
        (value, self.lines()[before..].to_vec())
    }

    fn big_sha(&self) -> String {
        self.lines().iter().find_map(|l| l.strip_prefix("bigsha ").map(String::from)).expect("bigsha logged")
    }
}

/// The allowlist names api.example.com (on the shared address, v4 and v6; also on 8443),
/// other.example.com (elsewhere), www.example.com (a CNAME to edge.example.net on the shared
/// address) and ssh.example.com on 2222, address-based; evil.example.net, on the shared address
/// too, is not allowlisted.
fn world(sb: &Sandbox) -> World {
    sb.write_file(
        "domains.conf",
        "api.example.com\napi.example.com:8443\nother.example.com\nwww.example.com\nssh.example.com:2222:raw\n",
    );
    let dns = FakeDns::start(&sb.net.world, format!("{WORLD_V4}:53").parse().unwrap());
    dns.set("api.example.com", vec![Rec::A(SHARED.parse().unwrap()), Rec::A(SHARED_V6.parse().unwrap())]);
    // Also an IPv6 address where nothing listens: a client that picks it must still get
    // through (the proxy tries the name's other addresses), as it would without the proxy.
    dns.set("other.example.com", vec![Rec::A(OTHER.parse().unwrap()), Rec::A(OTHER_V6_DEAD.parse().unwrap())]);
    dns.set("www.example.com", vec![Rec::Cname("edge.example.net".into())]);
    dns.set("edge.example.net", vec![Rec::A(SHARED.parse().unwrap())]);
    dns.set("evil.example.net", vec![Rec::A(SHARED.parse().unwrap())]);
    dns.set("ssh.example.com", vec![Rec::A(SSH.parse().unwrap())]);
    for ip in [SHARED, SHARED_V6, OTHER, OTHER_V6_DEAD, SSH] {
        sb.net.add_world_addr(ip);
    }
    let (cert, key) = (sb.path("cert.pem"), sb.path("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=cordon-world-server", "-addext", "subjectAltName=DNS:api.example.com"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("this test needs openssl (scripts/install-test-deps.sh)");
    assert!(out.status.success(), "openssl req: {}", String::from_utf8_lossy(&out.stderr));
    let git_root = sb.path("srv");
    harness::world::make_repo(&git_root, "cloned through the name check\n");
    let script = sb.write_file("server.py", SERVER_PY);
    let log = sb.path("server.log");
    let server = Command::new("ip")
        .args(["netns", "exec", &sb.net.world, "python3"])
        .arg(&script)
        .args([&cert, &key, &log])
        .args([
            format!("{SHARED}:443:tls"),
            format!("{SHARED}:80:http"),
            format!("{SHARED}:8443:tls"),
            format!("[{SHARED_V6}]:443:tls"),
            format!("[{SHARED_V6}]:80:http"),
            format!("{OTHER}:443:tls"),
        ])
        .env("GIT_ROOT", &git_root)
        .spawn()
        .expect("start the world's server");
    let greeter = harness::world::Greeter::start(&sb.net.world, format!("{SSH}:2222").parse().unwrap());
    let w = World { _dns: dns, _greeter: greeter, server, log };
    harness::wait_until("the world's server", Duration::from_secs(20), || {
        w.lines().iter().any(|l| l == "ready").then_some(())
    });
    w
}

fn boot(sb: &Sandbox) -> Cordon {
    let mut c = sb.start(&TestConfig::default(), &[], Mode::Pid1);
    c.wait_phase(Phase::Ready, BOOT);
    c
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn curl(c: &Cordon, as_agent: bool, args: &str) -> Output {
    let cmd = format!("curl -sS --max-time 5 {args}");
    if as_agent { c.agent_exec(&cmd) } else { c.exec(&cmd) }
}

fn python(sb: &Sandbox, name: &str, program: &str, args: &str) -> String {
    let path = sb.write_file(name, program);
    format!("timeout 30 python3 {} {args}", path.display())
}

fn status_json(c: &Cordon, sb: &Sandbox) -> Value {
    let cmd = format!("{} status --json --config {}", env!("CARGO_BIN_EXE_cordon"), sb.path("cordon.toml").display());
    let out = c.exec(&cmd);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status --json ({e}): {}", text(&out)))
}

/// Waits (at most a second) for a refusal of `name` in `status --json`, and returns it.
fn refusal(c: &Cordon, sb: &Sandbox, name: &str, address: &str) -> Value {
    harness::wait_until(&format!("a refusal of {name} in status"), Duration::from_secs(1), || {
        let v = status_json(c, sb);
        v["namebound"]["recent_refusals"]
            .as_array()?
            .iter()
            .find(|r| r["name"] == name && r["address"] == address)
            .cloned()
    })
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn tls_connections_pass_only_with_an_allowlisted_sni_that_cordons_dns_answered_with_their_address() {
    let sb = Sandbox::new("nb-tls");
    let w = world(&sb);
    let c = boot(&sb);

    // Positive controls: curl and openssl s_client by name, over IPv4 and IPv6; the server's
    // own certificate and its ALPN choice reach the client unchanged.
    let (out, log) = w.during(|| curl(&c, true, "-k https://api.example.com/"));
    assert_eq!(stdout(&out), "hello api.example.com", "{}", text(&out));
    assert!(log.contains(&"sni api.example.com".to_string()), "{log:?}");
    let out = curl(&c, true, "-6 -k https://api.example.com/");
    assert_eq!(stdout(&out), "hello api.example.com", "over IPv6 (redirected to [::1]): {}", text(&out));
    let out = c.agent_exec(
        "echo | timeout 5 openssl s_client -connect api.example.com:443 -servername api.example.com -alpn http/1.1 2>&1",
    );
    let shown = text(&out);
    assert!(shown.contains("CN=cordon-world-server") || shown.contains("CN = cordon-world-server"), "{shown}");
    assert!(shown.contains("ALPN protocol: http/1.1"), "{shown}");
    // git over HTTPS (libcurl offers h2 and http/1.1; the server picks http/1.1).
    let dest = sb.path("ws/clone");
    let out = c.agent_exec(&format!(
        "timeout 20 git -c http.sslVerify=false clone -q https://api.example.com/repo.git {d} && cat {d}/README",
        d = dest.display()
    ));
    assert_eq!(stdout(&out), "cloned through the name check", "{}", text(&out));
    // The query name of a CNAME chain is bound to the chain's address.
    let out = curl(&c, true, "-k https://www.example.com/");
    assert_eq!(stdout(&out), "hello www.example.com", "{}", text(&out));

    // Another name on the same, admitted address: refused, and the server never saw it.
    let (out, log) =
        w.during(|| curl(&c, true, &format!("-k --resolve evil.example.net:443:{SHARED} https://evil.example.net/")));
    assert!(!out.status.success(), "the other name got through: {}", text(&out));
    assert_eq!(log, Vec::<String>::new(), "the server saw the refused connection");
    let r = refusal(&c, &sb, "evil.example.net", SHARED);
    assert_eq!((r["port"].as_u64(), r["kind"].as_str()), (Some(443), Some("tls")), "{r}");
    assert_eq!(r["reason"], "name not allowlisted", "{r}");
    // The same over IPv6, and the chain's target, which is bound but not allowlisted.
    let (out, log) = w.during(|| {
        curl(&c, true, &format!("-6 -k --resolve evil.example.net:443:[{SHARED_V6}] https://evil.example.net/"))
    });
    assert!(!out.status.success() && log.is_empty(), "{} {log:?}", text(&out));
    let (out, log) =
        w.during(|| curl(&c, true, &format!("-k --resolve edge.example.net:443:{SHARED} https://edge.example.net/")));
    assert!(!out.status.success() && log.is_empty(), "{} {log:?}", text(&out));

    // No SNI.
    let (out, log) = w.during(|| {
        c.agent_exec(&format!("echo | timeout 5 openssl s_client -connect {SHARED}:443 -noservername 2>&1"))
    });
    assert!(!text(&out).contains("CN=cordon-world-server") && log.is_empty(), "{} {log:?}", text(&out));
    refusal(&c, &sb, "no SNI", SHARED);

    // An allowlisted name sent to an address cordon's DNS never gave it.
    assert!(c.agent_exec("getent hosts other.example.com").status.success());
    let out = curl(&c, true, "-k https://other.example.com/");
    assert_eq!(stdout(&out), "hello other.example.com", "at its own address: {}", text(&out));
    // curl prefers the IPv6 address, where nothing listens: the proxy reached the IPv4 one.
    let out = curl(&c, true, "-k -6 https://other.example.com/");
    assert_eq!(stdout(&out), "hello other.example.com", "a dead address of an allowed name: {}", text(&out));
    assert!(c.stderr().contains("reached another address of the name"), "{}", c.stderr());
    let (out, log) =
        w.during(|| curl(&c, true, &format!("-k --resolve other.example.com:443:{SHARED} https://other.example.com/")));
    assert!(!out.status.success() && log.is_empty(), "{} {log:?}", text(&out));
    let r = refusal(&c, &sb, "other.example.com", SHARED);
    assert_eq!(r["reason"], "address not answered by cordon's DNS for this name", "{r}");

    // A ClientHello in 50-byte segments: reassembled for the allowed name, refused for the other.
    let split = |name: &str| {
        let out = c.agent_exec(&python(&sb, "split.py", SPLIT_PY, &format!("{name} {SHARED} 443")));
        stdout(&out)
    };
    let (answer, log) = w.during(|| split("api.example.com"));
    assert_eq!(answer, "hello api.example.com", "{log:?}");
    let (answer, log) = w.during(|| split("evil.example.net"));
    assert_ne!(answer, "hello evil.example.net");
    assert!(log.is_empty(), "{answer}: {log:?}");

    // Garbage instead of a ClientHello: reset, never forwarded.
    let garbage = hex("SSH-2.0-OpenSSH_9.6\r\n");
    let (out, log) =
        w.during(|| c.agent_exec(&python(&sb, "raw.py", RAW_PY, &format!("{SHARED} 443 {garbage} {garbage}"))));
    let lines = stdout(&out);
    assert!(!lines.contains("SSH") && log.is_empty(), "{lines} {log:?}");
    assert!(lines.starts_with("|ConnectionResetError") || lines.starts_with("|eof"), "{lines}");

    // Root is not redirected: its connection with the other name reaches the server.
    let (out, log) =
        w.during(|| curl(&c, false, &format!("-k --resolve evil.example.net:443:{SHARED} https://evil.example.net/")));
    assert_eq!(stdout(&out), "hello evil.example.net", "{}", text(&out));
    assert!(log.contains(&"sni evil.example.net".to_string()), "{log:?}");

    // The agent connecting to the proxy port itself meets the loopback reject.
    let out = c.agent_exec("timeout 3 bash -c 'exec 3<>/dev/tcp/127.0.0.1/15443' 2>&1");
    assert!(!out.status.success() && text(&out).contains("refused"), "{}", text(&out));

    let v = status_json(&c, &sb);
    let nb = &v["namebound"];
    assert_eq!((nb["enabled"].as_bool(), nb["running"].as_bool()), (Some(true), Some(true)), "{nb}");
    assert!(nb["connections"]["allowed"].as_u64().unwrap() >= 5, "{nb}");
    assert!(nb["connections"]["refused"].as_u64().unwrap() >= 6, "{nb}");
    let why = c.exec(&format!(
        "{} status why {SHARED} --config {}",
        env!("CARGO_BIN_EXE_cordon"),
        sb.path("cordon.toml").display()
    ));
    let why = text(&why);
    let bound = why.lines().find(|l| l.contains("names answered with it")).unwrap_or_default();
    assert!(bound.contains("api.example.com") && bound.contains("www.example.com") && !bound.contains("evil"), "{why}");
    // The journal's last refusals to the address name what the client sent.
    assert!(why.contains("name: uid") && why.contains("name \"evil.example.net\""), "{why}");
}

#[test]
fn http_requests_pass_only_with_an_allowlisted_host_each_one_on_a_kept_alive_connection() {
    let sb = Sandbox::new("nb-http");
    let w = world(&sb);
    let c = boot(&sb);

    let (out, log) = w.during(|| curl(&c, true, "http://api.example.com/"));
    assert_eq!(stdout(&out), "hello api.example.com", "{}", text(&out));
    assert_eq!(log, ["accept http 80", "request http api.example.com /"]);

    let (out, log) = w.during(|| curl(&c, true, "-4 -H 'Host: evil.example.net' http://api.example.com/"));
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(log, Vec::<String>::new(), "the server saw the refused request");
    let r = refusal(&c, &sb, "evil.example.net", SHARED);
    assert_eq!((r["port"].as_u64(), r["kind"].as_str()), (Some(80), Some("http")), "{r}");

    // Keep-alive: the first request is answered, the second, for another host, resets the
    // connection before any of it goes upstream.
    let first = hex("GET /first HTTP/1.1\r\nHost: api.example.com\r\n\r\n");
    let second = hex("GET /second HTTP/1.1\r\nHost: evil.example.net\r\n\r\n");
    let (out, log) =
        w.during(|| c.agent_exec(&python(&sb, "raw.py", RAW_PY, &format!("{SHARED} 80 {first} {second}"))));
    let lines: Vec<String> = text(&out).lines().map(String::from).collect();
    assert_eq!(lines.first().map(String::as_str), Some("hello api.example.com|quiet"), "{lines:?}");
    assert!(matches!(lines.get(1).map(String::as_str), Some("|ConnectionResetError" | "|eof")), "{lines:?}");
    assert_eq!(log, ["accept http 80", "request http api.example.com /first"]);

    // Root: unaffected.
    let out = curl(&c, false, "-H 'Host: evil.example.net' http://api.example.com/");
    assert_eq!(stdout(&out), "hello evil.example.net", "{}", text(&out));
}

#[test]
fn large_transfers_pass_intact_and_silent_clients_hold_up_neither_dns_nor_other_connections() {
    let sb = Sandbox::new("nb-bulk");
    let w = world(&sb);
    let c = boot(&sb);

    // 64 MiB each way through the proxy.
    let out = c.agent_exec("curl -sS --max-time 60 -k https://api.example.com/big | sha256sum");
    assert_eq!(stdout(&out).split(' ').next(), Some(w.big_sha().as_str()), "download: {}", text(&out));
    let generate = "head -c 67108864 /dev/zero | openssl enc -aes-128-ctr -nosalt \
                    -K 000102030405060708090a0b0c0d0e0f -iv 00000000000000000000000000000000";
    let sent = stdout(&c.agent_exec(&format!("{generate} | sha256sum")));
    let out = c.agent_exec(&format!(
        "{generate} | curl -sS --max-time 60 -k --data-binary @- -H 'Content-Type: application/octet-stream' \
         https://api.example.com/upload"
    ));
    assert_eq!(Some(stdout(&out).as_str()), sent.split(' ').next(), "upload: {}", text(&out));

    // Twenty clients connect and say nothing, for longer than the hello timeout (10 s).
    let hold = "for i in $(seq 20); do (exec 3<>/dev/tcp/api.example.com/443; sleep 14) & done; wait";
    let wrapped = format!("setsid -f bash -c '{hold}' </dev/null >/dev/null 2>&1");
    assert!(c.agent_exec(&wrapped).status.success());
    harness::wait_until("twenty silent connections accepted", Duration::from_secs(5), || {
        (status_json(&c, &sb)["namebound"]["connections"]["accepted"].as_u64()? >= 22).then_some(())
    });
    let t0 = Instant::now();
    assert!(c.agent_exec("getent hosts other.example.com").status.success(), "DNS during the silent clients");
    let out = curl(&c, true, "-k https://api.example.com/");
    assert_eq!(stdout(&out), "hello api.example.com", "{}", text(&out));
    assert!(t0.elapsed() < Duration::from_secs(3), "took {:?}", t0.elapsed());
    // The proxy gives up on them itself, at the hello timeout.
    harness::wait_until("the silent clients timed out", Duration::from_secs(15), || {
        (status_json(&c, &sb)["namebound"]["connections"]["hello_timeouts"].as_u64()? >= 20).then_some(())
    });
}

#[test]
fn a_taken_proxy_port_fails_the_firewall_stage_with_the_fix_and_the_agent_never_starts() {
    let sb = Sandbox::new("nb-port");
    let _w = world(&sb);
    let cfg = TestConfig {
        agent_command: format!("touch {}/started; exec sleep 1000", sb.path("ws").display()),
        on_boot_failure: "hold",
        ..TestConfig::default()
    };
    // Another process (root's, as any would be that cordon must not displace) holds the port.
    let hold = "python3 -c 'import socket, time; s = socket.socket(); s.bind((\"127.0.0.1\", 15443)); s.listen(); \
                time.sleep(60)' &\nsleep 0.5";
    let mut c = sb.launch(&sb.write_config(&cfg), &[], Mode::Pid1, hold);
    let state = c.wait_phase(Phase::Failed, BOOT);
    let stage = state.stages.last().unwrap();
    assert_eq!(stage.name, "firewall", "{state:?}");
    let error = stage.error.as_deref().unwrap_or_default();
    assert!(error.contains("cannot bind the name-checking proxy to 127.0.0.1:15443"), "{error}");
    assert!(stage.hint.as_deref().unwrap_or_default().contains("network.proxy_port"), "{stage:?}");
    assert!(!c.inside(&sb.path("ws/started")).exists(), "the agent started without the name-bound layer");
    c.kill(c.reaper(), nix::sys::signal::Signal::SIGTERM);
    c.wait_exit(BOOT);
}

#[test]
fn name_port_entries_are_name_checked_as_tls_and_raw_ones_stay_address_based() {
    let sb = Sandbox::new("nb-ports");
    let w = world(&sb);
    let c = boot(&sb);

    let out = curl(&c, true, "-4 -k https://api.example.com:8443/");
    assert_eq!(stdout(&out), "hello api.example.com:8443", "{}", text(&out));
    let (out, log) = w.during(|| {
        curl(&c, true, &format!("-k --resolve evil.example.net:8443:{SHARED} https://evil.example.net:8443/"))
    });
    assert!(!out.status.success() && log.is_empty(), "{} {log:?}", text(&out));
    let r = refusal(&c, &sb, "evil.example.net", SHARED);
    assert_eq!(r["port"], 8443, "{r}");

    // ssh-like: the server speaks first and the client sends no name; `:raw` lets it through.
    let out = c.agent_exec("timeout 5 bash -c 'exec 3<>/dev/tcp/ssh.example.com/2222 && head -n1 <&3'");
    assert_eq!(stdout(&out), format!("hello from {SSH}:2222"), "{}", text(&out));

    let why = |target: &str| {
        let cmd = format!(
            "{} status --json why {target} --config {}",
            env!("CARGO_BIN_EXE_cordon"),
            sb.path("cordon.toml").display()
        );
        let out = c.agent_exec(&cmd);
        serde_json::from_slice::<Value>(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
    };
    let ports = |v: &Value| -> Vec<String> {
        v["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().split(',').next().unwrap().to_string())
            .collect()
    };
    assert_eq!(ports(&why("api.example.com")), ["80: HTTP", "443: TLS", "8443: TLS"]);
    assert_eq!(
        ports(&why("ssh.example.com")),
        ["2222: address-based (a `:2222:raw` entry): any connection to an admitted address passes"]
    );
}
