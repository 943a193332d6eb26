//! `cordon check`: validates the configuration, the allowlist and the presence of required
//! secrets, and prints the effective configuration with every secret value redacted. It has no
//! side effects at all.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;

use crate::config::secrets::{Problem, Secrets};
use crate::config::{Config, ConfigSource, load_allowlist};

/// What `check` found: the text to print on stdout, and every problem.
pub struct CheckReport {
    pub effective: String,
    pub problems: Vec<String>,
}

/// How to check: for a file checked away from the container it describes.
#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    /// The allowlist file to check instead of `network.allowlist`.
    pub allowlist: Option<PathBuf>,
    /// Check everything but the presence of the secrets.
    pub no_secrets: bool,
}

pub fn check(source: &ConfigSource, env: &BTreeMap<String, String>, options: &CheckOptions) -> CheckReport {
    let mut problems = Vec::new();
    let mut config = source.load(env).unwrap_or_else(|e| {
        problems.push(e.to_string());
        // Keep checking what can be checked with the defaults (secrets), so one run lists as
        // much as possible.
        Config::default()
    });
    if let Some(path) = &options.allowlist {
        config.network.allowlist = path.clone();
    }
    let config_ok = problems.is_empty();

    let mut out = String::new();
    let origin = if source.path.exists() {
        source.path.display().to_string()
    } else {
        format!("{} (absent: built-in defaults)", source.path.display())
    };
    let _ = writeln!(out, "# cordon check: {origin}");
    let _ = writeln!(out, "# effective configuration: file, then environment overrides; secret values are never shown");

    let entries = load_allowlist(&config);
    match &entries {
        Ok(e) => {
            let _ = writeln!(
                out,
                "# allowlist: {} entries ({} + network.allow)",
                e.len(),
                config.network.allowlist.display()
            );
        }
        Err(errors) => {
            problems.extend(errors.iter().cloned());
            if options.allowlist.is_none() && !config.network.allowlist.exists() {
                problems.push(format!(
                    "{} does not exist here: checking away from the container? name the allowlist with \
                     --allowlist FILE (in this repository: --allowlist network/domains.conf)",
                    config.network.allowlist.display()
                ));
            }
        }
    }

    if options.no_secrets {
        let _ = writeln!(out, "# secrets: not checked (--no-secrets): {}", config.secret_names().join(", "));
    } else {
        check_secrets(&config, env, &mut out, &mut problems);
    }
    if config.agent.prompt.is_some() {
        let _ = writeln!(out, "# agent.prompt: set (redacted; from CLAUDE_PROMPT or the file)");
    }
    if config_ok {
        out.push('\n');
        out.push_str(&toml::to_string(&config).unwrap_or_else(|e| format!("# cannot render: {e}\n")));
    }
    CheckReport { effective: out, problems }
}

/// Lists every secret's presence (never its value) and adds a problem for the missing ones.
fn check_secrets(config: &Config, env: &BTreeMap<String, String>, out: &mut String, problems: &mut Vec<String>) {
    let secrets = Secrets::check(&config.secrets.required, &config.secrets.optional, env);
    let _ = writeln!(out, "# secrets:");
    for name in config.secret_names() {
        let status = match secrets.problems.iter().find(|(n, _)| n == name) {
            Some((_, Problem::Missing)) => "MISSING",
            Some((_, Problem::Empty)) => "EMPTY",
            None if secrets.get(name).is_some() => "set (redacted)",
            None => "not set (optional)",
        };
        let _ = writeln!(out, "#   {name}: {status}");
    }
    if let Some(report) = secrets.problem_report() {
        problems.push(format!("{report}; {} (or check without them: --no-secrets)", secrets.problem_hint()));
    }
}
