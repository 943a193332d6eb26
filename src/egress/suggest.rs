//! `cordon policy suggest`: an allowlist file made from what observe mode let through. Pure:
//! the observations and the entries in force go in, the file's text comes out.
//!
//! Names are kept exact unless several siblings (names with the same parent, such as
//! a.cdn.example.com and b.cdn.example.com) were seen: those collapse into one wildcard for the
//! parent (*.cdn.example.com), never wider, and never for a parent of one label (a top-level
//! domain). The entries already in force come first, marked, so that the file given to an
//! enforcing cordon on its own allows everything the observed session did.

use std::collections::BTreeMap;
use std::time::SystemTime;

use crate::config::allowlist::{Allowlist, Entry};

/// One observed name: how often, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub name: String,
    pub count: u64,
    pub first: SystemTime,
}

/// One line of the suggestion: a pattern and the observations behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suggestion {
    /// `name` or `*.parent`.
    pub pattern: String,
    pub count: u64,
    pub first: SystemTime,
    /// The names it stands for, sorted.
    pub names: Vec<String>,
}

/// Groups names under a wildcard only where at least two siblings were seen. Sorted by pattern.
pub fn collapse(seen: &[Seen]) -> Vec<Suggestion> {
    let mut by_parent: BTreeMap<&str, Vec<&Seen>> = BTreeMap::new();
    let mut alone: Vec<&Seen> = Vec::new();
    for s in seen {
        match s.name.split_once('.') {
            // A wildcard must sit below at least two labels (as the allowlist requires).
            Some((_, parent)) if parent.contains('.') => by_parent.entry(parent).or_default().push(s),
            _ => alone.push(s),
        }
    }
    let mut out: Vec<Suggestion> = alone.into_iter().map(single).collect();
    for (parent, group) in by_parent {
        let distinct: std::collections::BTreeSet<&str> = group.iter().map(|s| s.name.as_str()).collect();
        if distinct.len() < 2 {
            out.extend(group.into_iter().map(single));
            continue;
        }
        out.push(Suggestion {
            pattern: format!("*.{parent}"),
            count: group.iter().map(|s| s.count).sum(),
            first: group.iter().map(|s| s.first).min().unwrap_or(SystemTime::UNIX_EPOCH),
            names: distinct.into_iter().map(String::from).collect(),
        });
    }
    out.sort_by(|a, b| a.pattern.cmp(&b.pattern));
    out
}

fn single(s: &Seen) -> Suggestion {
    Suggestion { pattern: s.name.clone(), count: s.count, first: s.first, names: vec![s.name.clone()] }
}

/// The allowlist file: the entries in force (marked as already present, with their origin),
/// then the suggestions, each commented with its count and first-seen time; a suggestion whose
/// names the entries in force already allow is marked too.
pub fn render(in_force: &[(Entry, String)], suggestions: &[Suggestion], dropped: u64) -> String {
    let current = Allowlist::new(in_force.iter().cloned());
    let mut o = String::from(
        "# Allowlist suggested by `cordon policy suggest` from what observe mode let through.\n\
         # Review every line before enforcing it (network.mode = \"enforce\").\n",
    );
    if dropped > 0 {
        o.push_str(&format!(
            "# WARNING: {dropped} lookup(s) of further names were not recorded (the record is bounded); run again\n"
        ));
    }
    if !in_force.is_empty() {
        o.push_str("\n# Already present: the entries in force.\n");
        for (entry, origin) in in_force {
            o.push_str(&format!("{entry}  # already present ({origin})\n"));
        }
    }
    o.push_str("\n# Observed: names outside the allowlist.\n");
    if suggestions.is_empty() {
        o.push_str("# (none)\n");
    }
    for s in suggestions {
        let first = humantime::format_rfc3339_seconds(s.first);
        let covered = s.names.iter().all(|n| current.lookup(n).is_some());
        let mark = if covered { "already present; " } else { "" };
        let names = if s.names.len() > 1 { format!(" ({})", s.names.join(", ")) } else { String::new() };
        o.push_str(&format!("{}  # {mark}seen {} time(s), first {first}{names}\n", s.pattern, s.count));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn seen(name: &str, count: u64, secs: u64) -> Seen {
        Seen { name: name.into(), count, first: SystemTime::UNIX_EPOCH + Duration::from_secs(secs) }
    }

    #[test]
    fn siblings_collapse_into_their_parent_wildcard_and_a_lone_name_stays_exact() {
        let got = collapse(&[
            seen("a.cdn.example.com", 2, 20),
            seen("b.cdn.example.com", 3, 10),
            seen("api.example.org", 1, 5),
            seen("example.net", 4, 1),
        ]);
        let patterns: Vec<&str> = got.iter().map(|s| s.pattern.as_str()).collect();
        assert_eq!(patterns, ["*.cdn.example.com", "api.example.org", "example.net"]);
        assert_eq!(got[0].count, 5);
        assert_eq!(got[0].first, SystemTime::UNIX_EPOCH + Duration::from_secs(10));
        assert_eq!(got[0].names, ["a.cdn.example.com", "b.cdn.example.com"]);
    }

    #[test]
    fn no_wildcard_over_a_top_level_domain() {
        let got = collapse(&[seen("a.com", 1, 0), seen("b.com", 1, 0)]);
        let patterns: Vec<&str> = got.iter().map(|s| s.pattern.as_str()).collect();
        assert_eq!(patterns, ["a.com", "b.com"]);
    }

    #[test]
    fn the_file_marks_present_entries_comments_counts_and_parses_as_an_allowlist() {
        let in_force = crate::config::allowlist::parse_file("api.example.com\n", "d".as_ref()).unwrap();
        let suggestions = collapse(&[
            seen("x.cdn.example.com", 2, 0),
            seen("y.cdn.example.com", 1, 60),
            seen("api.example.com", 1, 0),
            seen("new.example.net", 7, 0),
        ]);
        let text = render(&in_force, &suggestions, 0);
        assert!(text.contains("api.example.com  # already present (d:1)\n"), "{text}");
        assert!(text.contains("api.example.com  # already present; seen 1 time(s)"), "{text}");
        assert!(
            text.contains(
                "*.cdn.example.com  # seen 3 time(s), first 1970-01-01T00:00:00Z (x.cdn.example.com, y.cdn.example.com)"
            ),
            "{text}"
        );
        assert!(text.contains("new.example.net  # seen 7 time(s)"), "{text}");
        // Given to an enforcing cordon, it allows every observed name and what was in force.
        let list = Allowlist::new(crate::config::allowlist::parse_file(&text, "s".as_ref()).unwrap());
        for name in ["api.example.com", "x.cdn.example.com", "y.cdn.example.com", "new.example.net"] {
            assert!(list.lookup(name).is_some(), "{name}");
        }
        assert!(list.lookup("other.example.net").is_none());
    }
}
