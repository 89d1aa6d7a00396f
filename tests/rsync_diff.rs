//! Differential test: `vtun sync --delete` against `rsync -a --delete` on random trees.
//!
//! Each seed grows a random source tree (files, empty directories, symlinks, odd modes, old,
//! future and sub-second mtimes, names with newlines, spaces, globs, unicode and up to
//! [`NAME_MAX`] bytes), then runs several rounds. Each round mutates the source (content, size,
//! mode, mtime, type changes file↔dir↔symlink, deletions), sometimes also both destinations in the
//! same way (so deletes, exclude protection and the quick check meet a destination that drifted),
//! and syncs it twice: `rsync -ai --delete SRC/ RSYNC/` locally and `vtun sync -i --delete`
//! through the test bed, local→VM or VM→local (a VM's files live on this machine, so a VM path is
//! a local directory). Plain, `-c` and `--size-only` rounds, rounds with `--delete-excluded` or
//! without `--delete` and several exclude sets are mixed. Then both must have succeeded or both failed, the two destinations must
//! be identical (type, content hash, mode, mtime, link target, for every entry including
//! directories and the root; file and link mtimes to the nanosecond, as rsync keeps them locally,
//! directory mtimes to the second, see [`digest`]), and when both succeeded their `-i` lines must
//! be the same set.
//!
//! The one non-obvious thing: the generator never consults vtun or rsync, so a seed reproduces
//! a run exactly (`VTUN_DIFF_SEED=N`), apart from the wall-clock mtimes that mutations leave on
//! directories, which both tools copy anyway. Knobs: `VTUN_DIFF_SEEDS=500` runs seeds 1..=500
//! instead of the CI set, `VTUN_DIFF_KEEP_GOING=1` reports every failing seed instead of the
//! first, `VTUN_DIFF_NO_ITEMIZE=1` skips comparing `-i` output, `VTUN_DIFF_NAME_MAX=255` overrides the
//! longest generated name, `VTUN_DIFF_KEEP=DIR` copies a failing seed's trees there,
//! `VTUN_DIFF_NON_UTF8=1` and `VTUN_DIFF_SPECIAL=1` add what vtun knowingly skips.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::*;

/// Longest generated name in bytes: the file system's NAME_MAX (temp names are capped to it, see
/// `fs::temp`).
const NAME_MAX: usize = 255;

/// Seeds each test runs in CI: about 30 s for both directions at once on two busy cores.
const CI_SEEDS: u64 = 16;

const ROUNDS: usize = 4;

/// Exclude sets; each pattern is one that some generated name hits.
const EXCLUDES: &[&[&str]] = &[
    &[],
    &["*.tmp", "/top*"],
    &["**/x*", "d?/"],
    &["dir/***", "[ab]*", "sp ace"],
    &[".git/", "**/deep/**", "*~"],
    &["**/", "q?mark"],
];

const FLAGS: &[&[&str]] = &[&[], &[], &["-c"], &["--size-only"]];

/// xorshift64*: deterministic, no crate needed.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        for _ in 0..4 {
            r.next();
        }
        r
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

