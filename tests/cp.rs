//! `vtun cp` through the real gateway and real sshd: bytes identical in every direction, trees,
//! metadata, scp's destination rules, failures that leave nothing truncated, clear errors.
#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use support::*;

/// Every entry under `root` as (relative path, kind, content hash or link target, mode).
fn tree(root: &Path) -> Vec<(String, String, String, u32)> {
    let mut out = Vec::new();
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, String, String, u32)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let mode = md.mode() & 0o777;
            if md.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap().display().to_string();
                out.push((rel, "link".into(), t, 0));
            } else if md.is_dir() {
                out.push((rel, "dir".into(), String::new(), mode));
                walk(root, &p, out);
            } else {
                out.push((rel, "file".into(), hash_file(&p), mode));
            }
        }
    }
    walk(root, root, &mut out);
    out
}

fn cp(bed: &TestBed, args: &[&str]) -> Out {
    run_with_timeout(bed.vtun().arg("cp").args(args), Duration::from_secs(120))
}

fn remote(vm: &str, p: &Path) -> String {
    format!("{vm}:{}", p.display())
}

#[test]
fn upload_download_and_vm_to_vm_are_byte_identical() {
    let bed = TestBed::start();
    let src = bed.dir("src").join("data.bin");
    // Not a multiple of any chunk or range size: the last read is short.
    let data = random_bytes((5 << 20) + 12_345, 10);
    std::fs::write(&src, &data).unwrap();
    let on_a = bed.dir("on-a");
    let on_b = bed.dir("on-b");
    let back = bed.dir("back");

    let out = cp(
        &bed,
        &[
            "--json",
            src.to_str().unwrap(),
            &remote("a", &on_a.join("data.bin")),
        ],
    );
    out.assert_ok();
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["files"], 1);
    assert_eq!(summary["bytes"], (5 << 20) + 12_345);
    assert_eq!(hash_file(&on_a.join("data.bin")), hash(&data));

    cp(
        &bed,
        &[&remote("a", &on_a.join("data.bin")), &remote("b", &on_b)],
    )
    .assert_ok();
    assert_eq!(hash_file(&on_b.join("data.bin")), hash(&data));

    let out = cp(
        &bed,
        &[&remote("b", &on_b.join("data.bin")), back.to_str().unwrap()],
    );
    out.assert_ok();
    assert!(out.stdout.is_empty(), "no --json: stdout stays empty");
    assert_eq!(hash_file(&back.join("data.bin")), hash(&data));
}

#[test]
fn recursive_copy_keeps_links_modes_empty_dirs_and_odd_names() {
    let bed = TestBed::start();
    let src = bed.dir("proj");
    std::fs::create_dir_all(src.join("empty")).unwrap();
    std::fs::create_dir_all(src.join("sub dir/ünï")).unwrap();
    std::fs::write(src.join("sub dir/ünï/cödé ✓.txt"), "unicode\n").unwrap();
    std::fs::write(src.join("zero"), "").unwrap();
    std::fs::write(src.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(src.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(src.join("big"), random_bytes(3 << 20, 5)).unwrap();
    std::os::unix::fs::symlink("run.sh", src.join("link-to-run")).unwrap();
    std::os::unix::fs::symlink("../elsewhere", src.join("dangling")).unwrap();

    let a = bed.dir("a-dst");
    let b = bed.dir("b-dst");
    let back = bed.dir("back");
    cp(&bed, &["-r", src.to_str().unwrap(), &remote("a", &a)]).assert_ok();
    assert_eq!(tree(&a.join("proj")), tree(&src));
    cp(
        &bed,
        &["-r", &remote("a", &a.join("proj")), &remote("b", &b)],
    )
    .assert_ok();
    assert_eq!(tree(&b.join("proj")), tree(&src));
    cp(
        &bed,
        &["-r", &remote("b", &b.join("proj")), back.to_str().unwrap()],
    )
    .assert_ok();
    assert_eq!(tree(&back.join("proj")), tree(&src));
}

#[test]
fn directory_without_r_is_refused() {
    let bed = TestBed::start();
    let src = bed.dir("d");
    let out = cp(&bed, &[src.to_str().unwrap(), &remote("a", &bed.dir("x"))]);
    assert_ne!(out.code(), 0);
    assert!(out.stderr.to_lowercase().contains("-r"), "{}", out.stderr);
}

#[test]
fn large_file_split_across_parallel_ranges() {
    let bed = TestBed::start();
    let src = bed.dir("src").join("big.bin");
    let data = random_bytes(40 << 20, 42);
    std::fs::write(&src, &data).unwrap();
    let dst = bed.dir("dst");
    cp(
        &bed,
        &["--parallel", "4", src.to_str().unwrap(), &remote("a", &dst)],
    )
    .assert_ok();
    assert_eq!(hash_file(&dst.join("big.bin")), hash(&data));
    // More ranges than sshd allows channels per connection (MaxSessions 10): the copy still
    // completes, the extra ranges sharing a channel.
    let back = bed.dir("back");
    cp(
        &bed,
        &[
            "--parallel",
            "16",
            &remote("a", &dst.join("big.bin")),
            back.to_str().unwrap(),
        ],
    )
    .assert_ok();
    assert_eq!(hash_file(&back.join("big.bin")), hash(&data));
}

#[test]
fn preserve_keeps_mtime_and_mode() {
    let bed = TestBed::start();
    let src = bed.dir("src").join("old.txt");
    std::fs::write(&src, "old\n").unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o640)).unwrap();
    let when = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    std::fs::File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .set_modified(when)
        .unwrap();
    let dst = bed.dir("dst");
    cp(&bed, &["-p", src.to_str().unwrap(), &remote("a", &dst)]).assert_ok();
    let md = std::fs::metadata(dst.join("old.txt")).unwrap();
    assert_eq!(md.mtime(), 1_500_000_000);
    assert_eq!(md.mode() & 0o777, 0o640);
}

