//! The subcommands an operator runs, on top of everything else: `check`, `attach`, `status`, and
//! the policy changes (`reload`, `allow`, `deny`, `policy suggest`).

use std::collections::BTreeMap;
use std::io::Write;

use crate::config::{Config, ConfigSource};

pub mod attach;
pub mod check;
pub mod policy;
pub mod status;

/// The configuration for `attach` and `status`, which still have something to say when it is
/// broken: loaded the one way ([`ConfigSource::load`]), or else the built-in defaults, and the
/// operator told so on `err`, never silently.
pub fn config_or_defaults(
    source: &ConfigSource,
    env: &BTreeMap<String, String>,
    command: &str,
    err: &mut dyn Write,
) -> Config {
    source.load(env).unwrap_or_else(|e| {
        let defaults = Config::default();
        let _ = writeln!(
            err,
            "cordon {command}: {e}\ncordon {command}: going on with the built-in defaults (state directory {}); \
             fix the file and check it with `cordon check`",
            defaults.supervisor.state_dir.display()
        );
        defaults
    })
}
