//! The domain allowlist: one pattern per line, `#` comments. `example.com` is that name only;
//! `*.example.com` is any name below it, never the apex. A bad entry is an error naming its file
//! and line; nothing is ever skipped, because a silently dropped line is a silently open or
//! silently broken firewall.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

/// A validated, normalised pattern: lowercase ASCII (IDN converted to punycode), no trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DomainPattern {
    Exact(String),
    /// Every name strictly below this suffix.
    Below(String),
}

/// A pattern with the port it admits, when the entry named one (`host:8443`), and whether
/// connections on that port are address-based only (`host:22:raw`: no name is read from them,
/// for ssh, databases and clients that send no TLS name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Entry {
    pub pattern: DomainPattern,
    pub port: Option<u16>,
    /// `:raw`: only with a port.
    pub raw: bool,
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
    /// Parses `pattern`, `pattern:port` or `pattern:port:raw`.
    pub fn parse(text: &str) -> Result<Entry, String> {
        let t = text.trim();
        let (rest, raw) = match t.strip_suffix(":raw") {
            Some(rest) => (rest, true),
            None => (t, false),
        };
        let (pattern, port) = match rest.rsplit_once(':') {
            Some((p, port)) => {
                let port: u16 = port
                    .parse()
                    .ok()
                    .filter(|&n| n != 0)
                    .ok_or_else(|| format!("`{t}`: the port after `:` must be a number from 1 to 65535"))?;
                (p, Some(port))
            }
            None => (rest, None),
        };
        if raw && port.is_none() {
            return Err(format!(
                "`{t}`: `:raw` needs a port, as in git.example.com:22:raw (the default ports are always name-checked)"
            ));
        }
        Ok(Entry { pattern: DomainPattern::parse(pattern)?, port, raw })
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match (self.port, self.raw) {
            (Some(p), true) => write!(f, "{}:{p}:raw", self.pattern),
            (Some(p), false) => write!(f, "{}:{p}", self.pattern),
            (None, _) => write!(f, "{}", self.pattern),
        }
    }
}

