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
//! Dropping a private mapping's pages discards any copy-on-write change made to them: for the
//! relocated data (RELRO: `.data.rel.ro`, the GOT, read-only once the dynamic linker is done)
//! that would undo the linker's work. So a mapping is dropped only when
//! - the executable's own ELF program headers (`dl_iterate_phdr`) place it inside a segment that
//!   is not writable, and it touches no page of a writable segment (RELRO is part of one);
//! - and `/proc/self/smaps`, read just before, shows it read-only, private, of the executable's
//!   path, with no copied page, resident or swapped (`Anonymous: 0 kB`, `Swap: 0 kB`), and not
//!   locked.

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

/// A loaded segment of the executable (`PT_LOAD`, or `PT_GNU_RELRO`, counted as writable), at
/// its address in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    range: Range<usize>,
    writable: bool,
}

/// Drops the resident pages of the running executable's code and constants (see the module's
/// documentation). Only the memory accounting changes: the pages are clean file pages, read
/// again from the page cache when next used. A mapping the kernel refuses is skipped.
pub(crate) fn release_own_code() -> io::Result<Released> {
    let segments = executable_segments();
    let exe = std::fs::read_link("/proc/self/exe")?;
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as usize;
    let mut released = Released { mappings: 0, kib: 0 };
    for (range, kib) in droppable(&smaps, &exe, &segments, page) {
        // SAFETY: the range is a whole mapping of this process inside a non-writable segment of
        // the executable, read-only, private and file-backed with no copied page (checked just
        // above): MADV_DONTNEED only drops page-table entries, and every page reads back as
        // the same file page.
        let rc =
            unsafe { libc::madvise(range.start as *mut libc::c_void, range.end - range.start, libc::MADV_DONTNEED) };
        if rc == 0 {
            released.mappings += 1;
            released.kib += kib;
        } else {
            tracing::debug!("cannot give back {range:x?}: {}", io::Error::last_os_error());
        }
    }
    Ok(released)
}

/// The executable's loaded segments, from its program headers as the dynamic linker holds them.
fn executable_segments() -> Vec<Segment> {
    /// Called for each loaded object, the executable first; stops after it.
    unsafe extern "C" fn first_object(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid `dl_phdr_info` for the duration of the call,
        // and `data` is the `Vec` below, borrowed by nothing else while it runs.
        let (info, out) = unsafe { (&*info, &mut *data.cast::<Vec<Segment>>()) };
        if info.dlpi_phdr.is_null() {
            return 1;
        }
        // SAFETY: `dlpi_phdr` points at `dlpi_phnum` program headers, per dl_iterate_phdr(3).
        let headers = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
        for h in headers.iter().filter(|h| h.p_type == libc::PT_LOAD || h.p_type == libc::PT_GNU_RELRO) {
            let start = (info.dlpi_addr as usize).wrapping_add(h.p_vaddr as usize);
            let writable = h.p_type == libc::PT_GNU_RELRO || h.p_flags & libc::PF_W != 0;
            out.push(Segment { range: start..start.saturating_add(h.p_memsz as usize), writable });
        }
        1
    }
    let mut segments: Vec<Segment> = Vec::new();
    // SAFETY: the callback only reads what dl_iterate_phdr hands it and writes to `segments`,
    // which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(first_object), (&raw mut segments).cast()) };
    segments
}

