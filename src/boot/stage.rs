//! How a stage runs: its start, outcome, duration and detail recorded in the report, its error
//! and fix ([`Fix`]) on failure, and the boot's stop request honoured before and during it.

use crate::fix::{Fix, error_chain};
use crate::state::report::Report;
use crate::sys::command::BOOT;

/// Why the boot ended before its last stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    /// A stage failed; the report holds its error and fix.
    Failed,
    /// cordon was asked to stop (`command::BOOT`) before or during a stage.
    Stopped,
}

const STOP_REQUESTED: &str = "cordon was asked to stop (SIGTERM or SIGINT)";

/// The boot's report, stage by stage.
pub(super) struct Stages<'a> {
    pub(super) report: &'a mut Report,
}

impl Stages<'_> {
    /// Runs one stage. `run` returns its value and a one-line detail for the boot log, or an
    /// error with its fix. A stop request ends the boot at the next stage, or at once when the
    /// stage is running a command, which is killed; a stage that fails after a stop request is
    /// recorded as stopped, since its error is most likely the kill.
    pub(super) fn run<T, E: Fix>(
        &mut self,
        name: &str,
        run: impl FnOnce(&mut Report) -> Result<(T, String), E>,
    ) -> Result<T, Ended> {
        self.report.begin(name);
        if BOOT.is_requested() {
            self.report.stopped(STOP_REQUESTED);
            return Err(Ended::Stopped);
        }
        match run(self.report) {
            Ok((value, detail)) => {
                self.report.ok(detail);
                Ok(value)
            }
            Err(_) if BOOT.is_requested() => {
                self.report.stopped(STOP_REQUESTED);
                Err(Ended::Stopped)
            }
            Err(e) => {
                self.report.fail(error_chain(&e), e.fix());
                Err(Ended::Failed)
            }
        }
    }

    /// Records a stage that does not apply to this configuration, and why: every boot reports
    /// every stage.
    pub(super) fn skip(&mut self, name: &str, why: &str) {
        self.report.begin(name);
        self.report.skip(why);
    }
}
