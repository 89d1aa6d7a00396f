//! `vtun sync` through the real gateway and real sshd: every direction, the agent found on PATH
//! or uploaded, shell noise in the remote .bashrc, delta transfer measured on the wire, and a cut
//! connection that leaves nothing truncated.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use support::*;

/// Relative path → (kind, content hash or link target, mode, mtime).
fn digest(root: &Path) -> BTreeMap<String, (String, String, u32, i64)> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (String, String, u32, i64)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap().display().to_string();
                out.insert(rel, ("link".into(), t, 0, 0));
            } else if md.is_dir() {
                out.insert(rel, ("dir".into(), String::new(), md.mode() & 0o7777, 0));
                walk(root, &p, out);
            } else {
                out.insert(
                    rel,
                    ("file".into(), hash_file(&p), md.mode() & 0o7777, md.mtime()),
                );
            }
        }
    }
    walk(root, root, &mut out);
    out
}

fn fixture(root: &Path) {
    std::fs::create_dir_all(root.join("src/deep/er")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    std::fs::write(root.join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(root.join("src/deep/er/data.bin"), random_bytes(2 << 20, 9)).unwrap();
    std::fs::write(root.join("zero"), "").unwrap();
    std::fs::write(root.join("名前 with space.txt"), "unicode\n").unwrap();
    std::os::unix::fs::symlink("src/main.rs", root.join("link")).unwrap();
}

fn sync(bed: &TestBed, args: &[&str]) -> Out {
    run_with_timeout(bed.vtun().arg("sync").args(args), Duration::from_secs(120))
}

fn slash(p: &Path) -> String {
    format!("{}/", p.display())
}

#[test]
fn every_direction_through_the_edge_and_reruns_are_no_ops() {
    let bed = TestBed::start();
    let src = bed.dir("src");
    fixture(&src);
    let on_a = bed.dir("on-a");
    let on_b = bed.dir("on-b");
    let back = bed.dir("back");

    sync(&bed, &[&slash(&src), &format!("a:{}", slash(&on_a))]).assert_ok();
    assert_eq!(digest(&on_a), digest(&src));
    let again = sync(&bed, &["-i", &slash(&src), &format!("a:{}", slash(&on_a))]);
    again.assert_ok();
    assert_eq!(again.stdout_str(), "", "a re-run changes nothing");

    sync(
        &bed,
        &[
            &format!("a:{}", slash(&on_a)),
            &format!("b:{}", slash(&on_b)),
        ],
    )
    .assert_ok();
    assert_eq!(digest(&on_b), digest(&src));

    sync(&bed, &[&format!("b:{}", slash(&on_b)), &slash(&back)]).assert_ok();
    assert_eq!(digest(&back), digest(&src));
}

#[test]
fn agent_is_uploaded_once_and_bashrc_noise_is_harmless() {
    let bed = TestBed::start();
    let home = bed.vm("a").home();
    std::fs::write(
        home.join(".bashrc"),
        "echo 'welcome to the box!'\nprintf '\\0\\1garbage'\n",
    )
    .unwrap();
    let src = bed.dir("src");
    fixture(&src);
    let dst = bed.dir("dst");
    let out = sync(&bed, &[&slash(&src), &format!("a:{}", slash(&dst))]);
    out.assert_ok();
    assert_eq!(digest(&dst), digest(&src));
    let cache = home.join(".cache/vtun");
    let agents: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(agents.len(), 1, "one cached agent: {agents:?}");
    assert_eq!(
        hash_file(&cache.join(&agents[0])),
        hash_file(&vtun_bin()),
        "the uploaded agent is this binary"
    );
    // Second run reuses it (no upload notice).
    std::fs::write(src.join("new"), "n").unwrap();
    let out = sync(&bed, &[&slash(&src), &format!("a:{}", slash(&dst))]);
    out.assert_ok();
    assert!(
        !out.stderr.to_lowercase().contains("upload"),
        "{}",
        out.stderr
    );
    assert_eq!(digest(&dst), digest(&src));
}

/// Put this vtun on the PATH of sessions on `vm` (through its .bashrc).
fn agent_on_path(bed: &TestBed, vm: &str) {
    let bin_dir = bed.dir("remote-bin");
    let _ = std::os::unix::fs::symlink(vtun_bin(), bin_dir.join("vtun"));
    let home = bed.vm(vm).home();
    std::fs::write(
        home.join(".bashrc"),
        format!("export PATH={}:$PATH\n", bin_dir.display()),
    )
    .unwrap();
}

#[test]
fn agent_on_remote_path_is_used_without_upload() {
    let bed = TestBed::start();
    agent_on_path(&bed, "a");
    let home = bed.vm("a").home();
    let src = bed.dir("src");
    fixture(&src);
    let dst = bed.dir("dst");
    sync(&bed, &[&slash(&src), &format!("a:{}", slash(&dst))]).assert_ok();
    assert_eq!(digest(&dst), digest(&src));
    assert!(
        !home.join(".cache/vtun").exists(),
        "nothing uploaded when vtun is on PATH"
    );
}

#[test]
fn eight_changed_bytes_in_a_large_file_move_as_a_small_delta() {
    let bed = TestBed::start();
    let src = bed.dir("src");
    let data = random_bytes(16 << 20, 4);
    std::fs::write(src.join("disk.img"), &data).unwrap();
    let dst = bed.dir("dst");
    sync(&bed, &[&slash(&src), &format!("a:{}", slash(&dst))]).assert_ok();

    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(src.join("disk.img"))
        .unwrap();
    f.seek(SeekFrom::Start(8 << 20)).unwrap();
    f.write_all(b"CHANGED!").unwrap();
    drop(f);
    let mark = bed.log_mark();
    let out = sync(&bed, &["-i", &slash(&src), &format!("a:{}", slash(&dst))]);
    out.assert_ok();
    assert!(
        out.stdout_str().contains("disk.img"),
        "{}",
        out.stdout_str()
    );
    let (up, down) = bed.wire_bytes_since(mark);
    let wire = up + down;
    assert!(
        up > 0 && down > 0,
        "the gateway counted the sync ({up} up, {down} down)"
    );
    assert_eq!(
        hash_file(&dst.join("disk.img")),
        hash_file(&src.join("disk.img"))
    );
    assert!(
        wire < 1 << 20,
        "16 MiB file with 8 bytes changed cost {wire} bytes on the wire"
    );
}

#[test]
fn cut_mid_sync_leaves_no_truncated_file_and_rerun_completes() {
    let bed = TestBed::builder().vm("a").fault("a").start();
    agent_on_path(&bed, "a"); // so the cut hits file data, not the agent upload
    let src = bed.dir("src");
    for i in 0..6 {
        std::fs::write(src.join(format!("f{i}")), random_bytes(4 << 20, i)).unwrap();
    }
    let dst = bed.dir("dst");
    for i in 0..6 {
        std::fs::write(dst.join(format!("f{i}")), format!("old {i}\n")).unwrap();
    }
    bed.fault("a").arm(Fault::CutAfter(10 << 20));
    let out = sync(&bed, &[&slash(&src), &format!("a-fault:{}", slash(&dst))]);
    assert!(bed.fault("a").fired(), "the cut fired");
    // Exit 255 with the connection named, whichever write or read noticed the cut first.
    assert_eq!(out.code(), 255, "a cut sync fails: {}", out.stderr);
    assert!(
        out.stderr.contains("connection to a-fault.vm.test lost"),
        "{}",
        out.stderr
    );
    for i in 0..6 {
        let now = std::fs::read(dst.join(format!("f{i}"))).unwrap();
        let old = format!("old {i}\n").into_bytes();
        assert!(
            now == old || hash(&now) == hash_file(&src.join(format!("f{i}"))),
            "f{i} is neither old nor new ({} bytes)",
            now.len()
        );
    }
    sync(&bed, &[&slash(&src), &format!("a-fault:{}", slash(&dst))]).assert_ok();
    assert_eq!(digest(&dst), digest(&src));
}

#[test]
fn agent_upload_agent_on_path_and_no_agent_give_identical_results() {
    let bed = TestBed::start();
    agent_on_path(&bed, "b");
    let src = bed.dir("src");
    fixture(&src);
    let uploaded = bed.dir("uploaded");
    let on_path = bed.dir("on-path");
    let no_agent = bed.dir("no-agent");

    let out = sync(&bed, &[&slash(&src), &format!("a:{}", slash(&uploaded))]);
    out.assert_ok();
    assert!(
        out.stderr.contains("installing the sync agent"),
        "{}",
        out.stderr
    );
    let out = sync(&bed, &[&slash(&src), &format!("b:{}", slash(&on_path))]);
    out.assert_ok();
    assert!(!out.stderr.contains("installing"), "{}", out.stderr);
    let to_no_agent = format!("a:{}", slash(&no_agent));
    sync(&bed, &["--no-agent", &slash(&src), &to_no_agent]).assert_ok();

    let want = digest(&src);
    assert_eq!(digest(&uploaded), want, "agent uploaded");
    assert_eq!(digest(&on_path), want, "agent on PATH");
    assert_eq!(digest(&no_agent), want, "--no-agent");
    let again = sync(&bed, &["-i", "--no-agent", &slash(&src), &to_no_agent]);
    again.assert_ok();
    assert_eq!(
        again.stdout_str(),
        "",
        "a --no-agent re-run changes nothing"
    );
    // SFTP cannot set a link's own mtime, so the link has the time it was made (maybe the
    // source's second, maybe not); the agent sets it, as rsync -a would, and only that.
    let args = ["-i", &slash(&src), &to_no_agent];
    let fix = sync(&bed, &args);
    fix.assert_ok();
    assert!(
        ["", ".L..t...... link -> src/main.rs\n"].contains(&fix.stdout_str().as_str()),
        "{}",
        fix.stdout_str()
    );
    let again = sync(&bed, &args);
    again.assert_ok();
    assert_eq!(again.stdout_str(), "", "an agent re-run changes nothing");
}

/// `touch -d 2300-01-01 f` once arrived as 1901-12-13: one i64 count of nanoseconds overflows.
#[test]
fn mtimes_past_2262_round_trip() {
    let bed = TestBed::start();
    let src = bed.dir("src");
    let f = src.join("future");
    std::fs::write(&f, "from the future\n").unwrap();
    // 2300-01-01T00:00:00Z plus a few nanoseconds, which must survive too.
    let when = std::time::UNIX_EPOCH + Duration::new(10_413_792_000, 123_456_789);
    std::fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(when)
        .unwrap();
    let on_a = bed.dir("on-a");
    let back = bed.dir("back");
    sync(&bed, &[&slash(&src), &format!("a:{}", slash(&on_a))]).assert_ok();
    sync(&bed, &[&format!("a:{}", slash(&on_a)), &slash(&back)]).assert_ok();
    for p in [on_a.join("future"), back.join("future")] {
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(
            (md.mtime(), md.mtime_nsec()),
            (10_413_792_000, 123_456_789),
            "{}",
            p.display()
        );
    }
    let again = sync(&bed, &["-i", &slash(&src), &format!("a:{}", slash(&on_a))]);
    again.assert_ok();
    assert_eq!(again.stdout_str(), "", "a re-run changes nothing");
}
