//! cordon's configuration: `/etc/cordon/cordon.toml` parsed into validated types, then the
//! environment variables of the system cordon replaces applied on top. Every key is optional;
//! with no file at all cordon runs on the built-in defaults.

pub mod allowlist;
pub(crate) mod secrets;
pub mod trust;
mod units;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use units::{ByteSize, Cidr, ConfigPath, FileMode, Owner, Span, Upstream};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/cordon/cordon.toml";
pub const DEFAULT_ALLOWLIST_PATH: &str = "/etc/cordon/domains.conf";
pub const DEFAULT_STATE_DIR: &str = "/run/cordon";

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub secrets: Secrets,
    pub tmpfs: Tmpfs,
    pub filesystem: Filesystem,
    pub network: Network,
    pub repo: Repo,
    pub git: Git,
    pub agent: Agent,
    pub supervisor: Supervisor,
    pub devcontainer: Devcontainer,
    pub events: Events,
    pub metrics: Metrics,
    pub claude: Claude,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Secrets {
    /// Variables that must be present and non-empty; boot fails listing every one missing.
    pub required: Vec<String>,
    /// Variables treated as secrets when present: never printed, like required ones. (Every
    /// variable, secret or not, is taken out of cordon's own environment at start.)
    pub optional: Vec<String>,
}

impl Default for Secrets {
    fn default() -> Self {
        Secrets { required: vec!["GH_PAT".into(), "CLAUDE_CODE_OAUTH_TOKEN".into()], optional: vec![] }
    }
}

/// The `[[tmpfs]]` array. Written in the file, it replaces the default list whole.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Tmpfs(pub Vec<TmpfsMount>);

