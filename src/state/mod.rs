//! What cordon reports: the boot log and state file (`report`), the status document and `why`
//! (`status`), and the control socket that answers from the live state (`control`).

pub mod control;
pub mod report;
pub mod status;
