//! Agent-aware idle stop (`supervisor.idle_stop`): cordon stops, exit status 0, once the agent
//! has done nothing for that long, so a Fly Machine or a pod stops and costs nothing.
//!
//! "Nothing" is judged from outside the agent, sample by sample: no client attached to its tmux
//! session; no output in its tmux window (`#{window_activity}`; a headless agent's stdout and
//! stderr are not captured, they go where cordon's go, so there the CPU time stands for it);
//! its processes (every live process of the agent's uid below the reaper: the agent, its
//! children, the tmux server and the shell pane) used less than [`CPU_SHARE`] of one CPU; and
//! none of the agent's TCP sockets is established. A long model call in flight holds an
//! established connection: it is work, not idleness.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::session::tmux::Tmux;

/// CPU use below this share of one CPU (1%) is no activity: a sleeping shell and an idle tmux
/// server wake up now and then.
pub const CPU_SHARE: f64 = 0.01;
/// The smallest CPU use that counts, whatever the interval: two clock ticks (the kernel counts
/// CPU time in ticks of 10 ms, USER_HZ = 100, fixed for /proc on Linux).
const CPU_FLOOR_MS: u64 = 20;
const MS_PER_TICK: u64 = 10;

/// What one sample saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observation {
    /// A client is attached to the agent's tmux session.
    pub attached: bool,
    /// When the agent's window last had output, as tmux stamps it (seconds); None headless.
    pub output: Option<u64>,
    /// CPU time (user + system, with that of reaped children) of each of the agent's processes,
    /// in milliseconds, by pid.
    pub cpu_ms: BTreeMap<i32, u64>,
    /// Established TCP connections of the agent's uid.
    pub connections: usize,
}

/// Since when the agent has been idle, from a series of observations.
#[derive(Debug)]
pub struct Idle {
    since: Instant,
    last: Option<(Instant, Observation)>,
}

impl Idle {
    /// Idle from `now` on, until an observation says otherwise.
    pub fn new(now: Instant) -> Idle {
        Idle { since: now, last: None }
    }

    /// Takes one observation made at `now`; returns the activity it shows, if any (which resets
    /// the idle time). The first one is the baseline for output and CPU.
    pub fn observe(&mut self, now: Instant, obs: Observation) -> Option<&'static str> {
        let activity = self.activity(now, &obs);
        if activity.is_some() {
            self.since = now;
        }
        self.last = Some((now, obs));
        activity
    }

    fn activity(&self, now: Instant, obs: &Observation) -> Option<&'static str> {
        if obs.attached {
            return Some("a client is attached");
        }
        if obs.connections > 0 {
            return Some("an established connection");
        }
        let (at, last) = self.last.as_ref()?;
        if obs.output.is_some() && obs.output != last.output {
            return Some("output");
        }
        // Per process, what it used since the last sample (a process that exited takes its
        // time with it; one that is new counts in full).
        let used: u64 =
            obs.cpu_ms.iter().map(|(pid, ms)| ms.saturating_sub(last.cpu_ms.get(pid).copied().unwrap_or(0))).sum();
        let allowed = ((now.duration_since(*at).as_millis() as f64 * CPU_SHARE) as u64).max(CPU_FLOOR_MS);
        (used > allowed).then_some("CPU")
    }

    pub fn idle_since(&self) -> Instant {
        self.since
    }

    pub fn idle_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.since)
    }
}

/// How often to sample for a given `idle_stop`: about ten samples in it, every 1 to 10 s.
pub fn interval(idle_stop: Duration) -> Duration {
    (idle_stop / 10).clamp(Duration::from_secs(1), Duration::from_secs(10))
}

/// The supervisor's watch over the agent for the idle stop: one sample per [`interval`].
pub struct Watch {
    idle_stop: Option<Duration>,
    uid: u32,
    reaper: i32,
    tmux: Option<Tmux>,
    idle: Idle,
}

impl Watch {
    /// `uid` is the agent's, `reaper` the pid of cordon's reaper. Without `idle_stop`, it never
    /// samples.
    pub fn new(idle_stop: Option<Duration>, uid: u32, reaper: i32, tmux: Option<Tmux>) -> Watch {
        Watch { idle_stop, uid, reaper, tmux, idle: Idle::new(Instant::now()) }
    }

    /// Waits for the next sample and takes it: how long the agent has been idle as of it.
    /// Never resolves without `idle_stop`. Cancel-safe: a cancelled wait only delays the sample.
    pub async fn next(&mut self) -> Duration {
        let Some(idle_stop) = self.idle_stop else { return std::future::pending().await };
        loop {
            tokio::time::sleep(interval(idle_stop)).await;
            let (uid, reaper, tmux) = (self.uid, self.reaper, self.tmux.clone());
            // tmux commands block (with their deadline): off the runtime's threads.
            let Ok(obs) = tokio::task::spawn_blocking(move || sample(uid, reaper, tmux.as_ref())).await else {
                continue;
            };
            let now = Instant::now();
            if let Some(what) = self.idle.observe(now, obs) {
                tracing::debug!(what, "agent active");
            }
            return self.idle.idle_for(now);
        }
    }
}

