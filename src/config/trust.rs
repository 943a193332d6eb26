//! Whether a file cordon reads again while it runs (the configuration file and the allowlist,
//! on `cordon reload` and SIGHUP) could have been edited by someone other than root: a file or
//! directory the agent can write would let it put its own entries in force at the next reload.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

/// Why `path` (`what`: the key or role that names it) is not root's alone, or `None` when it
/// and its directory are owned by root and writable by root only, and every directory above
/// is root's and not writable by others (or sticky, like /tmp, where no one can rename root's
/// entries away). Symlinks are followed (a Kubernetes ConfigMap's `..data` links are fine):
/// the file judged is the one the link resolves to now, which [`resolve`] gives to read, so a
/// link repointed after the check changes nothing. A missing file is not judged here (its
/// reader says so).
pub fn not_roots(path: &Path, what: &str) -> Option<String> {
    let resolved = std::fs::canonicalize(path).ok()?;
    for (i, p) in resolved.ancestors().enumerate() {
        let role = match i {
            0 => "it",
            1 => "its directory",
            _ => "the directory above it",
        };
        let meta = match std::fs::metadata(p) {
            Ok(m) => m,
            Err(e) => return Some(format!("{} ({what}): cannot check {role} {}: {e}", path.display(), p.display())),
        };
        let others_write = meta.mode() & 0o022 != 0 && !(i > 1 && meta.mode() & 0o1000 != 0);
        // Root's (cordon's own uid is root's; it is accepted too so that the unit tests run
        // unprivileged).
        let owner = meta.uid() == 0 || meta.uid() == nix::unistd::geteuid().as_raw();
        if !owner || others_write {
            return Some(format!(
                "{} ({what}): {role} {} is owned by uid {} with mode {:04o}, so another user (the agent?) could \
                 have edited it; make the file and its directory root's and writable by root only (chown root; \
                 chmod go-w)",
                path.display(),
                p.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ));
        }
    }
    None
}

/// Where `path` resolves to now (itself when it cannot be resolved: its reader then says why).
pub fn resolve(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// [`not_roots`] for the configuration file (when there is one) and the allowlist file that
/// `config` names: every problem found.
pub fn reload_sources(config_file: &Path, config: &super::Config) -> Vec<String> {
    [(config_file, "the configuration file"), (config.network.allowlist.as_path(), "network.allowlist")]
        .into_iter()
        .filter_map(|(p, what)| not_roots(p, what))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn mode(p: &Path, m: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    #[test]
    fn a_file_or_directory_others_can_write_is_named_with_the_fix_and_a_root_only_one_passes() {
        let dir = std::env::temp_dir().join(format!("cordon-trust-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("..data")).unwrap();
        mode(&dir, 0o755);
        mode(&dir.join("..data"), 0o755);
        let file = dir.join("..data/domains.conf");
        std::fs::write(&file, "example.com\n").unwrap();
        mode(&file, 0o644);
        // A ConfigMap-style symlink to a root-only file: fine.
        std::os::unix::fs::symlink("..data/domains.conf", dir.join("domains.conf")).unwrap();
        assert_eq!(not_roots(&dir.join("domains.conf"), "network.allowlist"), None);
        assert_eq!(not_roots(&dir.join("missing.conf"), "network.allowlist"), None);

        mode(&file, 0o666);
        let e = not_roots(&dir.join("domains.conf"), "network.allowlist").unwrap();
        assert!(e.contains("(network.allowlist)") && e.contains("mode 0666") && e.contains("chmod go-w"), "{e}");
        mode(&file, 0o644);
        // Owned by another uid (giving it away takes root).
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&file, Some(4242), None).unwrap();
            assert!(not_roots(&file, "x").unwrap().contains("uid 4242"));
            std::os::unix::fs::chown(&file, Some(0), None).unwrap();
        }
        // The resolved file's directory is judged, not the symlink's.
        mode(&dir.join("..data"), 0o777);
        let e = not_roots(&dir.join("domains.conf"), "network.allowlist").unwrap();
        assert!(e.contains("its directory") && e.contains("..data"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