#[test]
fn several_sources_need_a_directory_destination() {
    let bed = TestBed::start();
    let d = bed.dir("src");
    std::fs::write(d.join("x"), "x").unwrap();
    std::fs::write(d.join("y"), "y").unwrap();
    let dst = bed.dir("dst");
    std::fs::write(dst.join("file"), "f").unwrap();
    let out = cp(
        &bed,
        &[
            d.join("x").to_str().unwrap(),
            d.join("y").to_str().unwrap(),
            &remote("a", &dst.join("file")),
        ],
    );
    assert_ne!(out.code(), 0);
    assert!(out.stderr.contains("not a directory"), "{}", out.stderr);
    assert_eq!(std::fs::read(dst.join("file")).unwrap(), b"f");

    // Into a directory, both land inside it.
    cp(
        &bed,
        &[
            d.join("x").to_str().unwrap(),
            d.join("y").to_str().unwrap(),
            &remote("a", &dst),
        ],
    )
    .assert_ok();
    assert_eq!(std::fs::read(dst.join("x")).unwrap(), b"x");
    assert_eq!(std::fs::read(dst.join("y")).unwrap(), b"y");
}

#[test]
fn connection_cut_mid_file_keeps_old_version_and_resume_finishes() {
    let bed = TestBed::builder().vm("a").fault("a").start();
    let src = bed.dir("src").join("payload.bin");
    let data = random_bytes(48 << 20, 7);
    std::fs::write(&src, &data).unwrap();
    let dst = bed.dir("dst");
    std::fs::write(dst.join("payload.bin"), "previous version\n").unwrap();
    let target = format!("a-fault:{}", dst.display());

    // A plain copy cut mid-file: failure, old version intact.
    bed.fault("a").arm(Fault::CutAfter(16 << 20));
    let out = cp(&bed, &[src.to_str().unwrap(), &target]);
    assert_eq!(
        out.code(),
        255,
        "a cut copy fails like a lost connection: {}",
        out.stderr
    );
    assert!(out.stderr.contains("connection"), "{}", out.stderr);
    assert!(
        out.stderr.contains("a-fault.vm.test"),
        "names the host: {}",
        out.stderr
    );
    assert_eq!(
        std::fs::read(dst.join("payload.bin")).unwrap(),
        b"previous version\n"
    );

    // With --resume the partial is kept when cut, and the next --resume run continues it.
    bed.fault("a").arm(Fault::CutAfter(16 << 20));
    let out = cp(&bed, &["--resume", src.to_str().unwrap(), &target]);
    assert_ne!(out.code(), 0);
    assert_eq!(
        std::fs::read(dst.join("payload.bin")).unwrap(),
        b"previous version\n"
    );
    let partial = dst.join(".payload.bin.vtun.part");
    let kept = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    assert!(kept > 0, "the partial is kept for --resume");

    let mark = bed.log_mark();
    cp(&bed, &["--resume", src.to_str().unwrap(), &target]).assert_ok();
    assert_eq!(hash_file(&dst.join("payload.bin")), hash(&data));
    assert!(!partial.exists(), "the partial became the file");
    let (up, _) = bed.wire_bytes_since(mark);
    assert!(up > 0, "the gateway counted the resumed upload");
    assert!(
        up < (48 << 20) - kept + (4 << 20),
        "resume sent {up} bytes although {kept} were already there"
    );
}

