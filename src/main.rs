use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::{Parser, Subcommand};

use cordon::config::ConfigSource;

/// Hardened container entrypoint for AI coding agents.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Configuration file [default: /etc/cordon/cordon.toml]
    #[arg(long, global = true, env = "CORDON_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Boot the container and supervise it (the default as the entrypoint)
    Init,
    /// Validate the configuration, the allowlist and required secrets; no side effects (exit 0
    /// clean, 2 with problems)
    Check {
        /// Check this allowlist file instead of the one `network.allowlist` names (for a
        /// configuration checked away from its container)
        #[arg(long, value_name = "FILE")]
        allowlist: Option<PathBuf>,
        /// Check everything but the presence of the required secrets
        #[arg(long)]
        no_secrets: bool,
    },
    /// Join the agent's session, waiting for the boot and showing its progress (exit 1: the boot
    /// failed or there is no session; 2: cordon is not running here)
    Attach {
        /// Exit at once with a message when the session is not ready yet
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the boot
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// What is running, what failed, what was blocked and why (exit 0 ready, 1 not, 2 unreachable)
    Status {
        /// Print the status document as JSON (schema: docs/status.md)
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        what: Option<StatusWhat>,
    },
    /// Root only: read the allowlist file and network.allow again and put them in force (as
    /// SIGHUP to cordon does). A bad file is refused with its file and line, and the policy in
    /// force stays. Exit 0 done, 1 refused, 2 cordon not reachable, 77 not root
    Reload,
    /// Root only: allow NAME[:port[:raw]] now, for a while with --for; the grant is lost on a
    /// container restart. Exit 0 done, 1 refused, 2 cordon not reachable, 77 not root
    Allow {
        /// An allowlist entry: name, *.name, name:port or name:port:raw
        entry: String,
        /// Take the grant away by itself after this long (e.g. 30s, 10m, 2h; at most 365 days)
        #[arg(long = "for", value_name = "DURATION", value_parser = grant_duration)]
        for_: Option<std::time::Duration>,
    },
    /// Root only: remove every entry with this pattern (file entries until the next reload, and
    /// runtime grants), every port; its addresses leave the firewall and its open connections
    /// are killed. Exit 0 done, 1 refused, 2 cordon not reachable, 77 not root
    Deny {
        /// The pattern of the entry, as written: name or *.name
        name: String,
    },
    /// Root only: the policy's other tools
    Policy {
        #[command(subcommand)]
        what: PolicyWhat,
    },
    /// Internal: the supervisor process that `init` starts under its reaper
    #[command(hide = true)]
    Supervise,
    /// Internal: what the agent's tmux pane runs; records the agent's exit status
    #[command(hide = true, name = "pane-run")]
    PaneRun {
        #[arg(long)]
        status_file: PathBuf,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Internal: git's credential helper for the agent (gitcredentials(7))
    #[command(hide = true, name = "git-credential")]
    GitCredential {
        operation: String,
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    /// Internal: the readiness probes, run by the boot as the agent user
    #[command(hide = true)]
    Probe {
        #[arg(long)]
        spec: String,
    },
}

#[derive(Subcommand)]
enum StatusWhat {
    /// Why a name is allowed or denied, or whether an address is admitted and for which name
    Why {
        /// A domain name or an IP address
        target: String,
    },
}

#[derive(Subcommand)]
enum PolicyWhat {
    /// Print an allowlist file made from what observe mode (network.mode = "observe") let
    /// through: the entries in force, marked, then the observed names, wildcards only where
    /// several siblings were seen, each with its count and first-seen time
    Suggest,
}

/// Sends a policy request to the running cordon and prints its answer.
fn policy_request(source: &ConfigSource, command: &str, line: &str) -> ExitCode {
    let env = std::env::vars().collect();
    let config = cordon::cli::config_or_defaults(source, &env, command, &mut std::io::stderr());
    let (out, err, code) = cordon::cli::policy::client(&config.supervisor.state_dir, line);
    print!("{out}");
    eprint!("{err}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let source = ConfigSource::new(cli.config.clone());
    match cli.command.unwrap_or(Command::Init) {
        Command::Init => {
            let mut args = vec!["supervise".into()];
            if let Some(path) = cli.config {
                args.extend(["--config".into(), path.into_os_string()]);
            }
            cordon::supervise::reaper::run(args)
        }
        Command::Supervise => ExitCode::from(cordon::supervise::run(source).clamp(0, 255) as u8),
        Command::PaneRun { status_file, argv } => {
            ExitCode::from(cordon::session::tmux::pane_run(&status_file, &argv).clamp(0, 255) as u8)
        }
        Command::GitCredential { operation, hosts } => {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
            let stdin = std::io::stdin().lock();
            if let Some(answer) = cordon::session::credentials::helper(&operation, stdin, &hosts, &home) {
                print!("{answer}");
            }
            ExitCode::SUCCESS
        }
        Command::Probe { spec } => {
            let spec: cordon::egress::probe::Spec = match serde_json::from_str(&spec) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("cordon probe: bad spec: {e}");
                    return ExitCode::from(2);
                }
            };
            let results = cordon::egress::probe::run(&spec);
            println!("{}", serde_json::to_string(&results).expect("results serialise"));
            if results.iter().all(|r| r.ok) { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Command::Attach { no_wait, timeout } => {
            let env = std::env::vars().collect();
            let config = cordon::cli::config_or_defaults(&source, &env, "attach", &mut std::io::stderr());
            let opts = cordon::cli::attach::Options { no_wait, timeout };
            ExitCode::from(cordon::cli::attach::run(&config, &opts, &mut std::io::stdout()))
        }
        Command::Status { json, what } => {
            use std::io::IsTerminal;
            let env = std::env::vars().collect();
            let config = cordon::cli::config_or_defaults(&source, &env, "status", &mut std::io::stderr());
            let why = what.map(|StatusWhat::Why { target }| target);
            let (text, code) = cordon::cli::status::client(
                &config.supervisor.state_dir,
                json,
                why.as_deref(),
                std::io::stdout().is_terminal(),
            );
            print!("{text}");
            ExitCode::from(code)
        }
        Command::Reload => policy_request(&source, "reload", "reload"),
        Command::Allow { entry, for_ } => {
            let line = match for_ {
                Some(d) => format!("allow {entry} {}", d.as_secs().max(1)),
                None => format!("allow {entry}"),
            };
            policy_request(&source, "allow", &line)
        }
        Command::Deny { name } => policy_request(&source, "deny", &format!("deny {name}")),
        Command::Policy { what: PolicyWhat::Suggest } => policy_request(&source, "policy suggest", "suggest"),
        Command::Check { allowlist, no_secrets } => {
            let env = std::env::vars().collect();
            let options = cordon::cli::check::CheckOptions { allowlist, no_secrets };
            let report = cordon::cli::check::check(&source, &env, &options);
            print!("{}", report.effective);
            if report.problems.is_empty() {
                println!("# ok");
                ExitCode::SUCCESS
            } else {
                eprintln!("cordon check: {} problem(s):", report.problems.len());
                for p in &report.problems {
                    eprintln!("  - {p}");
                }
                ExitCode::from(2)
            }
        }
    }
}

/// The default log filter. hickory-server logs every request at `info`; cordon reports DNS
/// itself (denials, rate-limited, and counters in `cordon status`), so hickory says only
/// warnings unless `CORDON_LOG` asks for more.
const DEFAULT_LOG_FILTER: &str = "info,hickory_server=warn,hickory_proto=warn,hickory_resolver=warn";

/// Structured logs on stderr: text by default, JSON with `CORDON_LOG_FORMAT=json`; the level
/// from `CORDON_LOG` (an env-filter directive), default [`DEFAULT_LOG_FILTER`]. A line that
/// cannot be written is dropped and counted ([`DropOnError`]), never fatal.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("CORDON_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| DropOnError { inner: std::io::stderr(), dropped: &DROPPED_LOG_LINES })
        // Its fallback for a failed write is `eprintln!`, which panics when stderr is what failed.
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal());
    if std::env::var("CORDON_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Log lines dropped since the last one that could be written.
static DROPPED_LOG_LINES: AtomicU64 = AtomicU64::new(0);

/// A log writer that never fails: a line that cannot be written is dropped and counted, and
/// the count is reported by the next line that gets through. Log writes fail when stderr is a
/// pipe whose reader went away (EPIPE; SIGPIPE is ignored) or a terminal with `tostop` that
/// another process group holds (EIO); either is no reason for PID 1 to die, and with the
/// default writer it did (tracing-subscriber's fallback `eprintln!` panics).
struct DropOnError<W: Write> {
    inner: W,
    dropped: &'static AtomicU64,
}

impl<W: Write> Write for DropOnError<W> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let notice = format!("cordon: {dropped} log line(s) could not be written and were dropped\n");
            if self.inner.write_all(notice.as_bytes()).is_err() {
                self.dropped.fetch_add(dropped + 1, Ordering::Relaxed);
                return Ok(line.len());
            }
        }
        if self.inner.write_all(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.inner.flush();
        Ok(())
    }
}

/// `allow --for`: a humantime duration, within what a grant may last.
fn grant_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    cordon::state::admin::grant_duration(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_longer_than_a_year_is_refused_by_the_cli_before_it_reaches_cordon() {
        assert_eq!(grant_duration("2h").unwrap(), std::time::Duration::from_secs(7200));
        assert!(grant_duration("365days").is_ok());
        let e = grant_duration("366days").unwrap_err();
        assert!(e.contains("365 days") && e.contains("cordon reload"), "{e}");
        assert!(grant_duration("500000000years").unwrap_err().contains("365 days"), "no overflow");
        assert!(grant_duration("0s").unwrap_err().contains("above 0"));
    }

    /// Fails every write while `broken`, records the rest.
    struct Sink {
        broken: bool,
        written: Vec<u8>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.broken {
                return Err(std::io::Error::from_raw_os_error(nix::errno::Errno::EPIPE as i32));
            }
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn failed_log_writes_are_dropped_counted_and_reported_by_the_next_line() {
        static DROPPED: AtomicU64 = AtomicU64::new(0);
        let mut w = DropOnError { inner: Sink { broken: true, written: vec![] }, dropped: &DROPPED };
        for _ in 0..3 {
            assert!(w.write_all(b"lost\n").is_ok(), "a failed log write must not be an error");
        }
        assert_eq!(DROPPED.load(Ordering::Relaxed), 3);
        w.inner.broken = false;
        w.write_all(b"back\n").unwrap();
        assert_eq!(
            String::from_utf8(w.inner.written.clone()).unwrap(),
            "cordon: 3 log line(s) could not be written and were dropped\nback\n"
        );
        assert_eq!(DROPPED.load(Ordering::Relaxed), 0);
    }
}
