//! Validated scalar types used by the configuration. Each one parses at the edge (serde) and
//! renders back to the same spelling, so `cordon check` prints what the operator wrote.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// Implements serde for a type through `FromStr` and `Display`, so the error message of
/// `FromStr` is what the operator sees, located by toml at the offending value.
macro_rules! serde_via_str {
    ($ty:ty, $expecting:literal) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl de::Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, s: &str) -> Result<$ty, E> {
                        s.parse().map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}

/// A byte count written as digits with an optional binary suffix: `512M`, `1G`, `65536`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("invalid size `{s}`: expected a number with an optional K, M, G or T suffix, e.g. \"512M\"");
        let t = s.trim();
        let (digits, shift) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let shift = match c.to_ascii_uppercase() {
                    'K' => 10,
                    'M' => 20,
                    'G' => 30,
                    'T' => 40,
                    _ => return Err(bad()),
                };
                (&t[..i], shift)
            }
            _ => (t, 0),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let bytes = n.checked_shl(shift).filter(|b| b >> shift == n).ok_or_else(bad)?;
        if bytes == 0 {
            return Err(format!("invalid size `{s}`: must be greater than zero"));
        }
        Ok(ByteSize(bytes))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (suffix, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
            if self.0 >= 1 << shift && self.0.is_multiple_of(1 << shift) {
                return write!(f, "{}{suffix}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}
serde_via_str!(ByteSize, "a size such as \"512M\"");

/// A permission mode written as an octal string, `"0755"` or `"1777"` (TOML has no octal
/// string form that survives parsing, and a decimal 755 would silently mean 0o1363).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMode(pub u32);

impl FromStr for FileMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid mode `{s}`: expected an octal string such as \"0755\" or \"1777\"");
        let t = s.strip_prefix("0o").unwrap_or(s);
        if t.is_empty() || t.len() > 4 || !t.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return Err(bad());
        }
        u32::from_str_radix(t, 8).map(FileMode).map_err(|_| bad())
    }
}

impl fmt::Display for FileMode {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}
serde_via_str!(FileMode, "an octal mode string such as \"0755\"");

/// A duration written the human way: `"10s"`, `"5m"`, `"1h 30m"`, `"500ms"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span(pub Duration);

impl FromStr for Span {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s)
            .map(Span)
            .map_err(|e| format!("invalid duration `{s}`: {e}; write e.g. \"10s\", \"5m\" or \"500ms\""))
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}
serde_via_str!(Span, "a duration such as \"10s\"");

/// Who owns a mount or a file: the configured agent user, root, or a named/numeric
/// `user[:group]`. Resolved against the passwd and group databases at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Agent,
    Root,
    User { user: String, group: Option<String> },
}

impl FromStr for Owner {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let valid = |p: &str| {
            !p.is_empty()
                && p.len() <= 32
                && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                && !p.starts_with('-')
        };
        match s {
            "agent" => Ok(Owner::Agent),
            "root" => Ok(Owner::Root),
            _ => {
                let (user, group) = match s.split_once(':') {
                    Some((u, g)) => (u, Some(g)),
                    None => (s, None),
                };
                if valid(user) && group.is_none_or(valid) {
                    Ok(Owner::User { user: user.into(), group: group.map(Into::into) })
                } else {
                    Err(format!(
                        "invalid owner `{s}`: expected \"agent\", \"root\", a user name or uid, optionally followed by :group"
                    ))
                }
            }
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Owner::Agent => f.write_str("agent"),
            Owner::Root => f.write_str("root"),
            Owner::User { user, group: None } => f.write_str(user),
            Owner::User { user, group: Some(g) } => write!(f, "{user}:{g}"),
        }
    }
}
serde_via_str!(Owner, "an owner such as \"agent\", \"root\" or \"1000:1000\"");

/// An absolute path, or one under the agent's home written `~` or `~/rest`. Components such
/// as `..` are refused so that what is configured is what gets mounted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConfigPath {
    Absolute(PathBuf),
    /// Relative to the agent's home; empty for the home itself.
    Home(PathBuf),
}

impl ConfigPath {
    /// The concrete path, given the agent's home directory.
    pub fn resolve(&self, home: &Path) -> PathBuf {
        match self {
            ConfigPath::Absolute(p) => p.clone(),
            ConfigPath::Home(rest) if rest.as_os_str().is_empty() => home.to_path_buf(),
            ConfigPath::Home(rest) => home.join(rest),
        }
    }
}

impl FromStr for ConfigPath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, home) = if s == "~" {
            return Ok(ConfigPath::Home(PathBuf::new()));
        } else if let Some(rest) = s.strip_prefix("~/") {
            (Path::new(rest), true)
        } else if s.starts_with('/') {
            (Path::new(s), false)
        } else {
            return Err(format!(
                "invalid path `{s}`: expected an absolute path, or one starting with ~/ for the agent's home"
            ));
        };
        if path.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
            return Err(format!("invalid path `{s}`: `.` and `..` components are not allowed"));
        }
        let normal: PathBuf = path.components().collect();
        Ok(if home { ConfigPath::Home(normal) } else { ConfigPath::Absolute(normal) })
    }
}

impl fmt::Display for ConfigPath {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            ConfigPath::Absolute(p) => write!(f, "{}", p.display()),
            ConfigPath::Home(p) if p.as_os_str().is_empty() => f.write_str("~"),
            ConfigPath::Home(p) => write!(f, "~/{}", p.display()),
        }
    }
}
serde_via_str!(ConfigPath, "an absolute path or ~/path");

