//! Errors that say how to fix them. A boot stage fails with one: the operator reads the error,
//! then the fix, in the boot log, `cordon status` and `cordon attach`. Each module's error type
//! implements [`Fix`]; [`Problem`] is the error with a fix for failures that need no type of
//! their own.

use std::fmt;

/// What a boot stage returns: its value and a one-line detail for the boot log, or an error
/// that carries its fix.
pub(crate) type StageResult<T, E = Problem> = Result<(T, String), E>;

/// An error that knows what the operator can do about it.
pub trait Fix: std::error::Error {
    /// The fix, when cordon knows one: "add --cap-add NET_ADMIN", "create the agent user".
    fn fix(&self) -> Option<String>;
}

/// An error with an optional fix, for failures without a type of their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    message: String,
    fix: Option<String>,
}

impl Problem {
    pub fn new(message: impl Into<String>) -> Problem {
        Problem { message: message.into(), fix: None }
    }

    /// `context`, then `e` and its whole `source()` chain.
    pub fn caused_by(context: impl fmt::Display, e: &dyn std::error::Error) -> Problem {
        Problem::new(format!("{context}: {}", error_chain(e)))
    }

    /// Any error with a fix, its chain in one line.
    pub fn from_fix(e: &dyn Fix) -> Problem {
        Problem { message: error_chain(e), fix: e.fix() }
    }

    pub fn with_fix(mut self, fix: impl Into<String>) -> Problem {
        self.fix = Some(fix.into());
        self
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Problem {}

impl Fix for Problem {
    fn fix(&self) -> Option<String> {
        self.fix.clone()
    }
}

/// An error and its `source()` chain, joined by ": ", in one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot mount tmpfs at /workspace")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_reads_as_one_line_from_the_operation_to_the_cause() {
        let e = Outer(std::io::Error::from_raw_os_error(nix::errno::Errno::EPERM as i32));
        assert_eq!(error_chain(&e), "cannot mount tmpfs at /workspace: Operation not permitted (os error 1)");
        let p = Problem::caused_by("filesystem", &e).with_fix("add --cap-add SYS_ADMIN");
        assert_eq!(p.to_string(), "filesystem: cannot mount tmpfs at /workspace: Operation not permitted (os error 1)");
        assert_eq!(p.fix().as_deref(), Some("add --cap-add SYS_ADMIN"));
    }
}
