//! The clone stage: `repo.url` at `repo.branch` into `repo.dest`, as the agent user, through the
//! firewall, authenticated by the credential helper, with a timeout and progress in the boot log.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// git's argv for the clone: options, then `--`, so the URL can never be read as one.
pub fn clone_args(url: &str, dest: &Path, branch: Option<&str>, depth: Option<u32>) -> Vec<String> {
    let mut args = vec!["clone".to_string(), "--progress".into()];
    if let Some(b) = branch {
        args.extend(["--branch".into(), b.into(), "--single-branch".into()]);
    }
    if let Some(d) = depth {
        args.extend(["--depth".into(), d.to_string()]);
    }
    args.extend(["--".into(), url.into(), dest.display().to_string()]);
    args
}

/// Runs `cmd` (already set up to run as the agent) with a deadline; git's progress lines go to
/// `progress`. Returns the last lines of git's output as the error on failure.
pub fn run(mut cmd: Command, timeout: Duration, mut progress: impl FnMut(&str)) -> Result<(), String> {
    let mut child =
        cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().map_err(|e| format!("cannot run git: {e}"))?;
    let mut stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut line = Vec::new();
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            for &b in &buf[..n] {
                if b == b'\n' || b == b'\r' {
                    if !line.is_empty() {
                        let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
                        line.clear();
                    }
                } else {
                    line.push(b);
                }
            }
        }
        if !line.is_empty() {
            let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
        }
    });
    let deadline = Instant::now() + timeout;
    let mut tail: Vec<String> = Vec::new();
    let mut last_shown = Instant::now() - Duration::from_secs(1);
    let mut last_phase = String::new();
    let status = loop {
        while let Ok(line) = rx.try_recv() {
            // Throttled: a new phase at once, the same phase's percentages once a second.
            let phase = line.split(':').next().unwrap_or("").to_string();
            if phase != last_phase || last_shown.elapsed() >= Duration::from_secs(1) || line.contains("done") {
                progress(&line);
                last_shown = Instant::now();
                last_phase = phase;
            }
            tail.push(line);
            if tail.len() > 6 {
                tail.remove(0);
            }
        }
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = reader.join();
                return Err(format!("the clone did not finish within {}", humantime::format_duration(timeout)));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("waiting for git failed: {e}")),
        }
    };
    let _ = reader.join();
    tail.extend(rx.try_iter());
    if status.success() {
        Ok(())
    } else {
        let last: Vec<&String> = tail.iter().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect();
        Err(format!("git clone failed ({status}): {}", last.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" | ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clone_arguments_end_with_a_double_dash_before_the_url() {
        let args = clone_args("https://github.com/o/r.git", Path::new("/workspace/repo"), Some("dev"), Some(1));
        assert_eq!(
            args,
            [
                "clone",
                "--progress",
                "--branch",
                "dev",
                "--single-branch",
                "--depth",
                "1",
                "--",
                "https://github.com/o/r.git",
                "/workspace/repo"
            ]
        );
    }
}