fn name_max() -> usize {
    std::env::var("VTUN_DIFF_NAME_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(NAME_MAX)
        .clamp(16, 255)
}

/// `VTUN_DIFF_NON_UTF8=1`: also names that are not UTF-8, which vtun skips with a warning and
/// rsync copies (off: a known limitation of vtun's listings).
fn non_utf8_names() -> bool {
    std::env::var_os("VTUN_DIFF_NON_UTF8").is_some()
}

/// `VTUN_DIFF_SPECIAL=1`: also FIFOs, which `rsync -a` (`-D`) copies and vtun skips with a
/// warning (off: a known limitation).
fn special_files() -> bool {
    std::env::var_os("VTUN_DIFF_SPECIAL").is_some()
}

/// A name for a new entry: ordinary, hitting an exclude set, awkward, or long.
fn name(rng: &mut Rng) -> OsString {
    if non_utf8_names() && rng.chance(5) {
        let mut v = b"latin1-\xe9t\xe9".to_vec();
        v.extend(format!(".{}", rng.below(10)).bytes());
        return OsString::from_vec(v);
    }
    const PLAIN: &[&str] = &[
        "a", "b", "c1", "x.txt", "x1", "top", "top.cfg", "dir", "deep", "d1", "dd", "f.tmp",
        "keep~", ".git", ".hidden", "main.rs", "data.bin", "ab", "ba", "sub",
    ];
    const AWKWARD: &[&str] = &[
        "sp ace",
        "new\nline",
        "tab\there",
        "carriage\rreturn",
        "ünïcødé",
        "名前 with space.txt",
        "crab🦀",
        "-dash",
        "*star",
        "q?mark",
        "[br]acket",
        "back\\slash",
        "  lead",
        "trail ",
        "#hash",
        "'quote\"",
        "..dots",
        "~tilde",
    ];
    let base = match rng.below(10) {
        0..=4 => rng.pick(PLAIN).to_string(),
        5..=7 => rng.pick(AWKWARD).to_string(),
        8 => {
            // Long: a mix of one- and multi-byte characters up to the limit.
            let max = name_max();
            let want = max - rng.below(8) as usize;
            let mut s = String::new();
            while s.len() < want {
                let c = match rng.below(4) {
                    0 => 'é',
                    1 => '字',
                    _ => (b'a' + rng.below(26) as u8) as char,
                };
                if s.len() + c.len_utf8() > want {
                    break;
                }
                s.push(c);
            }
            while s.len() < want {
                s.push('z');
            }
            return OsString::from(s);
        }
        _ => format!("n{}", rng.below(1000)),
    };
    // Sometimes a suffix, so one directory can hold several names from the same pool.
    if rng.chance(30) {
        OsString::from(format!("{base}.{}", rng.below(10)))
    } else {
        OsString::from(base)
    }
}

fn file_mode(rng: &mut Rng) -> u32 {
    *rng.pick(&[
        0o644, 0o644, 0o600, 0o755, 0o640, 0o444, 0o700, 0o4755, 0o2750, 0o000,
    ])
}

fn dir_mode(rng: &mut Rng) -> u32 {
    *rng.pick(&[0o755, 0o755, 0o700, 0o750, 0o1777, 0o2775, 0o711])
}

/// An mtime: old, recent, sub-second, before 1970 or past 2262.
fn mtime(rng: &mut Rng) -> (i64, i64) {
    let secs = match rng.below(20) {
        0 => -(rng.below(1 << 30) as i64),
        1 => 10_413_792_000 + rng.below(1000) as i64,
        2 => 0,
        _ => 1_000_000_000 + rng.below(800_000_000) as i64,
    };
    let nsec = if rng.chance(40) {
        0
    } else {
        rng.below(1_000_000_000) as i64
    };
    (secs, nsec)
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// Set an mtime (and atime) without following a symlink.
fn set_mtime(p: &Path, (secs, nsec): (i64, i64)) {
    let ts = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: nsec as _,
    };
    let times = [ts, ts];
    let c = cpath(p);
    // SAFETY: `c` is a valid NUL-terminated path and `times` two initialised timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(
        rc,
        0,
        "utimensat {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn content(rng: &mut Rng) -> Vec<u8> {
    let n = match rng.below(20) {
        0..=1 => 0,
        2..=9 => rng.below(100),
        10..=16 => 100 + rng.below(5000),
        _ => 5000 + rng.below(70_000),
    };
    rng.bytes(n as usize)
}

fn make_file(rng: &mut Rng, p: &Path) {
    std::fs::write(p, content(rng)).unwrap();
    chmod(p, file_mode(rng));
    set_mtime(p, mtime(rng));
}

fn make_link(rng: &mut Rng, p: &Path) {
    let target: OsString = match rng.below(6) {
        0 => "../x.txt".into(),
        1 => "/nonexistent/abs path".into(),
        2 => "dir/sub".into(),
        3 => ".".into(),
        _ => name(rng),
    };
    std::os::unix::fs::symlink(&target, p).unwrap();
    set_mtime(p, mtime(rng));
}

/// Fill `dir` with up to `budget` new entries, `depth` levels at most.
fn grow(rng: &mut Rng, dir: &Path, depth: u32, budget: &mut u32) {
    let n = rng.below(6);
    for _ in 0..n {
        if *budget == 0 {
            return;
        }
        let p = dir.join(name(rng));
        if p.symlink_metadata().is_ok() {
            continue;
        }
        *budget -= 1;
        match rng.below(10) {
            0..=5 => make_file(rng, &p),
            6..=8 if depth > 0 => {
                std::fs::create_dir(&p).unwrap();
                grow(rng, &p, depth - 1, budget);
                chmod(&p, dir_mode(rng));
                if rng.chance(60) {
                    set_mtime(&p, mtime(rng));
                }
            }
            9 if special_files() => {
                let c = cpath(&p);
                // SAFETY: `c` is a valid NUL-terminated path.
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o640) }, 0, "mkfifo");
                set_mtime(&p, mtime(rng));
            }
            _ => make_link(rng, &p),
        }
    }
}

