//! Differential test: `vtun sync --delete` against `rsync -a --delete` on random trees.
//!
//! Each seed grows a random source tree (files, empty directories, symlinks, odd modes, old,
//! future and sub-second mtimes, names with newlines, spaces, globs, unicode and up to
//! [`NAME_MAX`] bytes), then runs several rounds. Each round mutates the source (content, size,
//! mode, mtime, type changes file↔dir↔symlink, deletions), sometimes also both destinations in the
//! same way (so deletes, exclude protection and the quick check meet a destination that drifted),
//! and syncs it twice: `rsync -a --delete SRC/ RSYNC/` locally and `vtun sync --delete` through
//! the test bed, local→VM or VM→local (a VM's files live on this machine, so a VM path is a local
//! directory). Plain, `-c` and `--size-only` rounds and several exclude sets are mixed. Then the
//! two destinations must be identical: type, content hash, mode, mtime, link target, for every
//! entry including directories and the root. File and link mtimes must match to the nanosecond
//! (rsync keeps them so locally); directory mtimes to the second (see [`digest`]).
//!
//! The one non-obvious thing: the generator never consults vtun or rsync, so a seed reproduces
//! a run exactly (`VTUN_DIFF_SEED=N`), apart from the wall-clock mtimes that mutations leave on
//! directories, which both tools copy anyway. Knobs: `VTUN_DIFF_SEEDS=500` runs seeds 1..=500
//! instead of the CI set, `VTUN_DIFF_KEEP_GOING=1` reports every failing seed instead of the
//! first, `VTUN_DIFF_NAME_MAX=255` overrides the longest generated name, `VTUN_DIFF_KEEP=DIR` copies a
//! failing seed's trees there.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::*;

/// Longest generated name in bytes. 200 until sync's temp names are capped at NAME_MAX (a name of
/// 229–255 bytes makes `.vtun-tmp.NAME.HEX` too long); then 255.
const NAME_MAX: usize = 200;

/// Seeds each test runs in CI: small enough for about 30 s per direction on a busy machine.
const CI_SEEDS: u64 = 6;

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

/// A name for a new entry: ordinary, hitting an exclude set, awkward, or long.
fn name(rng: &mut Rng) -> OsString {
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
                copy_mtimes(&want, &got);
            }
        }
        if rng.chance(20) {
            excludes = *rng.pick(EXCLUDES);
        }
        let flags = *rng.pick(FLAGS);
        let case = format!(
            "seed {seed} {dir:?} round {round}: flags {flags:?} excludes {excludes:?} \
             (rerun: VTUN_DIFF_SEED={seed} cargo test --test rsync_diff)"
        );
        let mut args: Vec<String> = vec!["--delete".into()];
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
    }
    remove(&work);
    Ok(())
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
        if let Err(e) = run_seed(&bed, dir, seed) {
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
