//! The fake internet in the world namespace: an authoritative DNS server that records every
//! query it receives (so a test can prove a denied name never left cordon) and can be taken
//! down, and TCP servers that greet whoever connects. Each runs on a thread that has entered
//! the world's network namespace; sockets stay there.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_server::proto::op::{Message, MessageType, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, CNAME};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};

/// Runs `f` on a new thread inside the named network namespace.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns into the world");
        f()
    })
}

#[derive(Debug, Clone)]
pub enum Rec {
    A(IpAddr),
    Cname(String),
}

/// Names (lowercase, no trailing dot) to records, with one TTL for all.
#[derive(Default)]
pub struct Zone {
    pub records: HashMap<String, Vec<Rec>>,
    pub ttl: u32,
}

pub struct FakeDns {
    pub zone: Arc<Mutex<Zone>>,
    queries: Arc<Mutex<Vec<String>>>,
    up: Arc<AtomicBool>,
    held: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDns {
    pub fn start(ns: &str, addr: SocketAddr) -> FakeDns {
        let zone = Arc::new(Mutex::new(Zone { ttl: 30, ..Zone::default() }));
        let queries = Arc::new(Mutex::new(Vec::new()));
        let up = Arc::new(AtomicBool::new(true));
        let held = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (z, q, u, s, h) = (zone.clone(), queries.clone(), up.clone(), stop.clone(), held.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = in_netns(ns, move || {
            let sock = UdpSocket::bind(addr).expect("bind the fake DNS server");
            sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 4096];
            let mut pending: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
            while !s.load(Ordering::Relaxed) {
                if !h.load(Ordering::Relaxed) {
                    for (reply, to) in pending.drain(..) {
                        let _ = sock.send_to(&reply, to);
                    }
                }
                let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
                let Ok(msg) = Message::from_vec(&buf[..n]) else { continue };
                if let Some(query) = msg.queries.first() {
                    q.lock().unwrap().push(format!("{} {}", query.name().to_ascii(), query.query_type()));
                }
                if !u.load(Ordering::Relaxed) {
                    continue;
                }
                let reply = answer(&msg, &z.lock().unwrap()).to_vec().unwrap();
                if h.load(Ordering::Relaxed) {
                    pending.push((reply, from));
                } else {
                    let _ = sock.send_to(&reply, from);
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("fake DNS server did not start");
        FakeDns { zone, queries, up, held, stop, thread: Some(thread) }
    }

    pub fn set(&self, name: &str, records: Vec<Rec>) {
        self.zone.lock().unwrap().records.insert(name.to_string(), records);
    }

    pub fn set_ttl(&self, ttl: u32) {
        self.zone.lock().unwrap().ttl = ttl;
    }

    /// Every query received, as "name. TYPE".
    pub fn queries(&self) -> Vec<String> {
        self.queries.lock().unwrap().clone()
    }

    /// Held: answers are made as the zone is now, but kept until the hold is released (then
    /// sent within 50 ms): an answer in flight, for as long as the test likes.
    pub fn hold(&self, held: bool) {
        self.held.store(held, Ordering::Relaxed);
    }

    /// Down: queries are received (and recorded) but never answered.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn answer(query: &Message, zone: &Zone) -> Message {
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.message_type = MessageType::Response;
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    let Some(q) = query.queries.first() else { return reply };
    reply.add_query(q.clone());
    let mut name = q.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
    let mut found = false;
    for _ in 0..8 {
        let Some(recs) = zone.records.get(&name) else { break };
        found = true;
        let owner = Name::from_ascii(format!("{name}.")).unwrap();
        let mut next = None;
        for r in recs {
            let data = match (r, q.query_type()) {
                (Rec::A(IpAddr::V4(ip)), RecordType::A) => RData::A(A(*ip)),
                (Rec::A(IpAddr::V6(ip)), RecordType::AAAA) => RData::AAAA(AAAA(*ip)),
                (Rec::Cname(t), _) => {
                    next = Some(t.clone());
                    RData::CNAME(CNAME(Name::from_ascii(format!("{t}.")).unwrap()))
                }
                _ => continue,
            };
            reply.add_answer(Record::from_rdata(owner.clone(), zone.ttl, data));
        }
        match next {
            Some(t) => name = t,
            None => break,
        }
    }
    if !found {
        reply.metadata.response_code = ResponseCode::NXDomain;
    }
    reply
}

/// A TCP server in a namespace: each accepted connection is handed to `handle`.
pub struct TcpService {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpService {
    pub fn start(ns: &str, addr: SocketAddr, handle: impl Fn(std::net::TcpStream) + Send + 'static) -> TcpService {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = in_netns(ns, move || {
            let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        handle(conn);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("TCP service did not start");
        TcpService { stop, thread: Some(thread) }
    }
}

impl Drop for TcpService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP server that writes "hello from <addr>\n" to each connection and closes it.
pub struct Greeter(TcpService);

impl Greeter {
    pub fn start(ns: &str, addr: SocketAddr) -> Greeter {
        Greeter(TcpService::start(ns, addr, move |mut conn| {
            let _ = writeln!(conn, "hello from {addr}");
        }))
    }
}

/// An HTTPS server (python3's, a self-signed certificate made with openssl) on `addrs`, each
/// `ip:port` or `[ip6]:port`: answers every GET with "hello HOST\n" and logs the SNI of every
/// handshake (`sni NAME`, or `sni -`) to `log`, so a test can prove a refused connection never
/// reached it.
pub struct HttpsServer {
    child: std::process::Child,
    pub log: std::path::PathBuf,
}

const HTTPS_PY: &str = r#"
import socket, ssl, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
cert, key, log, *binds = sys.argv[1:]
lock = threading.Lock()
def note(line):
    with lock, open(log, "a") as f:
        f.write(line + "\n")
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.sni_callback = lambda sock, name, c: note("sni %s" % (name or "-"))
class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def do_GET(self):
        body = ("hello %s\n" % self.headers.get("Host")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
class S(ThreadingHTTPServer):
    daemon_threads = True
    def get_request(self):
        conn, addr = self.socket.accept()
        return ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False), addr
for b in binds:
    host, port = b.rsplit(":", 1)
    host = host.strip("[]")
    S.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = S((host, int(port)), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
note("ready")
threading.Event().wait()
"#;

impl HttpsServer {
    pub fn start(ns: &str, addrs: &[&str], dir: &std::path::Path) -> HttpsServer {
        let (cert, key, log) = (dir.join("https-cert.pem"), dir.join("https-key.pem"), dir.join("https.log"));
        let out = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=cordon-world-https", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("this test needs openssl (scripts/install-test-deps.sh)");
        assert!(out.status.success(), "openssl req: {}", String::from_utf8_lossy(&out.stderr));
        let script = dir.join("https.py");
        std::fs::write(&script, HTTPS_PY).unwrap();
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "python3"])
            .arg(&script)
            .args([&cert, &key, &log])
            .args(addrs)
            .spawn()
            .expect("start the world's HTTPS server (python3)");
        let server = HttpsServer { child, log };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !server.lines().iter().any(|l| l == "ready") {
            assert!(std::time::Instant::now() < deadline, "the world's HTTPS server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    pub fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().map(String::from).collect()
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request the git server received: its path and Authorization header.
pub type Request = (String, Option<String>);

/// A git server over HTTP with basic auth, serving a bare repository as static files (git's
/// "dumb" HTTP protocol, prepared by `git update-server-info`). Records every request's path
/// and Authorization header.
pub struct GitServer {
    _service: TcpService,
    pub requests: Arc<Mutex<Vec<Request>>>,
}

pub fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl GitServer {
    /// Serves `root` (a directory holding `name.git` bare repositories) on `addr`, accepting
    /// only `user:password`.
    pub fn start(ns: &str, addr: SocketAddr, root: std::path::PathBuf, user: &str, password: &str) -> GitServer {
        use std::io::{BufRead, BufReader};
        let expected = format!("Basic {}", base64(format!("{user}:{password}").as_bytes()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        let service = TcpService::start(ns, addr, move |mut conn| {
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut request_line = String::new();
            let _ = reader.read_line(&mut request_line);
            let mut auth = None;
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = header.split_once(':')
                    && k.eq_ignore_ascii_case("authorization")
                {
                    auth = Some(v.trim().to_string());
                }
            }
            let path =
                request_line.split_whitespace().nth(1).unwrap_or("/").split('?').next().unwrap_or("/").to_string();
            log.lock().unwrap().push((path.clone(), auth.clone()));
            let file = root.join(path.trim_start_matches('/'));
            let reply: Vec<u8> = if auth.as_deref() != Some(expected.as_str()) {
                b"HTTP/1.0 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\n\r\n"
                    .to_vec()
            } else if path.contains("..") || !file.is_file() {
                b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec()
            } else {
                let body = std::fs::read(&file).unwrap();
                let mut r = format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                r.extend(body);
                r
            };
            let _ = conn.write_all(&reply);
        });
        GitServer { _service: service, requests }
    }
}

fn git(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Makes `srv/repo.git`, a bare repository with one commit on `main` whose README says
/// `readme`, prepared for [`GitServer`] (dumb HTTP).
pub fn make_repo(srv: &std::path::Path, readme: &str) {
    std::fs::create_dir_all(srv.join("src")).unwrap();
    git(srv, &["init", "-q", "--bare", "-b", "main", "repo.git"]);
    git(&srv.join("src"), &["init", "-q", "-b", "main"]);
    std::fs::write(srv.join("src/README"), readme).unwrap();
    git(&srv.join("src"), &["add", "README"]);
    git(&srv.join("src"), &["commit", "-q", "-m", "first"]);
    git(&srv.join("src"), &["push", "-q", &srv.join("repo.git").display().to_string(), "main"]);
    git(&srv.join("repo.git"), &["update-server-info"]);
}