/// Every entry below `root` (not `root` itself), parents before children.
fn entries(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut items: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        items.sort();
        for p in items {
            let is_dir = p.symlink_metadata().unwrap().is_dir();
            out.push(p.clone());
            if is_dir {
                walk(&p, out);
            }
        }
    }
    walk(root, &mut out);
    out
}

fn remove(p: &Path) {
    let m = p.symlink_metadata().unwrap();
    if m.is_dir() {
        // Modes like 0o000 do not stop root, but keep the walk possible for anyone.
        for e in entries(p).iter().rev() {
            if e.symlink_metadata().unwrap().is_dir() {
                chmod(e, 0o700);
            }
        }
        chmod(p, 0o700);
        std::fs::remove_dir_all(p).unwrap();
    } else {
        std::fs::remove_file(p).unwrap();
    }
}

/// One random change to the tree at `root`.
fn mutate(rng: &mut Rng, root: &Path) {
    let all = entries(root);
    if all.is_empty() || rng.chance(15) {
        let mut budget = 4;
        grow(rng, root, 2, &mut budget);
        return;
    }
    let p = rng.pick(&all).clone();
    let m = p.symlink_metadata().unwrap();
    let ft = m.file_type();
    match rng.below(10) {
        // Type changes: whatever it was becomes a file, a directory or a link.
        0 => {
            remove(&p);
            make_file(rng, &p);
        }
        1 => {
            remove(&p);
            std::fs::create_dir(&p).unwrap();
            let mut budget = 3;
            grow(rng, &p, 1, &mut budget);
        }
        2 => {
            remove(&p);
            make_link(rng, &p);
        }
        3 => remove(&p),
        4 => {
            if ft.is_symlink() {
                set_mtime(&p, mtime(rng));
            } else {
                chmod(
                    &p,
                    if ft.is_dir() {
                        dir_mode(rng)
                    } else {
                        file_mode(rng)
                    },
                );
            }
        }
        5 => set_mtime(&p, mtime(rng)),
        _ if ft.is_file() => {
            let old = (m.mtime(), m.mtime_nsec());
            let mut data = std::fs::read(&p).unwrap();
            match rng.below(4) {
                // Same size, new bytes; half the time the mtime stays, which only -c notices.
                0 if !data.is_empty() => {
                    let i = rng.below(data.len() as u64) as usize;
                    data[i] = data[i].wrapping_add(1 + rng.below(255) as u8);
                }
                1 => {
                    let n = 1 + rng.below(3000) as usize;
                    data.extend(rng.bytes(n));
                }
                2 => data.truncate(rng.below(data.len() as u64 + 1) as usize),
                _ => data = content(rng),
            }
            std::fs::write(&p, &data).unwrap();
            set_mtime(&p, if rng.chance(50) { old } else { mtime(rng) });
        }
        _ if ft.is_dir() => {
            let mut budget = 3;
            grow(rng, &p, 1, &mut budget);
        }
        _ => {
            remove(&p);
            make_link(rng, &p);
        }
    }
}

