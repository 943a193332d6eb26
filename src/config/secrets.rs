//! Secrets: required variables checked all at once, values held in a type that cannot be
//! printed. (Taking them out of the process's environment is `sys::take_environment`.)

use std::collections::BTreeMap;
use std::fmt;

/// A secret value. It implements neither `Display` nor a revealing `Debug`, so it cannot reach
/// a log line, an error, the state file or a panic message by accident; `expose` is the one
/// door, used where the value is written to a 0600 file or handed to a child's environment.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<str>);

impl Secret {
    pub fn new(value: impl Into<Box<str>>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Why a required secret is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Problem {
    Missing,
    Empty,
}

/// The result of checking the environment against `secrets.required` / `secrets.optional`.
#[derive(Debug, Default)]
pub(crate) struct Secrets {
    pub values: BTreeMap<String, Secret>,
    /// Required names that are missing or empty, in configuration order.
    pub problems: Vec<(String, Problem)>,
}

impl Secrets {
    /// The boot's `secrets` stage: every required secret present and non-empty, or every one
    /// that is not, named at once with the fix. Before the filesystem changes, so a missing token
    /// fails fast. The values were taken out of the process's environment before.
    pub(crate) fn require(
        config: &crate::config::Secrets,
        env: &BTreeMap<String, String>,
    ) -> crate::fix::StageResult<Secrets> {
        let secrets = Secrets::check(&config.required, &config.optional, env);
        if let Some(problem) = secrets.problem_report() {
            return Err(crate::fix::Problem::new(problem).with_fix(secrets.problem_hint()));
        }
        let n = secrets.values.len();
        Ok((secrets, format!("{n} present")))
    }

    pub(crate) fn check(required: &[String], optional: &[String], env: &BTreeMap<String, String>) -> Secrets {
        let mut s = Secrets::default();
        for name in required {
            match env.get(name) {
                None => s.problems.push((name.clone(), Problem::Missing)),
                Some(v) if v.trim().is_empty() => s.problems.push((name.clone(), Problem::Empty)),
                Some(v) => {
                    s.values.insert(name.clone(), Secret::new(v.as_str()));
                }
            }
        }
        for name in optional {
            if let Some(v) = env.get(name).filter(|v| !v.trim().is_empty()) {
                s.values.insert(name.clone(), Secret::new(v.as_str()));
            }
        }
        s
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Secret> {
        self.values.get(name)
    }

    /// The operator-facing explanation of every problem, with how to set the variables.
    pub(crate) fn problem_report(&self) -> Option<String> {
        if self.problems.is_empty() {
            return None;
        }
        let list: Vec<String> = self
            .problems
            .iter()
            .map(|(n, p)| match p {
                Problem::Missing => format!("{n} (not set)"),
                Problem::Empty => format!("{n} (set but empty)"),
            })
            .collect();
        Some(format!("required secrets missing: {}", list.join(", ")))
    }

    pub(crate) fn problem_hint(&self) -> String {
        let names: Vec<&str> = self.problems.iter().map(|(n, _)| n.as_str()).collect();
        let fly: Vec<String> = names.iter().map(|n| format!("{n}=...")).collect();
        let docker: Vec<String> = names.iter().map(|n| format!("-e {n}")).collect();
        format!(
            "set them as secrets of the container: `fly secrets set {}`, `docker run {} ...` (values from your shell), \
             or a Kubernetes Secret referenced by env; to stop requiring one, remove it from secrets.required",
            fly.join(" "),
            docker.join(" ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn every_missing_and_empty_secret_is_reported_at_once() {
        let req = vec!["A".to_string(), "B".into(), "C".into()];
        let s = Secrets::check(&req, &[], &env(&[("B", "  "), ("C", "v")]));
        assert_eq!(s.problems, vec![("A".into(), Problem::Missing), ("B".into(), Problem::Empty)]);
        assert_eq!(s.problem_report().unwrap(), "required secrets missing: A (not set), B (set but empty)");
        assert!(s.problem_hint().contains("fly secrets set A=... B=..."));
        assert_eq!(s.get("C").map(Secret::expose), Some("v"));
    }

    #[test]
    fn secret_values_never_format() {
        let s = Secret::new("sentinel-value-123");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        let set = Secrets::check(&["T".into()], &[], &env(&[("T", "sentinel-value-123")]));
        assert!(!format!("{set:?}").contains("sentinel-value-123"));
    }

    #[test]
    fn optional_secrets_are_kept_when_present_and_not_required() {
        let s = Secrets::check(&[], &["NPM".into(), "GONE".into()], &env(&[("NPM", "x")]));
        assert!(s.problems.is_empty());
        assert!(s.get("NPM").is_some() && s.get("GONE").is_none());
    }
}
