//! Giving back the pages of cordon's own code that only the boot ran.
//!
//! The supervisor's binary carries the whole boot (argument and config parsing, mounts, the
//! firewall, the clone, credentials) beside the services that run for the container's life.
//! Everything the boot executed stays mapped after it ends, and the kernel maps code in 64 KiB
//! runs around each page it faults in, so most of the text is resident when the agent starts.
//! Once the boot is over, [`release_own_code`] drops the page-table entries of the binary's
//! read-only mappings (`madvise(MADV_DONTNEED)`); what the services still run faults back in
//! from the page cache on its next use, and the rest stops counting in the supervisor's RSS.
//!
//! Dropping a private mapping's pages discards any copy-on-write change made to them: for a
//! relocated segment (RELRO) that would undo the dynamic linker's work. So only mappings that
//! are read-only, private, of the executable itself and hold no anonymous (copied) page at all
//! are touched; the check reads `/proc/self/smaps` just before.

use std::io;
use std::ops::Range;
use std::path::Path;

/// What [`release_own_code`] gave back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Released {
    pub mappings: usize,
    /// The resident KiB of those mappings just before.
    pub kib: u64,
}

/// Drops the resident pages of the running executable's read-only mappings that hold no
/// copied page (see the module's documentation). Only the memory accounting changes: the
/// pages are clean file pages, read again from the page cache when next executed.
pub(crate) fn release_own_code() -> io::Result<Released> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = Released { mappings: 0, kib: 0 };
    for (range, kib) in droppable(&smaps, &exe) {
        // SAFETY: the range is a whole mapping of this process, read-only, private and
        // file-backed with no anonymous page (checked just above from smaps): MADV_DONTNEED
        // only drops page-table entries, and every page reads back as the same file page.
        let rc =
            unsafe { libc::madvise(range.start as *mut libc::c_void, range.end - range.start, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        released.mappings += 1;
        released.kib += kib;
    }
    Ok(released)
}

/// The mappings of `exe` in `smaps` (the text of /proc/PID/smaps) that may be dropped: not
/// writable, private, with `Anonymous: 0 kB`; each with its resident KiB.
fn droppable(smaps: &str, exe: &Path) -> Vec<(Range<usize>, u64)> {
    let exe = exe.as_os_str().to_string_lossy();
    let mut found = Vec::new();
    // The mapping being read: its range if it is a candidate, and its Rss.
    let mut current: Option<(Range<usize>, u64)> = None;
    for line in smaps.lines() {
        if let Some(header) = mapping_header(line) {
            current = header
                .filter(|h| {
                    h.path == exe
                        && h.perms.starts_with('r')
                        && h.perms.get(1..2) == Some("-")
                        && h.perms.ends_with('p')
                })
                .map(|h| (h.range, 0));
            continue;
        }
        let Some((range, rss)) = current.as_mut() else { continue };
        if let Some(kib) = field_kib(line, "Rss:") {
            *rss = kib;
        } else if let Some(kib) = field_kib(line, "Anonymous:") {
            // smaps gives Rss before Anonymous: the mapping is complete here.
            if kib == 0 {
                found.push((range.clone(), *rss));
            }
            current = None;
        }
    }
    found
}

struct Header<'a> {
    range: Range<usize>,
    perms: &'a str,
    path: &'a str,
}

/// `Some(header)` when `line` starts a mapping (`lo-hi perms offset dev inode [path]`), with
/// `None` inside when it cannot be read; `None` for a field line.
fn mapping_header(line: &str) -> Option<Option<Header<'_>>> {
    let mut parts = line.splitn(6, ' ');
    let range = parts.next()?;
    let (lo, hi) = range.split_once('-')?;
    let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)) else { return None };
    let perms = parts.next().filter(|p| p.len() == 4);
    // offset, device, inode, then the path after the padding (absent for anonymous mappings).
    let path = parts.nth(3).map(str::trim_start).unwrap_or("");
    Some(perms.filter(|_| lo < hi).map(|perms| Header { range: lo..hi, perms, path }))
}