/// Give every entry under `to` the mtime of the same entry under `from` (the trees have the same
/// shape): drift applied to both destinations leaves wall-clock times that differ by nanoseconds.
fn copy_mtimes(from: &Path, to: &Path) {
    for p in entries(from).iter().rev() {
        let m = p.symlink_metadata().unwrap();
        let rel = p.strip_prefix(from).unwrap();
        set_mtime(&to.join(rel), (m.mtime(), m.mtime_nsec()));
    }
    let m = from.symlink_metadata().unwrap();
    set_mtime(to, (m.mtime(), m.mtime_nsec()));
}

/// What both tools must agree on, by relative path (bytes, so newlines and non-UTF-8 are exact).
fn digest(root: &Path) -> BTreeMap<Vec<u8>, String> {
    let mut out = BTreeMap::new();
    let describe = |p: &Path| {
        let m = p.symlink_metadata().unwrap();
        let t = format!("{}.{:09}", m.mtime(), m.mtime_nsec());
        let mode = m.permissions().mode() & 0o7777;
        if m.file_type().is_symlink() {
            format!("link -> {:?} mtime {t}", std::fs::read_link(p).unwrap())
        } else if m.file_type().is_fifo() {
            format!("fifo {mode:o} mtime {t}")
        } else if m.is_dir() {
            // To the second: rsync restores the mtime of a directory it wrote into only when it
            // differs from the source's to the second (its quick check), so a directory written
            // in the same second as the source's mtime keeps the time of the write.
            format!("dir {mode:o} mtime {}", m.mtime())
        } else {
            let data = std::fs::read(p).unwrap();
            format!(
                "file {mode:o} mtime {t} {} bytes {}",
                data.len(),
                &blake3::hash(&data).to_hex()[..16]
            )
        }
    };
    out.insert(b".".to_vec(), describe(root));
    for p in entries(root) {
        let rel = p
            .strip_prefix(root)
            .unwrap()
            .as_os_str()
            .as_bytes()
            .to_vec();
        out.insert(rel, describe(&p));
    }
    out
}

/// A destination directory the source has no directory for (kept because it holds excluded
/// entries) has the mtime of whenever its contents were last deleted: no tool sets it.
fn without_wall_clock(
    mut d: BTreeMap<Vec<u8>, String>,
    src: &BTreeMap<Vec<u8>, String>,
) -> BTreeMap<Vec<u8>, String> {
    for (k, v) in d.iter_mut() {
        let src_is_dir = src.get(k).is_some_and(|s| s.starts_with("dir "));
        if v.starts_with("dir ") && !src_is_dir {
            if let Some(i) = v.find(" mtime ") {
                v.truncate(i);
            }
        }
    }
    d
}

/// The entries where two digests differ, one line each.
fn differences(
    src: &BTreeMap<Vec<u8>, String>,
    rsync: &BTreeMap<Vec<u8>, String>,
    vtun: &BTreeMap<Vec<u8>, String>,
) -> String {
    let mut lines = Vec::new();
    let keys: std::collections::BTreeSet<&Vec<u8>> = rsync.keys().chain(vtun.keys()).collect();
    for k in keys {
        let (a, b) = (rsync.get(k), vtun.get(k));
        if a != b {
            let absent = "(absent)";
            lines.push(format!(
                "  {:?}: rsync {} | vtun {} | source {}",
                OsStr::from_bytes(k),
                a.map_or(absent, |s| s.as_str()),
                b.map_or(absent, |s| s.as_str()),
                src.get(k).map_or(absent, |s| s.as_str())
            ));
        }
    }
    lines.join("\n")
}