/// The one form names are compared in: lowercase ASCII, punycode for international labels, no
/// trailing dot. DNS queries arrive in it already (the wire form); Unicode input (`status why
/// bücher.example`) is converted, and a name that is not valid IDN stays as given, so it
/// matches nothing.
pub fn canonical(name: &str) -> String {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_ascii() {
        name.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii(name).unwrap_or_else(|_| name.to_string())
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

/// What a matching name may reach: the default ports and/or per-entry ports, name-checked
/// (`name:port`) or address-based (`name:port:raw`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reach {
    pub default_ports: bool,
    pub extra_ports: BTreeSet<u16>,
    pub raw_ports: BTreeSet<u16>,
}

/// One pattern's reach and the entries (with their origin, `domains.conf:12`) behind it.
#[derive(Debug, Default)]
struct Rule {
    reach: Reach,
    origins: Vec<String>,
}

/// The compiled allowlist: exact names in one map, wildcard suffixes in another, so a lookup
/// costs one probe per label of the name.
#[derive(Debug, Default)]
pub struct Allowlist {
    exact: HashMap<String, Rule>,
    below: HashMap<String, Rule>,
    len: usize,
}

impl Allowlist {
    /// Builds the matcher from entries and their origins (`file:line`).
    pub fn new(entries: impl IntoIterator<Item = (Entry, String)>) -> Allowlist {
        let mut list = Allowlist::default();
        for (entry, origin) in entries {
            list.len += 1;
            let rule = match &entry.pattern {
                DomainPattern::Exact(n) => list.exact.entry(n.clone()).or_default(),
                DomainPattern::Below(n) => list.below.entry(n.clone()).or_default(),
            };
            match (entry.port, entry.raw) {
                (Some(p), true) => rule.reach.raw_ports.insert(p),
                (Some(p), false) => rule.reach.extra_ports.insert(p),
                (None, _) => std::mem::replace(&mut rule.reach.default_ports, true),
            };
            rule.origins.push(format!("{entry} ({origin})"));
        }
        list
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The exact names, which the refresh re-resolves (wildcards cannot be enumerated).
    pub fn exact_names(&self) -> impl Iterator<Item = &str> {
        self.exact.keys().map(String::as_str)
    }

    /// Every name-checked per-entry port (`name:port`), each needing its own allow set.
    pub fn extra_ports(&self) -> BTreeSet<u16> {
        self.exact.values().chain(self.below.values()).flat_map(|r| r.reach.extra_ports.iter().copied()).collect()
    }

    /// Every address-based per-entry port (`name:port:raw`), each needing its own allow set.
    pub fn raw_ports(&self) -> BTreeSet<u16> {
        self.exact.values().chain(self.below.values()).flat_map(|r| r.reach.raw_ports.iter().copied()).collect()
    }

    /// Whether `name` (canonical: see [`canonical`]) is an exact entry.
    pub fn is_exact(&self, name: &str) -> bool {
        self.exact.contains_key(name)
    }

    /// Every rule matching `name` (the exact one, then wildcards from the nearest suffix up).
    fn matching<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a Rule> + 'a {
        // The DNS fast path asks with names already canonical (lowercase ASCII, trailing dot):
        // those are matched without allocating.
        let bare = name.strip_suffix('.').unwrap_or(name);
        let name: std::borrow::Cow<'_, str> = if bare.bytes().all(|b| b.is_ascii() && !b.is_ascii_uppercase()) {
            std::borrow::Cow::Borrowed(bare)
        } else {
            std::borrow::Cow::Owned(canonical(name))
        };
        let exact = self.exact.get(&*name);
        let mut suffixes = Vec::new();
        let mut rest = &*name;
        while let Some((_, suffix)) = rest.split_once('.') {
            suffixes.extend(self.below.get(suffix));
            rest = suffix;
        }
        exact.into_iter().chain(suffixes)
    }

    /// What `name` may reach, merged over every pattern that matches it; None when denied.
    /// On the DNS answer path: it allocates nothing for a name already canonical (lowercase
    /// ASCII), only the lowercased name otherwise (and a short vector for wildcard matches).
    pub fn lookup(&self, name: &str) -> Option<Reach> {
        let mut found: Option<Reach> = None;
        for rule in self.matching(name) {
            let acc = found.get_or_insert_with(Reach::default);
            acc.default_ports |= rule.reach.default_ports;
            acc.extra_ports.extend(&rule.reach.extra_ports);
            acc.raw_ports.extend(&rule.reach.raw_ports);
        }
        found
    }

    /// The entries that allow `name`, each with its origin; empty when denied (for `why`).
    pub fn explain(&self, name: &str) -> Vec<String> {
        self.matching(name).flat_map(|r| r.origins.iter().cloned()).collect()
    }
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

/// Parses an allowlist file's text; returns every entry with its origin (`file:line`), or
/// every bad line.
pub fn parse_file(text: &str, source: &Path) -> Result<Vec<(Entry, String)>, Vec<AllowlistError>> {
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        match Entry::parse(line) {
            Ok(e) => entries.push((e, format!("{}:{}", source.display(), i + 1))),
            Err(message) => errors.push(AllowlistError { source: source.into(), line: i + 1, message }),
        }
    }
    if errors.is_empty() { Ok(entries) } else { Err(errors) }
}

