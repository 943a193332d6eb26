//! Boot reporting: every stage's start, end, duration and outcome goes to the boot log
//! (`boot.log`, what `attach` shows a waiting operator), the state file (`state.json`, what
//! `status` reads) and the structured log on stderr. Records made before the state directory
//! exists are kept and written out as soon as it does.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = "state.json";
pub const BOOT_LOG: &str = "boot.log";
/// Held exclusively by cordon while it boots; `cordon attach` waits on it.
pub const BOOT_LOCK: &str = "boot.lock";

/// `text` with every control character but the tab made visible: C0 (ESC included) and DEL in
/// caret notation (`^[`, `^M`, `^?`), C1 (U+0080..U+009F, which some terminals read as CSI
/// and OSC too) as `\u{9b}`. Text a tool of the agent wrote can then reach the operator's
/// terminal (`attach` prints the boot log, `status` the warnings) without an escape sequence
/// in it: no OSC 52 clipboard write, title change or injected input.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\t' => out.push(c),
            '\u{7f}' => out.push_str("^?"),
            c if (c as u32) < 0x20 => {
                out.push('^');
                out.push(char::from(c as u8 ^ 0x40));
            }
            c if (0x80..=0x9f).contains(&(c as u32)) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// [`printable`], line by line: for cordon's own multi-line text (a configuration error quoting
/// its line, a hint) that may carry a tool's output.
pub fn printable_lines(text: &str) -> String {
    text.split('\n').map(printable).collect::<Vec<_>>().join("\n")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Running,
    Ok,
    Failed,
    Skipped,
    /// cordon was asked to stop (SIGTERM, SIGINT) while the stage ran; the boot ended there.
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    pub name: String,
    pub started_at: String,
    pub duration_ms: Option<f64>,
    pub outcome: Outcome,
    /// What the stage did, in one line (or why it was skipped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Booting,
    Ready,
    Degraded,
    Failed,
    Stopping,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    pub pid: Option<u32>,
    pub running: bool,
    pub restarts: u32,
    /// Shell convention: the exit code, or 128 + signal.
    pub last_exit: Option<i32>,
    /// With `supervisor.idle_stop`: how long the agent has been idle, as of the last sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<IdleState>,
}

/// The idle stop's view of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdleState {
    /// Seconds the agent has been idle.
    pub idle_s: u64,
    /// `supervisor.idle_stop`, in seconds: cordon stops when `idle_s` reaches it.
    pub stop_after_s: u64,
}

/// The machine-readable state: the schema of `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub pid: u32,
    /// "pid1" or "subreaper": how the reaper above this supervisor runs.
    pub init_mode: String,
    pub started_at: String,
    pub phase: Phase,
    /// Why the phase is degraded or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub boot_ms: Option<f64>,
    pub stages: Vec<StageRecord>,
    pub agent: Option<AgentState>,
    pub warnings: Vec<String>,
}

pub struct Report {
    /// The boot lock, held exclusively until the boot is ready or failed.
    boot_lock: Option<fs::File>,
    /// Every change, for the control socket's live answers.
    live: tokio::sync::watch::Sender<State>,
    dir: Option<PathBuf>,
    started: Instant,
    stage_started: Option<Instant>,
    /// Boot log lines produced before the state directory existed.
    pending_log: Vec<String>,
    pub state: State,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl Report {
    pub fn new(init_mode: &str) -> Report {
        let state = State {
            version: 1,
            pid: std::process::id(),
            init_mode: init_mode.into(),
            started_at: now_rfc3339(),
            phase: Phase::Booting,
            reason: None,
            boot_ms: None,
            stages: Vec::new(),
            agent: None,
            warnings: Vec::new(),
        };
        Report {
            boot_lock: None,
            live: tokio::sync::watch::Sender::new(state.clone()),
            dir: None,
            started: Instant::now(),
            stage_started: None,
            pending_log: Vec::new(),
            state,
        }
    }

    /// A receiver of every state change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<State> {
        self.live.subscribe()
    }

    /// Where files go from now on; writes out everything recorded so far, and takes the boot
    /// lock (unless the boot is already over).
    pub fn attach_dir(&mut self, dir: &Path) {
        self.dir = Some(dir.to_path_buf());
        if self.state.phase == Phase::Booting {
            match take_boot_lock(dir) {
                Ok(lock) => self.boot_lock = Some(lock),
                Err(e) => tracing::warn!("cannot take the boot lock in {}: {e}", dir.display()),
            }
        }
        for stamped in std::mem::take(&mut self.pending_log) {
            self.append_log(&stamped);
        }
        self.flush();
    }