#[derive(Clone, Copy, Debug)]
enum Direction {
    LocalToVm,
    VmToLocal,
}

fn slash(p: &Path) -> String {
    format!("{}/", p.display())
}

/// Run one seed; `Err` carries everything needed to reproduce and read the failure.
fn run_seed(bed: &TestBed, dir: Direction, seed: u64) -> Result<(), String> {
    let mut rng = Rng::new(seed ^ ((dir as u64) << 32));
    let work = bed.dir(&format!("{dir:?}-{seed}"));
    let (src, want, got) = (work.join("src"), work.join("rsync"), work.join("vtun"));
    for d in [&src, &want, &got] {
        std::fs::create_dir_all(d).unwrap();
    }
    let mut budget = 12 + rng.below(30) as u32;
    grow(&mut rng, &src, 3, &mut budget);
    let mut excludes = *rng.pick(EXCLUDES);
    for round in 0..ROUNDS {
        if round > 0 {
            for _ in 0..1 + rng.below(6) {
                mutate(&mut rng, &src);
            }
            // Destination drift, the same in both, so the two still start equal.
            if rng.chance(30) {
                let drift = Rng::new(rng.next());
                mutate(&mut drift.clone(), &want);
                mutate(&mut drift.clone(), &got);
            }
            // Also levels what the comparison ignores (see without_wall_clock), so both tools
            // start from the same destination.
            copy_mtimes(&want, &got);
        }
        if rng.chance(20) {
            excludes = *rng.pick(EXCLUDES);
        }
        let flags = *rng.pick(FLAGS);
        // Mostly --delete; a round without it leaves extras behind and meets type changes that
        // rsync refuses without --force.
        let delete = match rng.below(20) {
            0..=2 => "",
            3..=4 => "--delete-excluded",
            _ => "--delete",
        };
        let case = format!(
            "seed {seed} {dir:?} round {round}: {delete:?} flags {flags:?} excludes {excludes:?} \
             (rerun: VTUN_DIFF_SEED={seed} cargo test --test rsync_diff)"
        );
        let mut args: Vec<String> = Vec::new();
        if !delete.is_empty() {
            args.push(delete.into());
        }
        args.extend(flags.iter().map(|s| s.to_string()));
        for e in excludes {
            args.push("--exclude".into());
            args.push(e.to_string());
        }

        let r = run(Command::new("rsync")
            .arg("-ai")
            .args(&args)
            .arg(slash(&src))
            .arg(slash(&want)));
        let (s, d) = match dir {
            Direction::LocalToVm => (slash(&src), format!("a:{}", slash(&got))),
            Direction::VmToLocal => (format!("a:{}", slash(&src)), slash(&got)),
        };
        let v = run_with_timeout(
            bed.vtun().arg("sync").arg("-i").args(&args).arg(&s).arg(&d),
            Duration::from_secs(120),
        );
        if r.status.success() != v.status.success() {
            return Err(format!(
                "{case}\nrsync exit {} ({}), vtun exit {} ({})",
                r.code(),
                r.stderr.trim(),
                v.code(),
                v.stderr.trim()
            ));
        }
        let source = digest(&src);
        let (a, b) = (
            without_wall_clock(digest(&want), &source),
            without_wall_clock(digest(&got), &source),
        );
        if a != b {
            return Err(format!(
                "{case}\ndestinations differ:\n{}\nrsync: {}{}\nvtun: {}{}",
                differences(&source, &a, &b),
                r.stdout_str(),
                r.stderr.trim(),
                v.stdout_str(),
                v.stderr.trim()
            ));
        }
        // When both went through, they must also say the same (-i), in any order.
        if r.status.success() && std::env::var_os("VTUN_DIFF_NO_ITEMIZE").is_none() {
            // rsync says on stdout what vtun only logs (see itemized_vtun).
            let mut ri = itemized(&r.stdout);
            ri.retain(|l| !l.starts_with("cannot delete non-empty directory: "));
            let vi = itemized_vtun(&v.stdout, &got);
            if ri != vi {
                let only = |a: &[String], b: &[String]| {
                    a.iter()
                        .filter(|l| !b.contains(l))
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("\n    ")
                };
                return Err(format!(
                    "{case}\n-i differs:\n  only rsync:\n    {}\n  only vtun:\n    {}",
                    only(&ri, &vi),
                    only(&vi, &ri)
                ));
            }
        }
    }
    remove(&work);
    Ok(())
}