/// Parses inline `network.allow` entries; errors name the entry's position (1-based).
pub fn parse_inline(items: &[String]) -> Result<Vec<(Entry, String)>, Vec<AllowlistError>> {
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match Entry::parse(item) {
            Ok(e) => entries.push((e, format!("network.allow[{i}]"))),
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
    fn international_names_match_in_either_form_against_either_form_of_entry() {
        for entry in ["bücher.example", "xn--bcher-kva.example", "*.bücher.example"] {
            let list = Allowlist::new([(Entry::parse(entry).unwrap(), "t:1".to_string())]);
            let name = if entry.starts_with('*') { "www." } else { "" };
            for form in ["xn--bcher-kva.example.", "XN--BCHER-KVA.example", "bücher.example", "BÜCHER.example."] {
                let q = format!("{name}{form}");
                assert!(list.lookup(&q).is_some(), "{entry} should allow {q}");
                assert!(!list.explain(&q).is_empty(), "{entry} should explain {q}");
            }
            assert!(list.lookup(&format!("{name}bucher.example")).is_none(), "{entry}");
        }
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
    fn raw_entries_need_a_port_and_round_trip() {
        let e = Entry::parse("git.example.com:22:raw").unwrap();
        assert_eq!((e.port, e.raw), (Some(22), true));
        assert_eq!(e.to_string(), "git.example.com:22:raw");
        assert!(!Entry::parse("git.example.com:22").unwrap().raw);
        let err = Entry::parse("git.example.com:raw").unwrap_err();
        assert!(err.contains("`:raw` needs a port"), "{err}");
        assert!(Entry::parse("git.example.com:22:RAW").is_err(), "only the documented spelling");
        assert!(Entry::parse("git.example.com:22:raw:raw").is_err());
        let errs = parse_file("ok.example.com:22:raw\nbad.example.com:raw\n", Path::new("domains.conf")).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert!(errs[0].to_string().starts_with("domains.conf:2: `bad.example.com:raw`"), "{}", errs[0]);
    }

    #[test]
    fn raw_and_name_checked_ports_are_kept_apart() {
        let l = list("git.example.com:22:raw\ngit.example.com:8443\n*.example.com:5432:raw\n");
        let r = l.lookup("git.example.com").unwrap();
        assert_eq!(r.raw_ports.iter().copied().collect::<Vec<_>>(), [22, 5432]);
        assert_eq!(r.extra_ports.iter().copied().collect::<Vec<_>>(), [8443]);
        assert!(!r.default_ports);
        assert_eq!(l.raw_ports().into_iter().collect::<Vec<_>>(), [22, 5432]);
        assert_eq!(l.extra_ports().into_iter().collect::<Vec<_>>(), [8443]);
        assert_eq!(l.explain("git.example.com")[0], "git.example.com:22:raw (d:1)");
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
        assert_eq!(good[1].1, "d:3");
    }

    #[test]
    fn shipped_allowlist_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("network/domains.conf");
        let text = std::fs::read_to_string(&path).unwrap();
        let entries = parse_file(&text, &path).unwrap();
        let list = Allowlist::new(entries);
        assert!(list.lookup("api.anthropic.com").is_some());
        assert!(list.lookup("github.com").is_some());
        assert!(list.lookup("example.com").is_none());
    }

    fn list(lines: &str) -> Allowlist {
        Allowlist::new(parse_file(lines, Path::new("d")).unwrap())
    }

    #[test]
    fn matcher_follows_the_pattern_truth_table() {
        let l = list("example.com\n*.example.org\n");
        let table = [
            ("example.com", true),
            ("EXAMPLE.COM.", true),
            ("www.example.com", false),
            ("example.org", false),
            ("a.example.org", true),
            ("a.b.example.org", true),
            ("badexample.org", false),
            ("example.org.evil.net", false),
            ("com", false),
        ];
        for (name, allowed) in table {
            assert_eq!(l.lookup(name).is_some(), allowed, "{name}");
        }
    }

    #[test]
    fn ports_merge_over_matching_entries_and_say_who_decided() {
        let l = list("git.example.com:8443\n*.example.com\nonly.example.net:22\n");
        let r = l.lookup("git.example.com").unwrap();
        assert!(r.default_ports);
        assert_eq!(r.extra_ports.iter().copied().collect::<Vec<_>>(), [8443]);
        assert_eq!(l.explain("git.example.com"), ["git.example.com:8443 (d:1)", "*.example.com (d:2)"]);
        assert!(l.explain("other.example.net").is_empty());
        let r = l.lookup("only.example.net").unwrap();
        assert!(!r.default_ports, "a name:port entry admits that port only");
        assert_eq!(l.len(), 3);
    }
}
