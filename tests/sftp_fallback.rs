//! Sync's agentless SFTP fallback over a slow link: it lists a tree with cp's pipelined walk, so
//! the cost of a listing follows the tree's depth, not its number of directories.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use support::*;

/// One-way delay: a 50 ms round trip.
const DELAY_MS: u64 = 25;

#[test]
fn no_agent_listing_does_not_pay_a_round_trip_per_directory() {
    let bed = TestBed::builder().vm("a").delay_ms(DELAY_MS).start();
    let src = bed.dir("src");
    // 73 directories, 128 files, 64 symlinks, three levels deep.
    for i in 0..8 {
        for j in 0..8 {
            let d = src.join(format!("d{i}/e{j}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("f1"), b"one").unwrap();
            std::fs::write(d.join("f2"), b"two").unwrap();
            std::os::unix::fs::symlink("f1", d.join("link")).unwrap();
        }
    }
    let dst = bed.dir("dst");
    let (from, to) = (
        format!("a:{}/", src.display()),
        format!("{}/", dst.display()),
    );
    let sync = || {
        let mut cmd = bed.vtun();
        cmd.args(["sync", "--no-agent", &from, &to]);
        run_with_timeout(&mut cmd, Duration::from_secs(120))
    };
    sync().assert_ok();
    assert_eq!(std::fs::read(dst.join("d7/e7/f2")).unwrap(), b"two");
    assert_eq!(
        std::fs::read_link(dst.join("d0/e0/link")).unwrap(),
        std::path::Path::new("f1")
    );

    // Listing one directory at a time costs four round trips per directory (OPENDIR, READDIR,
    // READDIR at end of file, CLOSE) and one per symlink: 356 here, 17.8 s at 50 ms, which is
    // what this took before. Walked concurrently it took 1.8 s; 200 round trips is the bound.
    let t = Instant::now();
    sync().assert_ok();
    let took = t.elapsed();
    let bound = Duration::from_millis(200 * 2 * DELAY_MS);
    assert!(
        took < bound,
        "a no-change sync took {took:?} (bound {bound:?})"
    );
}

/// A directory replaced by a file over SFTP: the old tree is removed (one walk), a symlink in it
/// as a link, so what it points at stays.
#[test]
fn no_agent_replacing_a_tree_removes_it_but_not_what_its_links_point_at() {
    let bed = TestBed::builder().vm("a").start();
    let src = bed.dir("src");
    let keep = bed.dir("keep");
    std::fs::write(keep.join("precious"), b"keep me").unwrap();
    std::fs::write(src.join("top"), b"top").unwrap();
    for i in 0..3 {
        let d = src.join(format!("gone/sub{i}/deeper"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("f"), b"f").unwrap();
    }
    std::os::unix::fs::symlink(&keep, src.join("gone/sub0/link")).unwrap();
    let dst = bed.dir("dst");
    let (from, to) = (
        format!("{}/", src.display()),
        format!("a:{}/", dst.display()),
    );
    let sync = |extra: &[&str]| {
        let mut cmd = bed.vtun();
        cmd.args(["sync", "--no-agent"])
            .args(extra)
            .args([&from, &to]);
        run_with_timeout(&mut cmd, Duration::from_secs(120))
    };
    sync(&[]).assert_ok();
    assert!(dst.join("gone/sub2/deeper/f").exists());
    assert!(dst.join("gone/sub0/link").is_symlink());

    std::fs::remove_dir_all(src.join("gone")).unwrap();
    std::fs::write(src.join("gone"), b"now a file").unwrap();
    // As with rsync, a non-empty directory makes way for a file only with --delete.
    let kept = sync(&[]);
    assert_eq!(kept.code(), 23, "stderr: {}", kept.stderr);
    assert!(dst.join("gone/sub2/deeper/f").exists());
    sync(&["--delete"]).assert_ok();
    assert_eq!(std::fs::read(dst.join("gone")).unwrap(), b"now a file");
    assert_eq!(std::fs::read(keep.join("precious")).unwrap(), b"keep me");
}