/// The mappings of `exe` in `smaps` (the text of /proc/PID/smaps) that may be dropped, each with
/// its resident KiB: inside a non-writable segment of `segments` and clear of every page of a
/// writable one (`page`: the page size), not writable, private, with no anonymous page resident
/// or swapped, not locked.
fn droppable(smaps: &str, exe: &Path, segments: &[Segment], page: usize) -> Vec<(Range<usize>, u64)> {
    let exe = exe.as_os_str().to_string_lossy();
    // Rounded out to whole pages; a range that cannot be (at the top of the address space)
    // becomes everything, so it can only exclude more.
    let paged = |s: &Segment| {
        s.range.end.div_ceil(page).checked_mul(page).map_or(0..usize::MAX, |end| s.range.start / page * page..end)
    };
    let in_code = |m: &Range<usize>| {
        segments.iter().filter(|s| !s.writable).map(paged).any(|s| s.start <= m.start && m.end <= s.end)
            && segments.iter().filter(|s| s.writable).map(paged).all(|w| m.end <= w.start || w.end <= m.start)
    };
    let mut found = Vec::new();
    // The mapping being read, if it is a candidate: its range, Rss, whether a copied page has
    // been seen, and how many of the two fields that say so (Anonymous, Swap) were read.
    let mut current: Option<(Range<usize>, u64, bool, u8)> = None;
    for line in smaps.lines() {
        // A field line is `Name: value`; anything else starts a mapping, or is not one and
        // ends the one being read.
        if !line.split_whitespace().next().is_some_and(|name| name.ends_with(':')) {
            current = super::parse_mapping(line)
                .filter(|h| {
                    h.path == exe
                        && h.perms.starts_with('r')
                        && h.perms.get(1..2) == Some("-")
                        && h.perms.ends_with('p')
                })
                .filter(|h| in_code(&h.range))
                .map(|h| (h.range, 0, false, 0));
            continue;
        }
        let Some((range, rss, copied, seen)) = current.as_mut() else { continue };
        if let Some(kib) = field_kib(line, "Rss:") {
            *rss = kib;
        } else if let Some(kib) = field_kib(line, "Anonymous:").or_else(|| field_kib(line, "Swap:")) {
            *copied |= kib != 0;
            *seen += 1;
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            // The mapping's last line: complete here.
            if !*copied && *seen == 2 && !flags.split_whitespace().any(|f| f == "lo") {
                found.push((range.clone(), *rss));
            }
            current = None;
        }
    }
    found
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
Anonymous:             0 kB
Swap:                  0 kB
VmFlags: rd mr mw me sd
555670b75000-555670ff5000 r-xp 0011a000 fe:00 5799959                    /usr/local/bin/cordon
Size:               4608 kB
Rss:                4160 kB
Anonymous:             0 kB
Swap:                  0 kB
VmFlags: rd ex mr mw me sd
555670ff5000-555671011000 r--p 00599000 fe:00 5799959                    /usr/local/bin/cordon
Size:                112 kB
Rss:                 112 kB
Anonymous:           112 kB
Swap:                  0 kB
VmFlags: rd mr mw me ac sd
555671011000-555671015000 rw-p 005b4000 fe:00 5799959                    /usr/local/bin/cordon
Rss:                  16 kB
Anonymous:            16 kB
Swap:                  0 kB
VmFlags: rd wr mr mw me ac sd
55567e0cf000-55567e6b0000 rw-p 00000000 00:00 0                          [heap]
Rss:                5972 kB
Anonymous:          5972 kB
Swap:                  0 kB
VmFlags: rd wr mr mw me ac sd
7f56fe906000-7f56fea5c000 r-xp 00026000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                1128 kB
Anonymous:             0 kB
Swap:                  0 kB
VmFlags: rd ex mr mw me sd
";

    const EXE: &str = "/usr/local/bin/cordon";

    /// The program headers behind SMAPS: constants, code, then the data segment (PF_W) with
    /// the RELRO range at its start.
    fn segments() -> Vec<Segment> {
        vec![
            Segment { range: 0x555670a5a000..0x555670b74f10, writable: false },
            Segment { range: 0x555670b75000..0x555670ff4a31, writable: false },
            Segment { range: 0x555670ff5000..0x555671013c40, writable: true },
            Segment { range: 0x555670ff5000..0x555671010e28, writable: true },
        ]
    }

    fn found(smaps: &str) -> Vec<(Range<usize>, u64)> {
        droppable(smaps, Path::new(EXE), &segments(), 4096)
    }

    #[test]
    fn only_the_executables_code_and_constants_are_dropped() {
        assert_eq!(
            found(SMAPS),
            vec![(0x555670a5a000..0x555670b75000, 472), (0x555670b75000..0x555670ff5000, 4160)],
            "not the relocated segment, the writable one, the heap or libc"
        );
    }

    #[test]
    fn a_relocated_segment_is_kept_even_with_its_copies_swapped_out() {
        // Its copied pages in swap: smaps no longer counts them as Anonymous.
        let swapped = SMAPS.replacen(
            "Anonymous:           112 kB\nSwap:                  0 kB",
            "Anonymous:             0 kB\nSwap:                112 kB",
            1,
        );
        assert!(swapped != SMAPS);
        assert_eq!(found(&swapped).len(), 2);
        // And even if smaps showed no copy at all: it lies in a writable segment.
        let clean = SMAPS.replacen("Anonymous:           112 kB", "Anonymous:             0 kB", 1);
        assert_eq!(found(&clean).len(), 2);
    }

    #[test]
    fn a_code_mapping_with_a_copied_swapped_or_locked_page_is_kept() {
        let copied = SMAPS.replacen("Anonymous:             0 kB", "Anonymous:             4 kB", 1);
        assert_eq!(found(&copied), vec![(0x555670b75000..0x555670ff5000, 4160)]);
        let swapped = SMAPS.replacen("Swap:                  0 kB", "Swap:                  4 kB", 1);
        assert_eq!(found(&swapped), vec![(0x555670b75000..0x555670ff5000, 4160)]);
        let locked = SMAPS.replacen("VmFlags: rd ex mr mw me sd", "VmFlags: rd ex mr mw me lo sd", 1);
        assert_eq!(found(&locked), vec![(0x555670a5a000..0x555670b75000, 472)]);
    }

    #[test]
    fn another_path_no_segments_or_unreadable_text_drops_nothing() {
        assert!(droppable(SMAPS, Path::new("/usr/bin/cordon"), &segments(), 4096).is_empty());
        assert!(droppable(SMAPS, Path::new(EXE), &[], 4096).is_empty());
        assert!(found("garbage\nRss: 4 kB\nAnonymous: 0 kB\nVmFlags: rd\n").is_empty());
        // Without its Swap line, a mapping's copies are not known to be none.
        let no_swap = SMAPS.replacen("Swap:                  0 kB\n", "", 1);
        assert_eq!(found(&no_swap), vec![(0x555670b75000..0x555670ff5000, 4160)]);
        // A mapping whose last line never comes (a truncated read) is not dropped.
        let truncated = "555670b75000-555670ff5000 r-xp 0011a000 fe:00 5799959 /usr/local/bin/cordon\nRss: 4160 kB\nAnonymous: 0 kB\n";
        assert!(found(truncated).is_empty());
    }

    #[test]
    fn a_mapping_sharing_a_page_with_a_writable_segment_is_kept() {
        // The code segment's last page is also the data segment's first.
        let mut overlapping = segments();
        overlapping[2].range.start = 0x555670ff4b00;
        let found = droppable(SMAPS, Path::new(EXE), &overlapping, 4096);
        assert_eq!(found, vec![(0x555670a5a000..0x555670b75000, 472)]);
    }

    #[test]
    fn the_running_binary_has_code_to_give_back_and_never_its_writable_segments() {
        let segments = executable_segments();
        assert!(segments.iter().any(|s| s.writable) && segments.iter().any(|s| !s.writable), "{segments:x?}");
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let found = droppable(&std::fs::read_to_string("/proc/self/smaps").unwrap(), &exe, &segments, 4096);
        assert!(!found.is_empty(), "no mapping of {exe:?} found droppable");
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        for (range, _) in &found {
            let line = maps.lines().find(|l| l.starts_with(&format!("{:x}-", range.start))).unwrap();
            assert!(!line.split_whitespace().nth(1).unwrap().contains('w'), "{line}");
            assert!(
                segments
                    .iter()
                    .filter(|s| s.writable)
                    .all(|w| range.end <= w.range.start || w.range.end <= range.start)
            );
        }
    }

    #[test]
    fn released_code_stops_counting_and_still_runs() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let segments = executable_segments();
        let resident = || {
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            droppable(&smaps, &exe, &segments, 4096).iter().map(|(_, kib)| kib).sum::<u64>()
        };
        let before = resident();
        let released = release_own_code().unwrap();
        assert!(released.mappings >= 1 && released.kib > 0, "{released:?}");
        // Reading smaps again runs the same code as before the release, faulted back in.
        let after = resident();
        assert!(after < before, "resident code {before} KiB before, {after} KiB after");
    }
}
