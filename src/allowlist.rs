//! The domain allowlist: one pattern per line, `#` comments. `example.com` is that name only;
//! `*.example.com` is any name below it, never the apex. A bad entry is an error naming its file
//! and line; nothing is ever skipped, because a silently dropped line is a silently open or
//! silently broken firewall.

use std::fmt;
use std::path::{Path, PathBuf};

/// A validated, normalised pattern: lowercase ASCII (IDN converted to punycode), no trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DomainPattern {
    Exact(String),
    /// Every name strictly below this suffix.
    Below(String),
}

/// A pattern with the port it admits, when the entry named one (`host:8443`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Entry {
    pub pattern: DomainPattern,
    pub port: Option<u16>,
}

impl DomainPattern {
    pub fn parse(text: &str) -> Result<DomainPattern, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("empty pattern".into());
        }
        let (wild, rest) = match t.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, t),
        };
        if rest.contains('*') {
            return Err(format!("`{t}`: a wildcard may only stand alone as the first label, as in *.example.com"));
        }
        let name = normalize_name(rest).map_err(|e| format!("`{t}`: {e}"))?;
        if wild {
            if !name.contains('.') {
                return Err(format!(
                    "`{t}`: a wildcard must sit below a registrable domain (at least two labels), not a top-level domain"
                ));
            }
            Ok(DomainPattern::Below(name))
        } else {
            Ok(DomainPattern::Exact(name))
        }
    }

    /// Whether `name` (any case, trailing dot or not) is allowed by this pattern.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        match self {
            DomainPattern::Exact(n) => name.eq_ignore_ascii_case(n),
            DomainPattern::Below(suffix) => {
                name.len() > suffix.len() + 1
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
                    && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            DomainPattern::Exact(n) => f.write_str(n),
            DomainPattern::Below(n) => write!(f, "*.{n}"),
        }
    }
}

impl Entry {
    /// Parses `pattern` or `pattern:port`.
    pub fn parse(text: &str) -> Result<Entry, String> {
        let t = text.trim();
        let (pattern, port) = match t.rsplit_once(':') {
            Some((p, port)) => {
                let port: u16 = port
                    .parse()
                    .ok()
                    .filter(|&n| n != 0)
                    .ok_or_else(|| format!("`{t}`: the port after `:` must be a number from 1 to 65535"))?;
                (p, Some(port))
            }
            None => (t, None),
        };
        Ok(Entry { pattern: DomainPattern::parse(pattern)?, port })
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.pattern),
            None => write!(f, "{}", self.pattern),
        }
    }
}

/// Lowercases, strips one trailing dot, converts IDN to punycode and checks RFC 1035 shape.
fn normalize_name(name: &str) -> Result<String, String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err("empty name".into());
    }
    let ascii = if name.is_ascii() {
        name.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii(name).map_err(|_| "not a valid internationalised domain name".to_string())?
    };
    if ascii.len() > 253 {
        return Err("longer than 253 characters".into());
    }
    for label in ascii.split('.') {
        if label.is_empty() {
            return Err("empty label (two dots in a row?)".into());
        }
        if label.len() > 63 {
            return Err(format!("label `{label}` is longer than 63 characters"));
        }
        if let Some(c) = label.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-')) {
            return Err(format!("character `{c}` is not allowed in a domain name"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label `{label}` starts or ends with `-`"));
        }
    }
    Ok(ascii)
}

/// An allowlist problem, located in its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowlistError {
    /// The file, or `network.allow` for inline entries.
    pub source: PathBuf,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for AllowlistError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}:{}: {}", self.source.display(), self.line, self.message)
    }
}

/// Parses an allowlist file's text; returns every entry, or every bad line.
pub fn parse_file(text: &str, source: &Path) -> Result<Vec<Entry>, Vec<AllowlistError>> {
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        match Entry::parse(line) {
            Ok(e) => entries.push(e),
            Err(message) => errors.push(AllowlistError { source: source.into(), line: i + 1, message }),
        }
    }
    if errors.is_empty() { Ok(entries) } else { Err(errors) }
}

/// Parses inline `network.allow` entries; errors name the entry's position (1-based).
pub fn parse_inline(items: &[String]) -> Result<Vec<Entry>, Vec<AllowlistError>> {
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match Entry::parse(item) {
            Ok(e) => entries.push(e),
            Err(message) => errors.push(AllowlistError { source: "network.allow".into(), line: i + 1, message }),
        }
    }
    if errors.is_empty() { Ok(entries) } else { Err(errors) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(s: &str) -> DomainPattern {
        DomainPattern::parse(s).unwrap()
    }

    #[test]
    fn exact_and_wildcard_truth_table() {
        let table = [
            ("example.com", "example.com", true),
            ("example.com", "EXAMPLE.com.", true),
            ("example.com", "www.example.com", false),
            ("*.example.com", "example.com", false),
            ("*.example.com", "www.example.com", true),
            ("*.example.com", "a.b.example.com", true),
            ("*.example.com", "badexample.com", false),
            ("*.example.com", "example.com.evil.net", false),
            ("example.com", "example.co", false),
        ];
        for (p, name, expect) in table {
            assert_eq!(pat(p).matches(name), expect, "{p} vs {name}");
        }
    }

    #[test]
    fn patterns_normalise_case_trailing_dot_and_idn() {
        assert_eq!(pat("API.Example.COM."), DomainPattern::Exact("api.example.com".into()));
        assert_eq!(pat("bücher.example"), DomainPattern::Exact("xn--bcher-kva.example".into()));
        assert_eq!(pat("*.Bücher.example").to_string(), "*.xn--bcher-kva.example");
    }

    #[test]
    fn invalid_patterns_are_refused_with_a_reason() {
        for bad in
            ["*", "*.com", "a.*.com", "ex*ample.com", "**.example.com", "a..b", "-a.com", "a_b.com", "x y.com", ""]
        {
            assert!(DomainPattern::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn entries_take_an_optional_port() {
        let e = Entry::parse("git.example.com:8443").unwrap();
        assert_eq!(e.port, Some(8443));
        assert_eq!(e.to_string(), "git.example.com:8443");
        assert!(Entry::parse("a.com:0").is_err());
        assert!(Entry::parse("a.com:http").is_err());
    }

    #[test]
    fn file_errors_name_every_bad_line_and_comments_are_ignored() {
        let text = "# header\napi.example.com  # trailing comment\n\n*\nok.example.org\n*.com\n";
        let errs = parse_file(text, Path::new("domains.conf")).unwrap_err();
        let lines: Vec<usize> = errs.iter().map(|e| e.line).collect();
        assert_eq!(lines, [4, 6]);
        assert!(errs[0].to_string().starts_with("domains.conf:4: `*`"), "{}", errs[0]);
        let good = parse_file("# c\na.example.com\n*.b.example.com\n", Path::new("d")).unwrap();
        assert_eq!(good.len(), 2);
    }

    #[test]
    fn shipped_allowlist_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("network/domains.conf");
        let text = std::fs::read_to_string(&path).unwrap();
        let entries = parse_file(&text, &path).unwrap();
        assert!(entries.iter().any(|e| e.pattern.matches("api.anthropic.com")));
        assert!(entries.iter().any(|e| e.pattern.matches("github.com")));
    }
}