/// An address range such as `10.0.0.0/8` or `fd00::/8`; a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub const fn new(addr: IpAddr, prefix: u8) -> Cidr {
        Cidr { addr, prefix }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid address range `{s}`: expected an address with an optional /prefix, e.g. \"10.0.0.0/8\"")
        };
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().ok().filter(|&p| p <= max).ok_or_else(bad)?,
            None => max,
        };
        let cidr = Cidr { addr, prefix };
        if !cidr.contains(addr) || Cidr::new(cidr.network(), prefix) != cidr {
            return Err(format!(
                "invalid address range `{s}`: host bits are set; did you mean {}/{prefix}?",
                cidr.network()
            ));
        }
        Ok(cidr)
    }
}

impl Cidr {
    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}
serde_via_str!(Cidr, "an address range such as \"10.0.0.0/8\"");

/// An upstream resolver: `ip`, `ip:port` or `[v6]:port`; the port defaults to 53.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upstream(pub SocketAddr);

impl FromStr for Upstream {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Upstream(SocketAddr::new(ip, 53)));
        }
        s.parse::<SocketAddr>()
            .map(Upstream)
            .map_err(|_| format!("invalid upstream `{s}`: expected an IP address with an optional port, e.g. \"1.1.1.1\" or \"[2001:db8::1]:53\""))
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.0.port() == 53 { write!(f, "{}", self.0.ip()) } else { write!(f, "{}", self.0) }
    }
}
serde_via_str!(Upstream, "a resolver address such as \"1.1.1.1\"");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse_with_binary_suffixes() {
        let table = [("512M", 512 << 20), ("1G", 1 << 30), ("64k", 64 << 10), ("4096", 4096), ("2T", 2 << 40)];
        for (text, bytes) in table {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
    }

    #[test]
    fn byte_sizes_reject_garbage_zero_and_overflow() {
        for text in ["", "M", "12X", "1.5G", "-1M", "0", "0M", "99999999999T", "1 G"] {
            assert!(text.parse::<ByteSize>().is_err(), "{text} should be rejected");
        }
    }

    #[test]
    fn byte_sizes_render_in_the_largest_exact_unit() {
        assert_eq!(ByteSize(512 << 20).to_string(), "512M");
        assert_eq!(ByteSize(1 << 30).to_string(), "1G");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1536M");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }

    #[test]
    fn modes_are_octal_strings() {
        assert_eq!("0755".parse::<FileMode>(), Ok(FileMode(0o755)));
        assert_eq!("1777".parse::<FileMode>(), Ok(FileMode(0o1777)));
        assert_eq!("700".parse::<FileMode>(), Ok(FileMode(0o700)));
        for bad in ["", "0888", "rwx", "17777", "0x755"] {
            assert!(bad.parse::<FileMode>().is_err(), "{bad}");
        }
        assert_eq!(FileMode(0o700).to_string(), "0700");
    }

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!("10s".parse::<Span>(), Ok(Span(Duration::from_secs(10))));
        assert_eq!("5m".parse::<Span>(), Ok(Span(Duration::from_secs(300))));
        assert_eq!("250ms".parse::<Span>(), Ok(Span(Duration::from_millis(250))));
        assert!("ten seconds".parse::<Span>().is_err());
        assert!("10".parse::<Span>().is_err());
    }

    #[test]
    fn owners_accept_keywords_names_and_ids() {
        assert_eq!("agent".parse::<Owner>(), Ok(Owner::Agent));
        assert_eq!("root".parse::<Owner>(), Ok(Owner::Root));
        assert_eq!("1000:100".parse::<Owner>(), Ok(Owner::User { user: "1000".into(), group: Some("100".into()) }));
        for bad in ["", ":", "a b", "-rf", "x:", "x:y:z"] {
            assert!(bad.parse::<Owner>().is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_are_absolute_or_home_relative_and_never_climb() {
        let home = Path::new("/home/agent");
        let p: ConfigPath = "~".parse().unwrap();
        assert_eq!(p.resolve(home), home);
        let p: ConfigPath = "~/.local/bin".parse().unwrap();
        assert_eq!(p.resolve(home), Path::new("/home/agent/.local/bin"));
        assert_eq!(p.to_string(), "~/.local/bin");
        let p: ConfigPath = "/workspace/".parse().unwrap();
        assert_eq!(p.resolve(home), Path::new("/workspace"));
        for bad in ["relative", "~agent/x", "/a/../etc", "~/./x", ""] {
            assert!(bad.parse::<ConfigPath>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs_parse_contain_and_refuse_host_bits() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        let host: Cidr = "192.0.2.7".parse().unwrap();
        assert_eq!(host.prefix, 32);
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.1/8".parse::<Cidr>().unwrap_err().contains("did you mean 10.0.0.0/8"));
        for bad in ["10.0.0.0/33", "x/8", "", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn upstreams_default_to_port_53() {
        assert_eq!("1.1.1.1".parse::<Upstream>().unwrap().0, "1.1.1.1:53".parse().unwrap());
        assert_eq!("[2001:db8::1]:5353".parse::<Upstream>().unwrap().0, "[2001:db8::1]:5353".parse().unwrap());
        assert_eq!("1.1.1.1".parse::<Upstream>().unwrap().to_string(), "1.1.1.1");
        assert!("resolver.example".parse::<Upstream>().is_err());
    }
}