    pub fn begin(&mut self, name: &str) {
        tracing::info!(stage = name, "stage started");
        self.stage_started = Some(Instant::now());
        self.state.stages.push(StageRecord {
            name: name.into(),
            started_at: now_rfc3339(),
            duration_ms: None,
            outcome: Outcome::Running,
            detail: None,
            error: None,
            hint: None,
        });
        self.log_line(format!("{name}: started"));
        self.flush();
    }

    fn finish(&mut self, outcome: Outcome, detail: Option<String>, error: Option<String>, hint: Option<String>) {
        let ms = self.stage_started.take().map(|t| round_ms(t.elapsed().as_secs_f64() * 1000.0));
        let Some(rec) = self.state.stages.last_mut() else { return };
        rec.duration_ms = ms;
        rec.outcome = outcome.clone();
        // A detail may quote the agent's repository (a devcontainer.json's commands); `status`
        // prints these.
        rec.detail = detail.as_deref().map(printable_lines);
        rec.error = error.as_deref().map(printable_lines);
        rec.hint = hint.as_deref().map(printable_lines);
        let name = rec.name.clone();
        let took = ms.map(|m| format!(" ({m:.1} ms)")).unwrap_or_default();
        let line = match outcome {
            Outcome::Ok => {
                tracing::info!(stage = %name, duration_ms = ms, detail = rec.detail.as_deref(), "stage ok");
                format!("{name}: ok{took}{}", rec.detail.as_ref().map(|d| format!(" - {d}")).unwrap_or_default())
            }
            Outcome::Skipped => {
                tracing::info!(stage = %name, reason = rec.detail.as_deref(), "stage skipped");
                format!("{name}: skipped - {}", rec.detail.as_deref().unwrap_or(""))
            }
            Outcome::Failed => {
                tracing::error!(stage = %name, error = rec.error.as_deref(), hint = rec.hint.as_deref(), "stage failed");
                let mut l = format!("{name}: FAILED{took}: {}", rec.error.as_deref().unwrap_or("unknown error"));
                if let Some(h) = &rec.hint {
                    l.push_str(&format!("\n    hint: {h}"));
                }
                l
            }
            Outcome::Stopped => {
                tracing::info!(stage = %name, duration_ms = ms, "stage stopped");
                format!("{name}: STOPPED{took}: {}", rec.error.as_deref().unwrap_or("cordon was asked to stop"))
            }
            Outcome::Running => return,
        };
        self.log_line(line);
        self.flush();
    }

    pub fn ok(&mut self, detail: impl Into<Option<String>>) {
        self.finish(Outcome::Ok, detail.into(), None, None);
    }

    pub fn skip(&mut self, reason: &str) {
        self.finish(Outcome::Skipped, Some(reason.into()), None, None);
    }

    /// Marks the current stage failed and the whole boot with it.
    pub fn fail(&mut self, error: String, hint: Option<String>) {
        let error = printable_lines(&error);
        let stage = self.state.stages.last().map(|s| s.name.clone()).unwrap_or_default();
        self.state.phase = Phase::Failed;
        self.state.reason = Some(format!("boot failed at stage {stage}: {error}"));
        self.finish(Outcome::Failed, None, Some(error), hint);
        self.log_line("boot failed; the agent was not started".into());
        self.flush();
        self.boot_lock = None;
    }

    /// The boot was asked to stop during the current stage: the stage and the boot end there,
    /// and the phase is `stopping` with the reason `stopped during <stage>` until the
    /// supervisor's stop completes.
    pub fn stopped(&mut self, why: &str) {
        let stage = self.state.stages.last().map(|s| s.name.clone()).unwrap_or_default();
        self.state.phase = Phase::Stopping;
        self.state.reason = Some(format!("stopped during {stage}"));
        self.finish(Outcome::Stopped, None, Some(why.into()), None);
        self.log_line(format!("boot stopped during stage {stage}; the agent was not started"));
        self.flush();
        self.boot_lock = None;
    }

    /// A progress line of the running stage, for the boot log only.
    /// `line` may be a tool's output (the agent's own programs: `claude plugin`, a devcontainer
    /// command), so its control characters are shown, not sent to the operator's terminal.
    pub fn progress(&mut self, line: &str) {
        self.log_line(format!("  {}", printable(line)));
    }

    pub fn warn(&mut self, warning: String) {
        // A warning may quote a tool's output (a failed `claude plugin`'s last lines).
        let warning = printable(&warning);
        tracing::warn!("{warning}");
        self.log_line(format!("warning: {warning}"));
        self.state.warnings.push(warning);
        self.flush();
    }