/// `-i` lines, sorted.
fn itemized(out: &[u8]) -> Vec<String> {
    let mut v: Vec<String> = String::from_utf8_lossy(out)
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// vtun's `-i` lines, less one known difference: vtun itemizes a deletion when it plans it, so a
/// directory that then stays because it holds excluded entries (rsync: "cannot delete non-empty
/// directory") is listed; rsync prints only what it deleted.
fn itemized_vtun(out: &[u8], dst: &Path) -> Vec<String> {
    let kept: std::collections::BTreeSet<String> = entries(dst)
        .iter()
        .filter(|p| p.symlink_metadata().unwrap().is_dir())
        .map(|p| {
            let rel = p.strip_prefix(dst).unwrap().to_string_lossy().to_string();
            format!("*deleting   {}/", rsync_escaped(&rel))
        })
        .collect();
    itemized(out)
        .into_iter()
        .filter(|l| !kept.contains(l))
        .collect()
}

/// rsync's way of printing a name (log.c): control characters but tab, and a `\#ddd` look-alike,
/// as `\#ooo`.
fn rsync_escaped(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::new();
    for (i, c) in s.char_indices() {
        let lookalike = c == '\\'
            && b.get(i + 1) == Some(&b'#')
            && b.get(i + 2..i + 5)
                .is_some_and(|d| d.iter().all(u8::is_ascii_digit));
        if (c < ' ' && c != '\t') || lookalike {
            out.push_str(&format!("\\#{:03o}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

fn seeds() -> Vec<u64> {
    if let Some(one) = std::env::var("VTUN_DIFF_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return vec![one];
    }
    let n = std::env::var("VTUN_DIFF_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CI_SEEDS);
    (1..=n).collect()
}

fn differential(dir: Direction) {
    let bed = TestBed::builder().vm("a").start();
    let keep_going = std::env::var_os("VTUN_DIFF_KEEP_GOING").is_some();
    let seeds = seeds();
    let mut failures = Vec::new();
    for &seed in &seeds {
        let outcome = run_seed(&bed, dir, seed);
        if let Err(e) = outcome {
            if let Some(keep) = std::env::var_os("VTUN_DIFF_KEEP") {
                // For reading a failure: the trees as they were, copied out of the bed.
                let to = Path::new(&keep).join(format!("{dir:?}-{seed}"));
                let from = bed.root.join("work").join(format!("{dir:?}-{seed}"));
                let _ = std::fs::create_dir_all(&to);
                let _ = Command::new("cp").arg("-a").arg(&from).arg(&to).status();
            }
            if !keep_going {
                panic!("{e}");
            }
            eprintln!("FAILED {e}\n");
            failures.push(seed);
        }
    }
    eprintln!(
        "{dir:?}: {} seeds, {} failed {failures:?}",
        seeds.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "failing seeds: {failures:?}");
}

#[test]
fn local_to_vm_matches_rsync() {
    differential(Direction::LocalToVm);
}

#[test]
fn vm_to_local_matches_rsync() {
    differential(Direction::VmToLocal);
}