/// One observation, from /proc and the agent's tmux server.
pub fn sample(uid: u32, reaper: i32, tmux: Option<&Tmux>) -> Observation {
    let table = crate::sys::processes();
    let cpu_ms = crate::sys::live_descendants(reaper, &table)
        .into_iter()
        .filter(|pid| process_uid(*pid) == Some(uid))
        .filter_map(|pid| Some((pid, cpu_ms(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?)))
        .collect();
    let connections = ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .iter()
        .map(|f| established(&std::fs::read_to_string(f).unwrap_or_default(), uid))
        .sum();
    let (attached, output) = match tmux {
        Some(t) => (!t.clients().is_empty(), t.window_activity()),
        None => (false, None),
    };
    Observation { attached, output, cpu_ms, connections }
}

/// The real uid of a process, from `/proc/PID/status`.
fn process_uid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()
}

/// utime + stime + cutime + cstime of a `/proc/PID/stat` line, in milliseconds (proc(5): fields
/// 14 to 17, counted after the command name, which may hold spaces and parentheses).
pub fn cpu_ms(stat: &str) -> Option<u64> {
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields.get(11..15)?.iter().map(|f| f.parse::<u64>().ok()).sum::<Option<u64>>()?;
    Some(ticks * MS_PER_TICK)
}

/// How many sockets of `uid` in a `/proc/net/tcp{,6}` table are ESTABLISHED (state 01).
pub fn established(table: &str, uid: u32) -> usize {
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(3) == Some(&"01") && f.get(7).and_then(|u| u.parse::<u32>().ok()) == Some(uid)
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(cpu: &[(i32, u64)]) -> Observation {
        Observation { cpu_ms: cpu.iter().copied().collect(), ..Observation::default() }
    }

    #[test]
    fn a_quiet_agent_is_idle_from_the_start_and_any_activity_resets_it() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut idle = Idle::new(t0);
        assert_eq!(idle.observe(s(10), obs(&[(5, 1_000)])), None, "the first sample is the baseline");
        assert_eq!(idle.observe(s(20), obs(&[(5, 1_010)])), None, "10 ms in 10 s is nothing");
        assert_eq!(idle.idle_for(s(20)), Duration::from_secs(20));
        assert_eq!(idle.observe(s(30), obs(&[(5, 1_500)])), Some("CPU"));
        assert_eq!(idle.idle_since(), s(30));
        let attached = Observation { attached: true, ..obs(&[(5, 1_500)]) };
        assert_eq!(idle.observe(s(40), attached), Some("a client is attached"));
        let calling = Observation { connections: 1, ..obs(&[(5, 1_500)]) };
        assert_eq!(idle.observe(s(50), calling), Some("an established connection"), "a model call in flight");
        assert_eq!(idle.observe(s(60), obs(&[(5, 1_500)])), None);
        assert_eq!(idle.idle_for(s(90)), Duration::from_secs(40));
    }

    #[test]
    fn output_counts_when_the_stamp_moves_and_cpu_is_counted_per_process() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut idle = Idle::new(t0);
        let out = |stamp, cpu: &[(i32, u64)]| Observation { output: Some(stamp), ..obs(cpu) };
        assert_eq!(idle.observe(s(1), out(100, &[(5, 50), (6, 9_000)])), None);
        assert_eq!(idle.observe(s(2), out(100, &[(5, 50), (6, 9_000)])), None);
        assert_eq!(idle.observe(s(3), out(103, &[(5, 50), (6, 9_000)])), Some("output"));
        // Process 6 exited (its time leaves the sum) and 7 started: only 7's own time counts.
        assert_eq!(idle.observe(s(4), out(103, &[(5, 50), (7, 10)])), None);
        assert_eq!(idle.observe(s(5), out(103, &[(5, 50), (7, 400)])), Some("CPU"), "a busy new process");
    }

    #[test]
    fn cpu_time_is_read_after_the_command_name_and_established_sockets_by_uid() {
        let stat = "42 (a (weird) name) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 2 1 20 0 1 0 100 0 0";
        assert_eq!(cpu_ms(stat), Some((7 + 3 + 2 + 1) * 10));
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 100 1
   1: 0200000A:C350 0A0200C0:01BB 01 00000000:00000000 00:00000000 00000000  4242        0 101 1
   2: 0200000A:C351 0A0200C0:01BB 06 00000000:00000000 00:00000000 00000000  4242        0 0 1
   3: 0200000A:C352 0A0200C0:01BB 01 00000000:00000000 00:00000000 00000000     0        0 103 1";
        assert_eq!(established(tcp, 4242), 1, "one established socket of the agent; TIME_WAIT and root's do not count");
        assert_eq!(established(tcp, 1), 0);
    }

    #[test]
    fn sampling_is_a_tenth_of_idle_stop_between_one_and_ten_seconds() {
        assert_eq!(interval(Duration::from_secs(3)), Duration::from_secs(1));
        assert_eq!(interval(Duration::from_secs(60)), Duration::from_secs(6));
        assert_eq!(interval(Duration::from_secs(1800)), Duration::from_secs(10));
    }
}
