//! `cordon status [--json] [why TARGET]`: asks the running cordon over its control socket and
//! renders the answer; where cordon does not answer, shows the last state file it wrote.

use crate::state::status::{StatusDoc, WhyDoc, exit_code, from_state, render_human, render_why, socket_path};

/// `cordon status [--json] [why TARGET]`: what to print and the exit status (0 ready, 1 not
/// ready, 2 cordon cannot be reached at all).
pub fn client(state_dir: &std::path::Path, json: bool, why_target: Option<&str>, color: bool) -> (String, u8) {
    let socket = socket_path(state_dir);
    if let Some(target) = why_target {
        return match crate::state::control::request(state_dir, &format!("why {target}")) {
            Ok(reply) => match serde_json::from_str::<WhyDoc>(&reply) {
                Ok(doc) if json => (format!("{}\n", serde_json::to_string_pretty(&doc).unwrap_or(reply)), 0),
                Ok(doc) => (render_why(&doc), 0),
                Err(_) => (reply, 2),
            },
            Err(e) => {
                (format!("cordon is not answering on {} ({e}); `why` needs the running cordon\n", socket.display()), 2)
            }
        };
    }
    let doc = match crate::state::control::request(state_dir, "status").map(|r| serde_json::from_str::<StatusDoc>(&r)) {
        Ok(Ok(doc)) => doc,
        // Shown for what it tells, but a cordon that does not answer is not healthy, whatever
        // its last state said.
        _ => match crate::state::report::read_state(state_dir) {
            Ok(state) => {
                let doc = from_state(&state, "state-file");
                let out = if json {
                    format!("{}\n", serde_json::to_string_pretty(&doc).expect("status serialises"))
                } else {
                    render_human(&doc, color)
                };
                return (out, 2);
            }
            Err(e) => {
                return (
                    format!(
                        "cordon is not running here: no answer on {} and no state file in {} ({e}).\n\
                         Is this the container cordon runs in, and is supervisor.state_dir the same?\n",
                        socket.display(),
                        state_dir.display()
                    ),
                    2,
                );
            }
        },
    };
    let code = exit_code(&doc);
    if json {
        (format!("{}\n", serde_json::to_string_pretty(&doc).expect("status serialises")), code)
    } else {
        (render_human(&doc, color), code)
    }
}
