//! `cordon reload`, `cordon allow`, `cordon deny` and `cordon policy suggest`: requests to the
//! running cordon's admin socket, root only (see `state::admin`).

use std::path::Path;

/// The change was made (or the suggestion printed).
pub const EXIT_DONE: u8 = 0;
/// cordon refused the change (a bad allowlist, an entry that is not there...): the policy is
/// as it was.
pub const EXIT_REFUSED: u8 = 1;
/// cordon is not running here, or did not answer.
pub const EXIT_UNREACHABLE: u8 = 2;
/// Not root: only root may change the egress policy (sysexits' EX_NOPERM).
pub const EXIT_PERMISSION: u8 = 77;

/// Sends `line` to the admin socket in `state_dir`: what to print on stdout, on stderr, and the
/// exit status.
pub fn client(state_dir: &Path, line: &str) -> (String, String, u8) {
    let socket = crate::state::admin::socket_path(state_dir);
    match crate::state::admin::request(state_dir, line) {
        Ok(reply) => {
            let ok = reply["ok"].as_bool().unwrap_or(false);
            let message = reply["message"].as_str().unwrap_or("").to_string();
            let text = reply["text"].as_str().unwrap_or("").to_string();
            if ok {
                let message = if message.is_empty() { message } else { format!("cordon: {message}\n") };
                (text, message, EXIT_DONE)
            } else if reply["permission_denied"].as_bool().unwrap_or(false) {
                (String::new(), format!("cordon: {message}\n"), EXIT_PERMISSION)
            } else {
                (String::new(), format!("cordon: refused, the policy is unchanged: {message}\n"), EXIT_REFUSED)
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => (
            String::new(),
            format!(
                "cordon: permission denied: only root may change the egress policy ({} is root's only)\n",
                socket.display()
            ),
            EXIT_PERMISSION,
        ),
        Err(e) => (
            String::new(),
            format!(
                "cordon: no answer on {} ({e}); is cordon running here, with the same supervisor.state_dir?\n",
                socket.display()
            ),
            EXIT_UNREACHABLE,
        ),
    }
}