#[test]
fn missing_files_and_unknown_vms_give_clear_errors() {
    let bed = TestBed::start();
    let dst = bed.dir("dst");
    let out = cp(&bed, &["/nonexistent/file", &remote("a", &dst)]);
    assert_eq!(out.code(), 1, "{}", out.stderr);
    assert!(out.stderr.starts_with("vtun: "), "{}", out.stderr);
    assert!(
        out.stderr.to_lowercase().contains("no such file"),
        "{}",
        out.stderr
    );

    let out = cp(
        &bed,
        &[
            &remote("a", Path::new("/nonexistent/remote")),
            dst.to_str().unwrap(),
        ],
    );
    assert_ne!(out.code(), 0);
    assert!(
        out.stderr.to_lowercase().contains("no such file"),
        "{}",
        out.stderr
    );

    let src = bed.dir("src").join("f");
    std::fs::write(&src, "f").unwrap();
    let out = run_with_timeout(
        bed.vtun().args([
            "--wait",
            "0",
            "cp",
            src.to_str().unwrap(),
            "nope.example.org:/tmp/x",
        ]),
        Duration::from_secs(60),
    );
    assert_eq!(out.code(), 255, "{}", out.stderr);
    assert!(out.stderr.contains("nope.example.org"), "{}", out.stderr);
}

#[test]
fn read_only_or_full_destination_fails_without_leftovers() {
    let bed = TestBed::start();
    let src = bed.dir("src").join("too-big.bin");
    std::fs::write(&src, random_bytes(4 << 20, 3)).unwrap();

    // Read-only. Root ignores permission bits (and CI runs as root), so there the destination
    // is a read-only mount, which refuses root too; otherwise a directory without write bits.
    let ro = bed.dir("read-only");
    let _ro = if is_root() {
        Some(Tmpfs::mount(&ro, "ro,size=1m"))
    } else {
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        None
    };
    assert!(
        std::fs::write(ro.join("probe"), b"x").is_err(),
        "the read-only destination takes writes: this case would test nothing"
    );
    let out = cp(&bed, &[src.to_str().unwrap(), &remote("a", &ro)]);
    assert_ne!(out.code(), 0, "stderr: {}", out.stderr);
    let err = out.stderr.to_lowercase();
    assert!(
        err.contains("read-only") || err.contains("permission denied"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&ro).unwrap().count(), 0, "nothing left");

    // Full: a 1 MiB file system.
    assert!(
        is_root(),
        "the full-disk case mounts a small tmpfs, which needs root (CI runs as root)"
    );
    let mnt = bed.dir("small");
    let _full = Tmpfs::mount(&mnt, "size=1m");
    let out = cp(&bed, &[src.to_str().unwrap(), &remote("a", &mnt)]);
    assert_ne!(out.code(), 0);
    let err = out.stderr.to_lowercase();
    assert!(
        err.contains("no space") || err.contains("disk full") || err.contains("full"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&mnt).unwrap().count(),
        0,
        "temp file removed"
    );
}

/// `cp -r` used to write through a symlinked directory it found in the destination, so one run
/// could plant a link that a second run wrote through. A symlink inside the destination is now
/// replaced by what the source has there, as sync and rsync do; nothing lands outside it.
#[test]
fn cp_r_never_writes_through_a_symlink_in_the_destination() {
    let bed = TestBed::start();
    let src = bed.dir("src").join("tree");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::write(src.join("sub/deeper/f"), "data\n").unwrap();
    std::fs::write(src.join("plain"), "plain\n").unwrap();
    let on_a = bed.dir("on-a");
    let back = bed.dir("back");
    let outside = bed.dir("outside");
    for dst in [&on_a, &back] {
        std::fs::create_dir_all(dst.join("tree")).unwrap();
        std::os::unix::fs::symlink(&outside, dst.join("tree/sub")).unwrap();
        std::os::unix::fs::symlink(outside.join("victim"), dst.join("tree/plain")).unwrap();
    }
    cp(&bed, &["-r", src.to_str().unwrap(), &remote("a", &on_a)]).assert_ok();
    cp(
        &bed,
        &[
            "-r",
            &remote("a", &on_a.join("tree")),
            back.to_str().unwrap(),
        ],
    )
    .assert_ok();
    assert!(
        std::fs::read_dir(&outside).unwrap().next().is_none(),
        "wrote through a link"
    );
    for dst in [&on_a, &back] {
        assert_eq!(tree(&dst.join("tree")), tree(&src), "{}", dst.display());
    }
}