    /// Boot is complete.
    pub fn ready(&mut self) {
        let ms = round_ms(self.started.elapsed().as_secs_f64() * 1000.0);
        self.state.boot_ms = Some(ms);
        self.state.phase = Phase::Ready;
        tracing::info!(boot_ms = ms, "ready");
        self.log_line(format!("ready in {ms:.1} ms"));
        self.flush();
        self.boot_lock = None;
    }

    pub fn set_phase(&mut self, phase: Phase, reason: Option<String>) {
        if self.state.phase != phase {
            tracing::info!(phase = ?phase, reason = reason.as_deref(), "phase changed");
            self.log_line(format!(
                "{}{}",
                format!("{phase:?}").to_lowercase(),
                reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
            ));
        }
        self.state.phase = phase;
        self.state.reason = reason;
        self.flush();
    }

    pub fn set_agent(&mut self, agent: AgentState) {
        self.state.agent = Some(agent);
        self.flush();
    }

    fn log_line(&mut self, line: String) {
        // The last layer before the file `attach` prints: a line break is the log's own.
        let line = printable_lines(&line);
        let stamped = format!("[{:>9.3}s] {line}\n", self.started.elapsed().as_secs_f64());
        if self.dir.is_some() {
            self.append_log(&stamped);
        } else {
            self.pending_log.push(stamped);
        }
    }

    fn append_log(&self, stamped: &str) {
        let Some(dir) = &self.dir else { return };
        let appended = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(BOOT_LOG))
            .and_then(|mut f| f.write_all(stamped.as_bytes()));
        if let Err(e) = appended {
            tracing::warn!("cannot append to {}: {e}", dir.join(BOOT_LOG).display());
        }
    }

    /// Writes `state.json` atomically (temporary file, then rename), so a reader never sees
    /// half a file.
    fn flush(&self) {
        self.live.send_replace(self.state.clone());
        let Some(dir) = &self.dir else { return };
        let tmp = dir.join(".state.json.tmp");
        let json = serde_json::to_vec_pretty(&self.state).expect("state serialises");
        let written = fs::write(&tmp, json).and_then(|_| fs::rename(&tmp, dir.join(STATE_FILE)));
        if let Err(e) = written {
            tracing::warn!("cannot write {}: {e}", dir.join(STATE_FILE).display());
        }
    }
}

/// Creates the boot lock already locked: the file is locked under a temporary name and then
/// renamed into place, so nobody ever sees it unlocked while the boot runs. Root-only (0600):
/// the agent can neither take nor replace it (the directory is root's).
fn take_boot_lock(dir: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(".boot.lock.tmp");
    let _ = fs::remove_file(&tmp);
    let file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    file.lock()?;
    fs::rename(&tmp, dir.join(BOOT_LOCK))?;
    Ok(file)
}

fn round_ms(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

/// Reads a state file written by a running (or stopped) cordon.
pub fn read_state(dir: &Path) -> std::io::Result<State> {
    let bytes = fs::read(dir.join(STATE_FILE))?;
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_but_the_tab_are_shown_not_sent() {
        assert_eq!(printable("a\tb"), "a\tb");
        assert_eq!(printable("\x1b]52;c;ZXZpbA==\x07"), "^[]52;c;ZXZpbA==^G");
        assert_eq!(printable("over\rwrite\nline\x7f"), "over^Mwrite^Jline^?");
        assert_eq!(printable("\u{9b}31m\u{80}\u{a0}é"), "\\u{9b}31m\\u{80}\u{a0}é");
    }

    #[test]
    fn a_tools_output_reaches_the_boot_log_and_the_warnings_printable() {
        let dir = std::env::temp_dir().join(format!("cordon-report-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = Report::new("pid1");
        r.attach_dir(&dir);
        r.begin("claude");
        r.progress("claude plugin install x: \x1b]52;c;ZXZpbA==\x07");
        r.warn("`claude plugin install x` failed: \x1b[2J\nready in 1 ms".into());
        r.ok(Some("ran `\x1b]0;title\x07`".into()));
        assert_eq!(r.state.stages[0].detail.as_deref(), Some("ran `^[]0;title^G`"), "status prints the detail");
        let log = std::fs::read_to_string(dir.join(BOOT_LOG)).unwrap();
        assert!(!log.contains('\x1b') && !log.contains('\x07'), "{log:?}");
        assert!(log.contains("claude plugin install x: ^[]52;c;ZXZpbA==^G"), "{log:?}");
        assert!(log.lines().all(|l| l.starts_with('[')), "a tool cannot start a log line of its own: {log:?}");
        assert!(r.state.warnings[0].contains("^[[2J^Jready"), "{:?}", r.state.warnings);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