impl Default for Tmpfs {
    fn default() -> Self {
        let mount = |path: &str, size: u64, mode: u32, owner| TmpfsMount {
            path: path.parse().expect("default tmpfs path"),
            size: ByteSize(size),
            mode: FileMode(mode),
            owner: Some(owner),
        };
        Tmpfs(vec![
            mount("/workspace", 512 << 20, 0o755, Owner::Agent),
            mount("/tmp", 512 << 20, 0o1777, Owner::Root),
            mount("~", 1 << 30, 0o700, Owner::Agent),
        ])
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TmpfsMount {
    pub path: ConfigPath,
    pub size: ByteSize,
    #[serde(default = "default_tmpfs_mode")]
    pub mode: FileMode,
    /// Unset: see [`TmpfsMount::owner_for`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
}

fn default_tmpfs_mode() -> FileMode {
    FileMode(0o755)
}

impl TmpfsMount {
    /// The owner of the mount's root directory: as configured, or else the agent for a mount
    /// at or below the agent's home (`home`), which the agent must be able to write, and root
    /// for every other path.
    pub fn owner_for(&self, home: &Path) -> Owner {
        match &self.owner {
            Some(owner) => owner.clone(),
            None if self.path.resolve(home).starts_with(home) => Owner::Agent,
            None => Owner::Root,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Filesystem {
    /// Remount every mount of the root read-only, per mount point, once boot has written
    /// what it needs.
    pub readonly_root: bool,
    /// Symlinks to (re)create after the tmpfs mounts hid what the image had there.
    pub links: Vec<Link>,
    /// Mounts that stay writable under the read-only root besides the tmpfs mounts, such as a
    /// volume that keeps work across restarts.
    pub writable: Vec<ConfigPath>,
}

impl Default for Filesystem {
    fn default() -> Self {
        Filesystem { readonly_root: true, links: vec![], writable: vec![] }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub path: ConfigPath,
    pub target: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    /// Turn the DNS server and the egress firewall off (for debugging only: the agent's
    /// network is then unrestricted, and the state says so).
    pub enforce: bool,
    /// `enforce` refuses names outside the allowlist; `observe` resolves and admits them (on the
    /// default ports) and records each would-be refusal, for `cordon policy suggest`.
    pub mode: Mode,
    /// The allowlist file: one domain pattern per line, `#` comments.
    pub allowlist: PathBuf,
    /// Patterns allowed in addition to the file's.
    pub allow: Vec<String>,
    /// Where the embedded DNS server listens (UDP and TCP); `/etc/resolv.conf` points here.
    pub listen: SocketAddr,
    /// Upstream resolvers, `ip` or `ip:port`. Empty: the nameservers of `/etc/resolv.conf` as
    /// found at boot.
    pub upstream: Vec<Upstream>,
    /// TCP ports the agent may connect to on admitted addresses (per-entry `name:port` adds more).
    pub ports: Vec<u16>,
    /// Ports (TCP and UDP) the agent may reach on loopback and on the container's own
    /// addresses, besides cordon's DNS listener: nothing else there is reachable.
    pub loopback_ports: Vec<PortRange>,
    /// Address ranges that may be admitted although they are private, loopback, link-local,
    /// CGNAT or ULA (never admitted for public names otherwise).
    pub allow_cidrs: Vec<Cidr>,
    /// Admission lifetime is max(TTL, min_ttl) + grace.
    pub min_ttl: Span,
    pub grace: Span,
    /// How often the exact names of the allowlist are re-resolved and their admissions renewed.
    pub refresh_interval: Span,
    /// Optional positive readiness probe as `name:port`: must resolve and connect as the agent.
    pub probe: Option<String>,
    /// The name-bound layer: the agent's connections on the name-checked ports must carry an
    /// allowlisted name (TLS SNI, HTTP Host) that cordon's DNS answered with their address.
    /// false is for debugging only: those connections are then address-based, and the boot log
    /// says so.
    pub name_binding: bool,
    /// The loopback port (127.0.0.1 and [::1]) of cordon's name-checking proxy, where the
    /// kernel redirects the agent's connections on the name-checked ports.
    pub proxy_port: u16,
}

impl Default for Network {
    fn default() -> Self {
        Network {
            enforce: true,
            mode: Mode::Enforce,
            allowlist: DEFAULT_ALLOWLIST_PATH.into(),
            allow: vec![],
            listen: SocketAddr::from(([127, 0, 0, 53], 53)),
            upstream: vec![],
            ports: vec![80, 443],
            loopback_ports: vec![],
            allow_cidrs: vec![],
            min_ttl: Span(Duration::from_secs(60)),
            grace: Span(Duration::from_secs(300)),
            refresh_interval: Span(Duration::from_secs(300)),
            probe: None,
            name_binding: true,
            proxy_port: DEFAULT_PROXY_PORT,
        }
    }
}

/// Where the name-checking proxy listens on loopback unless `network.proxy_port` says otherwise:
/// a registered-range port no common development server uses.
pub const DEFAULT_PROXY_PORT: u16 = 15443;

/// The `[metrics]` table: the OpenMetrics endpoint for Prometheus (`state::metrics`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// Where `GET /metrics` is served, e.g. "127.0.0.1:9464"; None (the default): no listener.
    /// A non-loopback address ("0.0.0.0:9464") is for a platform that scrapes the container
    /// from outside (Fly, Kubernetes); the agent's uids are refused the port on every local
    /// address either way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}

/// A port or an inclusive range of ports: `3000` or `"8000-8099"` in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl std::str::FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a port or a range of ports from 1 to 65535, e.g. 3000 or \"8000-8099\"");
        let port = |p: &str| p.trim().parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(bad);
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(s)?, port(s)?),
        };
        if first > last {
            return Err(format!("`{s}`: the range must go from the lower port to the higher"));
        }
        Ok(PortRange { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.first == self.last { write!(f, "{}", self.first) } else { write!(f, "{}-{}", self.first, self.last) }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PortRange;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port (3000) or a range of ports as a string (\"8000-8099\")")
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<PortRange, E> {
                n.to_string().parse().map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<PortRange, E> {
                n.to_string().parse().map_err(E::custom)
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<PortRange, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.first == self.last { s.serialize_u16(self.first) } else { s.collect_str(self) }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Repo {
    /// `REPO_URL`. None: nothing is cloned.
    pub url: Option<String>,
    /// `REPO_BRANCH`. None: the remote's default branch.
    pub branch: Option<String>,
    /// Where the clone goes; it becomes the agent's working directory.
    pub dest: PathBuf,
    /// The clone fails the boot when it takes longer.
    pub timeout: Span,
    /// Shallow clone depth; None: full history.
    pub depth: Option<u32>,
}

impl Default for Repo {
    fn default() -> Self {
        Repo {
            url: None,
            branch: None,
            dest: "/workspace/repo".into(),
            timeout: Span(Duration::from_secs(300)),
            depth: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Git {
    pub user_name: String,
    pub user_email: String,
    /// Hosts the credential helper gives `GH_PAT` to: `host` (HTTPS only) or `http://host` to
    /// allow plain HTTP too (the token then crosses the network in clear).
    pub credential_hosts: Vec<String>,
    /// npm scopes served by GitHub Packages (`@org`): ~/.npmrc points them there, with GH_PAT.
    pub npm_scopes: Vec<String>,
}

impl Default for Git {
    fn default() -> Self {
        Git {
            user_name: "cordon".into(),
            user_email: "cordon@users.noreply.github.com".into(),
            credential_hosts: vec!["github.com".into()],
            npm_scopes: vec![],
        }
    }
}

/// `network.mode`: whether names outside the allowlist are refused or only recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Names outside the allowlist are refused.
    #[default]
    Enforce,
    /// Names outside the allowlist are resolved and admitted (default ports) and recorded:
    /// egress is NOT enforced.
    Observe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExit {
    /// Start the agent again, with backoff.
    Restart,
    /// Stop cordon, exiting with the agent's status.
    Shutdown,
    /// Leave it stopped; cordon keeps running.
    Keep,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Agent {
    /// The unprivileged user the agent runs as.
    pub user: String,
    /// argv of the agent; the first word is looked up in the agent's PATH.
    pub command: Vec<String>,
    /// `CLAUDE_PROMPT`: the first prompt. Treated as sensitive: never printed or logged.
    #[serde(skip_serializing)]
    pub prompt: Option<String>,
    pub on_exit: OnExit,
    /// First delay before a restart (`on_exit = "restart"`); it doubles per exit, up to 30s.
    pub restart_backoff: Span,
    /// Run the agent in a tmux session operators attach to (`cordon attach`); false runs it
    /// headless, as a plain child (batch runs with `on_exit = "shutdown"`).
    pub tmux: bool,
    /// The tmux session's name.
    pub session: String,
    /// A login shell in a bottom pane (20%) beside the agent.
    pub shell_pane: bool,
    /// Variables of cordon's environment passed on to the agent by name (secrets among them
    /// included: listing one is the operator's decision).
    pub env: Vec<String>,
    /// Supplementary groups of the agent (it has none otherwise).
    pub groups: Vec<String>,
    /// Working directory of the agent.
    pub workdir: PathBuf,
    /// Paths of the agent's home (`~/...` only) kept across restarts on `persist_volume`: each
    /// is bind-mounted from `<persist_volume>/.cordon/persist/<path>` before anything runs as
    /// the agent (see `session::persist`).
    pub persist: Vec<ConfigPath>,
    /// A directory on a persistent volume, at or below an entry of `filesystem.writable`, that
    /// holds the `persist` paths. Required when `persist` lists any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persist_volume: Option<PathBuf>,
}

impl Default for Agent {
    fn default() -> Self {
        Agent {
            user: "agent".into(),
            command: vec!["claude".into(), "--dangerously-skip-permissions".into()],
            prompt: None,
            on_exit: OnExit::Restart,
            restart_backoff: Span(Duration::from_secs(1)),
            tmux: true,
            session: "agent".into(),
            shell_pane: true,
            env: vec![],
            groups: vec![],
            workdir: "/workspace".into(),
            persist: vec![],
            persist_volume: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBootFailure {
    /// Stay up, reaping, so an operator can attach and read what failed.
    Hold,
    /// Exit non-zero at once.
    Exit,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Supervisor {
    /// How long a graceful stop waits after SIGTERM before SIGKILL.
    pub stop_grace: Span,
    pub on_boot_failure: OnBootFailure,
    /// Boot log, state file, boot lock, control socket.
    pub state_dir: PathBuf,
    /// Stop cordon (exit 0) once the agent has been idle this long: no client attached, no
    /// output, no CPU to speak of, no established connection. None: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_stop: Option<Span>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor {
            stop_grace: Span(Duration::from_secs(10)),
            on_boot_failure: OnBootFailure::Hold,
            state_dir: DEFAULT_STATE_DIR.into(),
            idle_stop: None,
        }
    }
}

/// The repository's own `devcontainer.json` lifecycle commands (see `session::devcontainer`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Devcontainer {
    /// Run them; false skips the `devcontainer` stage.
    pub enabled: bool,
    /// Each lifecycle command (all the commands of its object form together) is killed, with
    /// its whole process group, and fails the boot when it takes longer.
    pub timeout: Span,
}

impl Default for Devcontainer {
    fn default() -> Self {
        Devcontainer { enabled: true, timeout: Span(Duration::from_secs(600)) }
    }
}

/// The optional JSON-lines file of the journal of refused connections (`egress::journal`),
/// for log shippers: one object per refusal, the fields of `status --json`'s journal records.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Events {
    /// Where to write it (absolute; on a tmpfs or a volume: with the read-only root nothing
    /// else is writable). None (the default): no file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// When the file would grow past this it is renamed to `<path>.1` (replacing the previous
    /// one) and a new file started: at most twice this on disk.
    pub max_size: ByteSize,
}

impl Default for Events {
    fn default() -> Self {
        Events { path: None, max_size: ByteSize(4 << 20) }
    }
}

/// Claude Code extras, each off unless configured (see `session::claude`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Claude {
    /// Plugin marketplaces added (`claude plugin marketplace add X`, as the agent) before the
    /// plugins are installed, e.g. "anthropics/claude-plugins-official".
    pub marketplaces: Vec<String>,
    /// Plugins installed (`claude plugin install X`, as the agent, behind the firewall) before
    /// the agent starts, once per home: a failure is a warning in the boot log.
    pub plugins: Vec<String>,
    /// How long each `claude plugin` command may take before it is killed (a warning).
    pub plugin_timeout: Span,
    /// Keep the settings template's `statusLine` (the image's status-line script: model,
    /// context use, session); false removes it from the agent's settings.
    pub status_line: bool,
    /// Keep the settings template's Stop hook that names the tmux session after the task once
    /// (a `claude -p` call on the agent's own credentials); false removes it.
    pub name_session: bool,
}

impl Default for Claude {
    fn default() -> Self {
        Claude {
            marketplaces: vec![],
            plugins: vec![],
            plugin_timeout: Span(Duration::from_secs(300)),
            status_line: false,
            name_session: false,
        }
    }
}

/// A configuration problem, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// Dotted key such as `tmpfs.size`, when it can be named.
    pub key: Option<String>,
    pub message: String,
}

/// What [`ConfigError::file`] says for a problem in an environment override.
const FROM_ENVIRONMENT: &str = "environment";

impl ConfigError {
    /// The problem is in an environment variable ([`ENV_OVERRIDES`]), not in the file.
    pub fn from_environment(&self) -> bool {
        self.file == Path::new(FROM_ENVIRONMENT)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The variables of the replaced system that override config keys, in the order applied.
pub const ENV_OVERRIDES: [(&str, &str); 5] = [
    ("REPO_URL", "repo.url"),
    ("REPO_BRANCH", "repo.branch"),
    ("CLAUDE_PROMPT", "agent.prompt"),
    ("GIT_USER_NAME", "git.user_name"),
    ("GIT_USER_EMAIL", "git.user_email"),
];

/// Refuses URLs that would leak a credential into `.git/config` or become an option of git.
pub fn check_repo_url(url: &str) -> Result<(), String> {
    if url.starts_with('-') {
        return Err("the repository URL starts with `-`, which git would read as an option".into());
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("the repository URL contains whitespace or control characters".into());
    }
    if let Some((scheme, rest)) = url.split_once("://") {
        let authority = rest.split('/').next().unwrap_or("");
        if scheme == "https" || scheme == "http" {
            if authority.contains('@') {
                return Err(
                    "the repository URL carries credentials, which would end up in .git/config where the agent reads them: \
                     remove them and set GH_PAT instead"
                        .into(),
                );
            }
            return Ok(());
        }
        if scheme == "ssh" {
            return Ok(());
        }
        let scheme: String = scheme.chars().take(16).collect();
        return Err(format!("`{scheme}://` repositories are not supported: use https://"));
    }
    // scp-like `git@github.com:owner/repo.git`, rewritten to HTTPS by the git config.
    if url.split_once(':').is_some_and(|(host, _)| host.contains('@') && !host.contains('/')) {
        return Ok(());
    }
    Err("the repository URL is not one git can clone here: use https://host/owner/repo.git".into())
}

/// Where the configuration comes from: the file `--config` or `CORDON_CONFIG` names, or the
/// default path.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    /// Named by `--config` or `CORDON_CONFIG`: then a missing file is an error.
    pub explicit: bool,
}

impl ConfigSource {
    /// The file named on the command line, else the default path.
    pub fn new(named: Option<PathBuf>) -> ConfigSource {
        ConfigSource { explicit: named.is_some(), path: named.unwrap_or_else(|| DEFAULT_CONFIG_PATH.into()) }
    }

    /// The one way cordon loads its configuration (`init`, `check`, `attach`, `status`): the
    /// file (or the defaults, where the default path has none), then the environment overrides.
    pub fn load(&self, env: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
        let mut config = Config::load(&self.path, self.explicit)?;
        config.apply_env(env)?;
        Ok(config)
    }
}

/// The boot's `config` stage, before any side effect: a mistake in the file must stop the boot
/// while the container is still untouched. The configuration ([`ConfigSource::load`]) and the
/// allowlist entries.
pub fn load_for_boot(
    source: &ConfigSource,
    env: &BTreeMap<String, String>,
) -> crate::fix::StageResult<(Config, Vec<(allowlist::Entry, String)>)> {
    use crate::fix::Problem;
    let config = source.load(env).map_err(|e| {
        let fix = if e.from_environment() {
            "fix the environment variable"
        } else {
            "fix the file, then check it with `cordon check --config FILE`"
        };
        Problem::new(e.to_string()).with_fix(fix)
    })?;
    let entries = load_allowlist(&config).map_err(|errors| {
        Problem::new(errors.join("; "))
            .with_fix("each line must be a name (example.com) or a wildcard below one (*.example.com)")
    })?;
    let from = if source.path.exists() { source.path.display().to_string() } else { "built-in defaults".into() };
    let detail = format!("{from}, {} allowlist entries", entries.len());
    Ok(((config, entries), detail))
}

/// The allowlist file plus inline entries, or every bad line.
pub fn load_allowlist(config: &Config) -> Result<Vec<(allowlist::Entry, String)>, Vec<String>> {
    let path = &config.network.allowlist;
    let mut errors = Vec::new();
    let mut entries = match std::fs::read_to_string(path) {
        Ok(text) => allowlist::parse_file(&text, path).unwrap_or_else(|e| {
            errors.extend(e.iter().map(ToString::to_string));
            vec![]
        }),
        Err(e) => {
            errors.push(format!("{}: cannot read the allowlist: {e}", path.display()));
            vec![]
        }
    };
    match allowlist::parse_inline(&config.network.allow) {
        Ok(more) => entries.extend(more),
        Err(e) => errors.extend(e.iter().map(ToString::to_string)),
    }
    if errors.is_empty() { Ok(entries) } else { Err(errors) }
}

impl Config {
    /// Parses a config file's text. `file` only names the file in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| locate(&e, text, file))?;
        config.validate(file)?;
        Ok(config)
    }

    /// Reads `path`; a missing file at the default location means "all defaults", while a
    /// missing file the operator named explicitly is an error.
    /// A relative `network.allowlist` is taken from the config file's directory.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mut config = Config::parse(&text, path)?;
                if config.network.allowlist.is_relative() {
                    let dir = path.parent().unwrap_or(Path::new(""));
                    config.network.allowlist = dir.join(&config.network.allowlist);
                }
                Ok(config)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(Config::default()),
            Err(e) => Err(ConfigError {
                file: path.into(),
                line: None,
                key: None,
                message: format!("cannot read the config file: {e}"),
            }),
        }
    }

    /// Applies the environment variables of [`ENV_OVERRIDES`] (an empty variable counts as
    /// unset) and checks what they brought, as the file's values were checked.
    pub fn apply_env(&mut self, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        let get = |name: &str| env.get(name).filter(|v| !v.is_empty()).cloned();
        if let Some(v) = get("REPO_URL") {
            self.repo.url = Some(v);
        }
        if let Some(v) = get("REPO_BRANCH") {
            self.repo.branch = Some(v);
        }
        if let Some(v) = get("CLAUDE_PROMPT") {
            self.agent.prompt = Some(v);
        }
        if let Some(v) = get("GIT_USER_NAME") {
            self.git.user_name = v;
        }
        if let Some(v) = get("GIT_USER_EMAIL") {
            self.git.user_email = v;
        }
        if let Some(url) = get("REPO_URL") {
            check_repo_url(&url).map_err(|message| ConfigError {
                file: FROM_ENVIRONMENT.into(),
                line: None,
                key: Some("REPO_URL".into()),
                message,
            })?;
        }
        Ok(())
    }

    /// Every variable whose value is a secret: required and optional, in order, deduplicated.
    pub fn secret_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for n in self.secrets.required.iter().chain(&self.secrets.optional) {
            if !names.contains(&n.as_str()) {
                names.push(n);
            }
        }
        names
    }

    /// The metrics listener must be fenced off from the agent: that takes the firewall, and a
    /// port the agent's loopback rules do not open and no other listener of cordon's holds
    /// (the DNS listener's port is accepted for the agent before the metrics port is refused).
    fn validate_metrics(&self, listen: SocketAddr) -> Result<(), String> {
        let port = listen.port();
        if port == 0 {
            return Err("must name a port, e.g. \"127.0.0.1:9464\"".into());
        }
        if listen.ip().is_multicast() {
            return Err(format!(
                "{} is a multicast address; use a local one such as 127.0.0.1 or 0.0.0.0",
                listen.ip()
            ));
        }
        if !self.network.enforce {
            return Err("needs network.enforce = true: without the firewall the agent could reach the listener".into());
        }
        if self.network.loopback_ports.iter().any(|r| (r.first..=r.last).contains(&port)) {
            return Err(format!(
                "port {port} is also in network.loopback_ports: the agent would reach the metrics; pick another port"
            ));
        }
        if port == self.network.proxy_port || port == self.network.listen.port() {
            return Err(format!(
                "port {port} is cordon's own (network.proxy_port or network.listen); pick another port"
            ));
        }
        Ok(())
    }

    /// Checks the rules serde cannot express: relations between keys.
    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let err =
            |key: &str, message: String| ConfigError { file: file.into(), line: None, key: Some(key.into()), message };
        for name in self.secrets.required.iter().chain(&self.secrets.optional) {
            if !is_env_name(name) {
                return Err(err(
                    "secrets.required",
                    format!(
                        "`{name}` is not a valid environment variable name (letters, digits, _; not starting with a digit)"
                    ),
                ));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for m in &self.tmpfs.0 {
            if !seen.insert(&m.path) {
                return Err(err("tmpfs.path", format!("`{}` is listed twice", m.path)));
            }
            if m.path == ConfigPath::Absolute("/".into()) {
                return Err(err("tmpfs.path", "a tmpfs cannot be mounted over `/`".into()));
            }
        }
        if !self.agent.user.is_empty() && self.agent.user == "root" {
            return Err(err("agent.user", "the agent must not run as root".into()));
        }
        if self.agent.user.is_empty() {
            return Err(err("agent.user", "must name a user".into()));
        }
        if self.agent.session.is_empty()
            || !self.agent.session.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
        {
            return Err(err("agent.session", "must be letters, digits, `_` or `-`".into()));
        }
        if let Some(bad) = self.agent.env.iter().find(|n| !is_env_name(n)) {
            return Err(err("agent.env", format!("`{bad}` is not a valid environment variable name")));
        }
        if self.agent.command.is_empty() || self.agent.command[0].is_empty() {
            return Err(err("agent.command", "must name a program, e.g. [\"claude\"]".into()));
        }
        if self.network.ports.is_empty() || self.network.ports.contains(&0) || self.network.ports.len() > 15 {
            return Err(err("network.ports", "must list 1 to 15 ports from 1 to 65535, e.g. [443]".into()));
        }
        if !self.network.listen.ip().is_loopback() {
            return Err(err(
                "network.listen",
                "must be a loopback address (the DNS server is for this container only)".into(),
            ));
        }
        if self.network.proxy_port == 0 {
            return Err(err("network.proxy_port", "must be a port from 1 to 65535".into()));
        }
        if self.network.loopback_ports.iter().any(|r| (r.first..=r.last).contains(&self.network.proxy_port)) {
            return Err(err(
                "network.proxy_port",
                format!(
                    "{} is also in network.loopback_ports: the agent would reach the proxy directly; pick another port",
                    self.network.proxy_port
                ),
            ));
        }
        if let Some(listen) = self.metrics.listen {
            self.validate_metrics(listen).map_err(|message| err("metrics.listen", message))?;
        }
        if self.network.refresh_interval.0 < Duration::from_secs(10) {
            return Err(err("network.refresh_interval", "must be at least 10s".into()));
        }
        if let Some(probe) = &self.network.probe {
            crate::config::allowlist::Entry::parse(probe)
                .ok()
                .filter(|e| matches!(e.pattern, crate::config::allowlist::DomainPattern::Exact(_)) && e.port.is_some())
                .ok_or_else(|| {
                    err(
                        "network.probe",
                        format!("`{probe}` must be an exact name and a port, e.g. \"api.anthropic.com:443\""),
                    )
                })?;
        }
        if !self.supervisor.state_dir.is_absolute() {
            return Err(err("supervisor.state_dir", "must be an absolute path".into()));
        }
        if !self.repo.dest.is_absolute() {
            return Err(err("repo.dest", "must be an absolute path".into()));
        }
        if let Some(url) = &self.repo.url {
            check_repo_url(url).map_err(|e| err("repo.url", e))?;
        }
        for scope in &self.git.npm_scopes {
            if !scope.starts_with('@') || scope.len() < 2 || scope.contains(['/', ' ', ':']) {
                return Err(err("git.npm_scopes", format!("`{scope}` is not an npm scope such as \"@my-org\"")));
            }
        }
        if !self.agent.workdir.is_absolute() {
            return Err(err("agent.workdir", "must be an absolute path".into()));
        }
        if self.devcontainer.timeout.0 < Duration::from_secs(1) {
            return Err(err("devcontainer.timeout", "must be at least 1s".into()));
        }
        if self.supervisor.idle_stop.is_some_and(|s| s.0 < Duration::from_secs(1)) {
            return Err(err("supervisor.idle_stop", "must be at least 1s (or unset: never)".into()));
        }
        if self.events.path.as_ref().is_some_and(|p| !p.is_absolute() || p.file_name().is_none()) {
            return Err(err(
                "events.path",
                "must be an absolute path to a file, e.g. \"/run/cordon/events.jsonl\"".into(),
            ));
        }
        if self.events.max_size.0 < 4096 {
            return Err(err("events.max_size", "must be at least 4K".into()));
        }
        self.validate_persist().map_err(|(key, message)| err(key, message))?;
        for (key, names) in
            [("claude.marketplaces", &self.claude.marketplaces), ("claude.plugins", &self.claude.plugins)]
        {
            if let Some(bad) = names.iter().find(|n| !is_plugin_name(n)) {
                return Err(err(
                    key,
                    format!(
                        "`{bad}` is not a plugin or marketplace name (letters, digits and `@/._:-`, not starting with `-`)"
                    ),
                ));
            }
        }
        if self.claude.plugin_timeout.0 < Duration::from_secs(1) {
            return Err(err("claude.plugin_timeout", "must be at least 1s".into()));
        }
        Ok(())
    }

    /// `agent.persist` and `agent.persist_volume`: home paths only, none inside another, none
    /// holding a file cordon writes as root at boot, and a volume that stays writable.
    fn validate_persist(&self) -> Result<(), (&'static str, String)> {
        let mut rels: Vec<&Path> = Vec::new();
        for p in &self.agent.persist {
            let rel = match p {
                ConfigPath::Home(rel) if !rel.as_os_str().is_empty() => rel.as_path(),
                _ => {
                    return Err((
                        "agent.persist",
                        format!("`{p}` must be a path inside the agent's home, written ~/path, e.g. \"~/.claude\""),
                    ));
                }
            };
            if let Some(other) = rels.iter().find(|o| o.starts_with(rel) || rel.starts_with(o)) {
                return Err((
                    "agent.persist",
                    format!("`{p}` and `~/{}` overlap; list only the outer one", other.display()),
                ));
            }
            if let Some(written) =
                crate::session::credentials::BOOT_WRITTEN.iter().find(|w| Path::new(w).starts_with(rel))
                && Path::new(written).parent() != Some(rel)
            {
                return Err((
                    "agent.persist",
                    format!("`{p}` holds ~/{written}, which cordon writes as root at boot; persist a path beside it"),
                ));
            }
            rels.push(rel);
        }
        match &self.agent.persist_volume {
            None if !rels.is_empty() => Err((
                "agent.persist_volume",
                "must be set when agent.persist lists paths: a directory on a volume listed in filesystem.writable, \
                 e.g. \"/workspace\""
                    .into(),
            )),
            None => Ok(()),
            Some(v) if !v.is_absolute() || v.components().any(|c| matches!(c, std::path::Component::ParentDir)) => {
                Err(("agent.persist_volume", format!("`{}` must be an absolute path without `..`", v.display())))
            }
            Some(v) => {
                let on_volume =
                    self.filesystem.writable.iter().any(|w| matches!(w, ConfigPath::Absolute(w) if v.starts_with(w)));
                if on_volume {
                    Ok(())
                } else {
                    Err((
                        "agent.persist_volume",
                        format!(
                            "`{}` is not at or below an entry of filesystem.writable: a persisted path must live on a \
                             volume that survives a restart; list the volume's mount point there",
                            v.display()
                        ),
                    ))
                }
            }
        }
    }
}

/// A plugin or marketplace name as `claude plugin` takes it (`name@marketplace`, `owner/repo`,
/// a git URL): it becomes one argv word, so only its first character matters for safety (not
/// an option); the set is narrow so a typo shows here rather than in the boot log.
fn is_plugin_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"@/._:-+".contains(&b))
}

fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Turns toml's error into one that names the line and, where the line shows it, the dotted
/// key (the table header above the line plus the key on it).
fn locate(e: &toml::de::Error, text: &str, file: &Path) -> ConfigError {
    let message = e.message().trim().to_string();
    let Some(span) = e.span() else {
        return ConfigError { file: file.into(), line: None, key: None, message };
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line_text = text.lines().nth(line_no - 1).unwrap_or("");
    let key_on_line = line_text
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    let table = text
        .lines()
        .take(line_no)
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("[[")
                .and_then(|r| r.strip_suffix("]]"))
                .or_else(|| l.strip_prefix('[').and_then(|r| r.strip_suffix(']')))
        })
        .last()
        .map(|t| t.trim().to_string());
    let key = match (table, key_on_line) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (None, Some(k)) => Some(k),
        (Some(t), None) => Some(t),
        (None, None) => None,
    };
    ConfigError { file: file.into(), line: Some(line_no), key, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("cordon.toml"))
    }

    #[test]
    fn network_mode_is_enforce_unless_observe_is_asked_and_nothing_else_is_taken() {
        assert_eq!(parse("").unwrap().network.mode, Mode::Enforce);
        assert_eq!(parse("[network]\nmode = \"observe\"\n").unwrap().network.mode, Mode::Observe);
        let e = parse("[network]\nmode = \"audit\"\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
    }

    #[test]
    fn urls_with_credentials_options_or_odd_schemes_are_refused() {
        for ok in [
            "https://github.com/o/r.git",
            "http://git.example.com/r.git",
            "git@github.com:o/r.git",
            "ssh://git@github.com/o/r.git",
        ] {
            assert_eq!(check_repo_url(ok), Ok(()), "{ok}");
        }
        let e = check_repo_url("https://ghp_abc@github.com/o/r.git").unwrap_err();
        assert!(e.contains("GH_PAT"), "{e}");
        assert!(check_repo_url("https://user:pw@github.com/o/r.git").is_err());
        assert!(check_repo_url("--upload-pack=touch /tmp/x").unwrap_err().contains("option"));
        assert!(check_repo_url("file:///etc").is_err());
        assert!(check_repo_url("ext::sh -c touch% /tmp/pwned").is_err());
        assert!(check_repo_url("/srv/repo").is_err());
    }

    #[test]
    fn empty_file_means_every_default() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::default();
        assert_eq!(c.secrets.required, ["GH_PAT", "CLAUDE_CODE_OAUTH_TOKEN"]);
        let paths: Vec<String> = c.tmpfs.0.iter().map(|m| format!("{} {}", m.path, m.size)).collect();
        assert_eq!(paths, ["/workspace 512M", "/tmp 512M", "~ 1G"]);
        assert!(c.filesystem.readonly_root);
        assert_eq!(c.agent.user, "agent");
        assert_eq!(c.supervisor.stop_grace, Span(Duration::from_secs(10)));
        assert_eq!(c.supervisor.on_boot_failure, OnBootFailure::Hold);
        assert_eq!(c.supervisor.state_dir, Path::new("/run/cordon"));
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = parse("[supervisor]\nstop_grace = \"5s\"\nstop_grase = \"5s\"\n").unwrap_err();
        assert_eq!(e.line, Some(3));
        assert_eq!(e.key.as_deref(), Some("supervisor.stop_grase"));
        assert!(e.message.contains("unknown field `stop_grase`"), "{}", e.message);
    }

    #[test]
    fn loopback_ports_take_ports_and_ranges_and_name_the_key_when_wrong() {
        let c = parse("[network]\nloopback_ports = [3000, \"8000-8099\", \"32768-60999\"]\n").unwrap();
        assert_eq!(
            c.network.loopback_ports,
            [
                PortRange { first: 3000, last: 3000 },
                PortRange { first: 8000, last: 8099 },
                PortRange { first: 32768, last: 60999 }
            ]
        );
        assert!(Config::default().network.loopback_ports.is_empty());
        for bad in ["0", "70000", "\"9000-8000\"", "\"http\"", "\"80-\"", "-1", "1.5"] {
            let e = parse(&format!("[network]\nloopback_ports = [{bad}]\n")).unwrap_err();
            assert_eq!(e.key.as_deref(), Some("network.loopback_ports"), "{bad}: {e}");
            assert_eq!(e.line, Some(2), "{bad}");
        }
        let text = toml::to_string(&c.network).unwrap();
        assert!(text.contains("loopback_ports = [3000, \"8000-8099\", \"32768-60999\"]"), "{text}");
    }

    #[test]
    fn unknown_section_is_named() {
        let e = parse("\n[supervisr]\n").unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("supervisr"), "{}", e.message);
    }

    #[test]
    fn bad_value_names_key_line_and_expectation() {
        let text = "[[tmpfs]]\npath = \"/workspace\"\nsize = \"12X\"\n";
        let e = parse(text).unwrap_err();
        assert_eq!(e.line, Some(3));
        assert_eq!(e.key.as_deref(), Some("tmpfs.size"));
        assert!(e.message.contains("invalid size `12X`"), "{}", e.message);
        assert!(e.to_string().starts_with("cordon.toml:3: key `tmpfs.size`: invalid size"), "{e}");
    }

    #[test]
    fn wrong_type_is_an_error_not_a_default() {
        let e = parse("[filesystem]\nreadonly_root = \"yes\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("filesystem.readonly_root"));
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn tmpfs_list_in_file_replaces_the_defaults() {
        let c = parse("[[tmpfs]]\npath = \"/scratch\"\nsize = \"64M\"\nmode = \"0700\"\nowner = \"agent\"\n").unwrap();
        assert_eq!(c.tmpfs.0.len(), 1);
        assert_eq!(c.tmpfs.0[0].mode, FileMode(0o700));
        assert_eq!(c.tmpfs.0[0].owner, Some(Owner::Agent));
    }

    #[test]
    fn a_tmpfs_at_or_below_the_agents_home_belongs_to_the_agent_unless_an_owner_is_given() {
        let text = "[[tmpfs]]\npath = \"~\"\nsize = \"1M\"\n[[tmpfs]]\npath = \"/home/agent\"\nsize = \"1M\"\n\
                    [[tmpfs]]\npath = \"~/.cache\"\nsize = \"1M\"\n[[tmpfs]]\npath = \"/scratch\"\nsize = \"1M\"\n\
                    [[tmpfs]]\npath = \"/home/agentx\"\nsize = \"1M\"\n\
                    [[tmpfs]]\npath = \"/home/agent/x\"\nsize = \"1M\"\nowner = \"root\"\n";
        let c = parse(text).unwrap();
        let home = Path::new("/home/agent");
        let owners: Vec<Owner> = c.tmpfs.0.iter().map(|m| m.owner_for(home)).collect();
        assert_eq!(owners, [Owner::Agent, Owner::Agent, Owner::Agent, Owner::Root, Owner::Root, Owner::Root]);
    }

    #[test]
    fn name_binding_is_on_by_default_and_its_proxy_port_stays_off_the_agents_loopback_ports() {
        let c = Config::default();
        assert!(c.network.name_binding);
        assert_eq!(c.network.proxy_port, 15443);
        let c = parse("[network]\nname_binding = false\nproxy_port = 20000\n").unwrap();
        assert!(!c.network.name_binding);
        assert_eq!(c.network.proxy_port, 20000);
        let e = parse("[network]\nloopback_ports = [\"15000-16000\"]\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("network.proxy_port"), "{e}");
        assert!(parse("[network]\nproxy_port = 0\n").is_err());
    }

    #[test]
    fn metrics_are_off_by_default_and_refused_where_the_agent_could_reach_them() {
        assert_eq!(Config::default().metrics.listen, None);
        let c = parse("[metrics]\nlisten = \"0.0.0.0:9464\"\n").unwrap();
        assert_eq!(c.metrics.listen, Some("0.0.0.0:9464".parse().unwrap()));
        let refused = [
            "[metrics]\nlisten = \"127.0.0.1:0\"\n",
            "[metrics]\nlisten = \"127.0.0.1:9464\"\n[network]\nloopback_ports = [\"9000-9999\"]\n",
            "[metrics]\nlisten = \"127.0.0.1:9464\"\n[network]\nenforce = false\n",
            "[metrics]\nlisten = \"127.0.0.1:15443\"\n",
            "[metrics]\nlisten = \"0.0.0.0:53\"\n",
            "[metrics]\nlisten = \"224.0.0.1:9464\"\n",
        ];
        for text in refused {
            let e = parse(text).unwrap_err();
            assert_eq!(e.key.as_deref(), Some("metrics.listen"), "{text}: {e}");
        }
        assert!(parse("[metrics]\nlisten = \"localhost:9464\"\n").is_err());
        assert!(parse("[metrics]\nport = 9464\n").is_err());
    }

    #[test]
    fn relations_between_keys_are_checked() {
        let twice = "[[tmpfs]]\npath = \"/a\"\nsize = \"1M\"\n[[tmpfs]]\npath = \"/a/\"\nsize = \"2M\"\n";
        assert!(parse(twice).unwrap_err().message.contains("listed twice"));
        assert_eq!(parse("[agent]\nuser = \"root\"\n").unwrap_err().key.as_deref(), Some("agent.user"));
        assert_eq!(parse("[agent]\ncommand = []\n").unwrap_err().key.as_deref(), Some("agent.command"));
        let bad_name = "[secrets]\nrequired = [\"GH PAT\"]\n";
        assert!(parse(bad_name).unwrap_err().message.contains("`GH PAT`"));
    }

    #[test]
    fn persist_takes_home_paths_kept_on_a_writable_volume_and_names_the_field_when_wrong() {
        let ok = "[filesystem]\nwritable = [\"/data\"]\n[agent]\npersist = [\"~/.claude\", \"~/.local/share/x\"]\n\
                  persist_volume = \"/data/agent\"\n";
        let c = parse(ok).unwrap();
        assert_eq!(c.agent.persist.len(), 2);
        assert_eq!(c.agent.persist_volume.as_deref(), Some(Path::new("/data/agent")));
        let bad =
            |agent: &str| parse(&format!("[filesystem]\nwritable = [\"/data\"]\n[agent]\n{agent}\n")).unwrap_err();
        for (agent, key, says) in [
            ("persist = [\"/etc\"]\npersist_volume = \"/data\"", "agent.persist", "inside the agent's home"),
            ("persist = [\"~\"]\npersist_volume = \"/data\"", "agent.persist", "inside the agent's home"),
            ("persist = [\"~/../etc\"]\npersist_volume = \"/data\"", "agent.persist", "`..`"),
            ("persist = [\"~/.config\"]\npersist_volume = \"/data\"", "agent.persist", "cordon writes as root"),
            (
                "persist = [\"~/.claude\", \"~/.claude/projects\"]\npersist_volume = \"/data\"",
                "agent.persist",
                "overlap",
            ),
            ("persist = [\"~/.claude\"]", "agent.persist_volume", "must be set"),
            (
                "persist = [\"~/.claude\"]\npersist_volume = \"/workspace\"",
                "agent.persist_volume",
                "filesystem.writable",
            ),
            ("persist = [\"~/.claude\"]\npersist_volume = \"/data/../etc\"", "agent.persist_volume", "`..`"),
        ] {
            let e = bad(agent);
            assert_eq!(e.key.as_deref(), Some(key), "{agent}: {e}");
            assert!(e.message.contains(says), "{agent}: {e}");
        }
        assert!(Config::default().agent.persist.is_empty(), "nothing is persisted by default");
    }

    #[test]
    fn claude_extras_are_off_by_default_and_plugin_names_cannot_be_options() {
        let c = Config::default().claude;
        assert!(c.plugins.is_empty() && c.marketplaces.is_empty() && !c.status_line && !c.name_session);
        let c = parse("[claude]\nmarketplaces = [\"anthropics/claude-plugins-official\"]\nplugins = [\"superpowers@claude-plugins-official\"]\nstatus_line = true\n").unwrap();
        assert_eq!(c.claude.plugins, ["superpowers@claude-plugins-official"]);
        assert!(c.claude.status_line);
        for bad in ["--help", "a b", "", "x;rm"] {
            let e = parse(&format!("[claude]\nplugins = [\"{bad}\"]\n")).unwrap_err();
            assert_eq!(e.key.as_deref(), Some("claude.plugins"), "{bad}: {e}");
        }
        assert_eq!(
            parse("[claude]\nplugin_timeout = \"0s\"\n").unwrap_err().key.as_deref(),
            Some("claude.plugin_timeout")
        );
    }

    #[test]
    fn environment_overrides_keys_and_empty_counts_as_unset() {
        let mut c = parse("[repo]\nurl = \"https://example.com/a.git\"\n[git]\nuser_name = \"file\"\n").unwrap();
        let env: BTreeMap<String, String> = [
            ("REPO_URL", "https://github.com/o/r.git"),
            ("REPO_BRANCH", "dev"),
            ("CLAUDE_PROMPT", "fix it"),
            ("GIT_USER_NAME", ""),
            ("GIT_USER_EMAIL", "a@b.c"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        c.apply_env(&env).unwrap();
        assert_eq!(c.repo.url.as_deref(), Some("https://github.com/o/r.git"));
        assert_eq!(c.repo.branch.as_deref(), Some("dev"));
        assert_eq!(c.agent.prompt.as_deref(), Some("fix it"));
        assert_eq!(c.git.user_name, "file");
        assert_eq!(c.git.user_email, "a@b.c");
    }

    #[test]
    fn a_repo_url_from_the_environment_is_checked_too() {
        let mut c = Config::default();
        let env: BTreeMap<String, String> = [("REPO_URL".to_string(), "https://t0k@github.com/o/r".to_string())].into();
        let e = c.apply_env(&env).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("REPO_URL"));
        assert!(!e.to_string().contains("t0k"), "{e}");
    }

    #[test]
    fn effective_config_round_trips_without_the_prompt() {
        let mut c = Config::default();
        c.agent.prompt = Some("do not print me".into());
        let text = toml::to_string(&c).unwrap();
        assert!(!text.contains("do not print me"));
        let mut back = parse(&text).unwrap();
        back.agent.prompt = c.agent.prompt.clone();
        assert_eq!(back, c);
    }

    #[test]
    fn shipped_config_parses_and_equals_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cordon.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(Config::parse(&text, &path).unwrap(), Config::default());
    }

    #[test]
    fn demo_config_is_the_defaults_with_no_secrets_and_the_demo_agent() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut demo = Config::parse(&text, &path).unwrap();
        assert!(demo.secrets.required.is_empty());
        assert_eq!(demo.agent.command, ["/usr/local/share/cordon/demo-agent"]);
        let defaults = Config::default();
        demo.secrets.required = defaults.secrets.required.clone();
        demo.agent.command = defaults.agent.command.clone();
        assert_eq!(demo, defaults, "config/demo.toml changes nothing else");
    }
}