fn field_kib(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From a release build's /proc/PID/smaps (fields trimmed to those read and a few others).
    const SMAPS: &str = "\
555670a5a000-555670b75000 r--p 00000000 fe:00 5799959                    /usr/local/bin/cordon
Size:               1132 kB
Rss:                 472 kB
Pss:                 236 kB
Anonymous:             0 kB
555670b75000-555670ff5000 r-xp 0011a000 fe:00 5799959                    /usr/local/bin/cordon
Size:               4608 kB
Rss:                4160 kB
Anonymous:             0 kB
555670ff5000-555671011000 r--p 00599000 fe:00 5799959                    /usr/local/bin/cordon
Size:                112 kB
Rss:                 112 kB
Anonymous:           112 kB
555671011000-555671015000 rw-p 005b4000 fe:00 5799959                    /usr/local/bin/cordon
Rss:                  16 kB
Anonymous:            16 kB
55567e0cf000-55567e6b0000 rw-p 00000000 00:00 0                          [heap]
Rss:                5972 kB
Anonymous:          5972 kB
7f56fd77e000-7f56fd928000 rw-p 00000000 00:00 0 
Rss:                1704 kB
Anonymous:          1704 kB
7f56fe906000-7f56fea5c000 r-xp 00026000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                1128 kB
Anonymous:             0 kB
7f56feb46000-7f56feba0000 r--s 00084000 fe:00 1234                       /usr/local/bin/cordon
Rss:                  12 kB
Anonymous:             0 kB
";

    #[test]
    fn only_the_executables_clean_read_only_private_mappings_are_dropped() {
        let found = droppable(SMAPS, Path::new("/usr/local/bin/cordon"));
        assert_eq!(
            found,
            vec![(0x555670a5a000..0x555670b75000, 472), (0x555670b75000..0x555670ff5000, 4160)],
            "not the relocated segment (anonymous pages), the writable one, the heap, libc or a shared mapping"
        );
    }

    #[test]
    fn a_mapping_with_one_copied_page_is_kept() {
        let touched = SMAPS.replacen("Anonymous:             0 kB", "Anonymous:             4 kB", 1);
        let found = droppable(&touched, Path::new("/usr/local/bin/cordon"));
        assert_eq!(found, vec![(0x555670b75000..0x555670ff5000, 4160)]);
    }

    #[test]
    fn another_path_or_unreadable_text_drops_nothing() {
        assert!(droppable(SMAPS, Path::new("/usr/bin/cordon")).is_empty());
        assert!(droppable("garbage\nRss: 4 kB\nAnonymous: 0 kB\n", Path::new("/usr/local/bin/cordon")).is_empty());
        // A header whose Anonymous line never comes (a truncated read) is not dropped.
        let truncated = "555670b75000-555670ff5000 r-xp 0011a000 fe:00 5799959 /usr/local/bin/cordon\nRss: 4160 kB\n";
        assert!(droppable(truncated, Path::new("/usr/local/bin/cordon")).is_empty());
    }

    #[test]
    fn the_running_test_binary_has_droppable_code() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let found = droppable(&smaps, &exe);
        assert!(!found.is_empty(), "no mapping of {exe:?} found droppable");
        // Its writable data is never among them.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        for (range, _) in &found {
            let line = maps.lines().find(|l| l.starts_with(&format!("{:x}-", range.start))).unwrap();
            assert!(!line.split_whitespace().nth(1).unwrap().contains('w'), "{line}");
        }
    }

    #[test]
    fn released_code_stops_counting_and_still_runs() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let resident = || {
            droppable(&std::fs::read_to_string("/proc/self/smaps").unwrap(), &exe)
                .iter()
                .map(|(_, kib)| kib)
                .sum::<u64>()
        };
        let before = resident();
        let released = release_own_code().unwrap();
        assert!(released.mappings >= 1 && released.kib > 0, "{released:?}");
        let after = resident();
        assert!(after < before, "resident code {before} KiB before, {after} KiB after");
        // Code that ran before runs again (faulted back from the page cache).
        assert_eq!(droppable(SMAPS, Path::new("/usr/local/bin/cordon")).len(), 2);
    }
}
