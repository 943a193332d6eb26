//! What cordon reports: the boot log and state file (`report`), the status document and `why`
//! (`status`), the control socket that answers from the live state (`control`), and the same
//! live state as OpenMetrics for Prometheus (`metrics`).

pub(crate) mod control;
pub(crate) mod metrics;
pub mod report;
pub(crate) mod status;

use std::path::Path;
use std::sync::Arc;

use crate::fix::Problem;

/// The boot's `state` stage, right after the config: the state directory (a tmpfs, or the root
/// with a warning), the boot log and state file in it, and the control socket answering from
/// `live`. From here on every failure, the config's included, is visible to an operator who
/// attaches.
pub fn open(
    state_dir: &Path,
    report: &mut report::Report,
    live: &Arc<control::Live>,
    services: &crate::service::Services,
    sys: &dyn crate::sys::effects::Effects,
) -> crate::fix::StageResult<()> {
    let warning = crate::mounts::prepare_state_dir(state_dir, sys).map_err(|e| Problem::from_fix(&e))?;
    report.attach_dir(state_dir);
    if let Some(w) = warning {
        report.warn(w);
    }
    let listener = control::bind(state_dir).map_err(|e| {
        Problem::caused_by(format_args!("cannot bind the control socket in {}", state_dir.display()), &e)
    })?;
    services.add(control::serve(listener, live.clone()));
    Ok(((), format!("{}, control socket ready", state_dir.display())))
}

/// Part of the `filesystem` stage: the agent's group may query the control socket, and `status`
/// learns which tmpfs mounts to report.
pub fn admit_agent(
    state_dir: &Path,
    gid: u32,
    tmpfs: Vec<std::path::PathBuf>,
    live: &control::Live,
) -> Result<(), Problem> {
    control::grant(state_dir, gid)
        .map_err(|e| Problem::caused_by("cannot open the control socket to the agent's group", &e))?;
    let _ = live.tmpfs.set(tmpfs);
    Ok(())
}
