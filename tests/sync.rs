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

/// A 229–255-byte name once failed with "File name too long": the temporary name
/// `.vtun-tmp.NAME.HEX` passed NAME_MAX. Files and symlinks, both directions, agent and SFTP.
#[test]
fn sync_handles_255_byte_names() {
    let bed = TestBed::start();
    let src = bed.dir("src");
    for len in [228, 229, 240, 255] {
        std::fs::write(src.join("f".repeat(len)), format!("{len} bytes of name\n")).unwrap();
    }
    std::os::unix::fs::symlink("target", src.join("l".repeat(255))).unwrap();
    // Multi-byte characters: a shortened temporary name must stay valid UTF-8 to be cleaned.
    std::fs::write(src.join("é".repeat(127)), "accents\n").unwrap();
    let on_a = bed.dir("on-a");
    let sftp = bed.dir("sftp");
    let back = bed.dir("back");
    sync(&bed, &[&slash(&src), &format!("a:{}", slash(&on_a))]).assert_ok();
    sync(
        &bed,
        &["--no-agent", &slash(&src), &format!("a:{}", slash(&sftp))],
    )
    .assert_ok();
    sync(&bed, &[&format!("a:{}", slash(&on_a)), &slash(&back)]).assert_ok();
    for dst in [&on_a, &sftp, &back] {
        assert_eq!(
            digest(dst).keys().collect::<Vec<_>>(),
            digest(&src).keys().collect::<Vec<_>>()
        );
        for (k, (kind, content, _, _)) in digest(&src) {
            assert_eq!(digest(dst)[&k].0, kind, "{k}");
            assert_eq!(digest(dst)[&k].1, content, "{k}");
        }
    }
}

/// Each sync removed every temporary file it found in the destination, including those of
/// another sync still writing there, which then failed. Two syncs into one directory at once
/// must both succeed: here the first is held mid-file while the second runs to completion.
#[test]
fn concurrent_syncs_into_one_directory_both_succeed() {
    let bed = TestBed::builder().vm("a").fault("a").start();
    agent_on_path(&bed, "a");
    let big = bed.dir("big");
    for i in 0..4 {
        std::fs::write(big.join(format!("big{i}")), random_bytes(8 << 20, 100 + i)).unwrap();
    }
    let small = bed.dir("small");
    std::fs::write(small.join("small.txt"), "small\n").unwrap();
    let dst = bed.dir("dst");
    let live_temps = || {
        std::fs::read_dir(&dst).unwrap().any(|e| {
            let name = e.unwrap().file_name();
            name.to_string_lossy().starts_with(".vtun-tmp.")
        })
    };
    bed.fault("a").arm(Fault::StallAfter(12 << 20));
    let out = std::thread::scope(|s| {
        let first = s.spawn(|| sync(&bed, &[&slash(&big), &format!("a-fault:{}", slash(&dst))]));
        // Wait (bounded) until the first sync is held with a file half written.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !(bed.fault("a").fired() && live_temps()) {
            assert!(
                std::time::Instant::now() < deadline,
                "the first sync never stalled"
            );
            assert!(
                !first.is_finished(),
                "the first sync ended before it stalled"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The second sync lists (and cleans) the same directory while the first is writing.
        let second = sync(&bed, &[&slash(&small), &format!("a:{}", slash(&dst))]);
        let kept = live_temps();
        bed.fault("a").release();
        second.assert_ok();
        assert!(kept, "the second sync kept the first one's temporary file");
        first.join().unwrap()
    });
    out.assert_ok();
    for i in 0..4 {
        let name = format!("big{i}");
        assert_eq!(
            hash_file(&dst.join(&name)),
            hash_file(&big.join(&name)),
            "{name}"
        );
    }
    assert_eq!(read(&dst.join("small.txt")), "small\n");
    assert!(!live_temps(), "no temporary file is left");
}

/// One rule for cp and sync: a symlink already inside the destination is replaced, never
/// written through, in both directions, with the agent and over plain SFTP.
#[test]
fn sync_never_writes_through_a_symlink_in_the_destination() {
    let bed = TestBed::start();
    let src = bed.dir("src");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::write(src.join("sub/deeper/f"), "data\n").unwrap();
    std::fs::write(src.join("plain"), "plain\n").unwrap();
    let outside = bed.dir("outside");
    let dsts = [bed.dir("on-a"), bed.dir("sftp"), bed.dir("back")];
    for dst in &dsts {
        std::os::unix::fs::symlink(&outside, dst.join("sub")).unwrap();
        std::os::unix::fs::symlink(outside.join("victim"), dst.join("plain")).unwrap();
    }
    let [on_a, sftp, back] = &dsts;
    sync(&bed, &[&slash(&src), &format!("a:{}", slash(on_a))]).assert_ok();
    sync(
        &bed,
        &["--no-agent", &slash(&src), &format!("a:{}", slash(sftp))],
    )
    .assert_ok();
    sync(&bed, &[&format!("a:{}", slash(on_a)), &slash(back)]).assert_ok();
    assert!(
        std::fs::read_dir(&outside).unwrap().next().is_none(),
        "wrote through a link"
    );
    for dst in &dsts {
        let (got, want) = (digest(dst), digest(&src));
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        for (k, v) in &want {
            assert_eq!(
                (&got[k].0, &got[k].1),
                (&v.0, &v.1),
                "{k} in {}",
                dst.display()
            );
        }
    }
}

/// Leftovers of an interrupted run are removed by the next one: with the agent, any that no
/// writer holds locked; over plain SFTP, which cannot see locks, only those untouched for hours.
#[test]
fn leftover_temps_are_removed_only_when_stale() {
    let bed = TestBed::start();
    let src = bed.dir("src");
    std::fs::write(src.join("f"), "f\n").unwrap();
    let (agent, sftp) = (bed.dir("agent"), bed.dir("sftp"));
    let old = std::time::SystemTime::now() - Duration::from_secs(7 * 3600);
    for dst in [&agent, &sftp] {
        for (name, when) in [
            (".vtun-tmp.f.00000000000000aa", Some(old)),
            (".vtun-tmp.g.00000000000000bb", None),
        ] {
            let p = dst.join(name);
            std::fs::write(&p, "left over\n").unwrap();
            if let Some(t) = when {
                std::fs::File::options()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_modified(t)
                    .unwrap();
            }
        }
    }
    sync(&bed, &[&slash(&src), &format!("a:{}", slash(&agent))]).assert_ok();
    sync(
        &bed,
        &["--no-agent", &slash(&src), &format!("a:{}", slash(&sftp))],
    )
    .assert_ok();
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&agent), ["f"], "nobody holds either lock");
    assert_eq!(
        names(&sftp),
        [".vtun-tmp.g.00000000000000bb", "f"],
        "only the old one goes"
    );
}

/// A source file deleted after the listing and before it is sent: one line on stderr names it,
/// every other file arrives intact, and the exit status is 24 (rsync's "some source files
/// vanished"). Deterministic: with `-i` the client writes the whole plan to stdout before it
/// sends anything, and with far more lines than a pipe holds it waits there, listing done,
/// until the test has deleted the file and reads on.
#[test]
fn file_vanishing_between_listing_and_send_exits_24_and_the_rest_arrive() {
    use std::io::{BufRead, Read};
    use std::process::Stdio;
    let bed = TestBed::start();
    let src = bed.dir("src");
    let long = "n".repeat(150);
    for i in 0..4000 {
        let p = src.join(format!("d{}/{long}-{i}", i % 10));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, format!("file {i}\n")).unwrap();
    }
    std::fs::write(src.join("gone.txt"), random_bytes(1 << 20, 3)).unwrap();
    let dst = bed.dir("dst");
    let mut child = bed
        .vtun()
        .args(["sync", "-i", &slash(&src), &format!("a:{}", slash(&dst))])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut so = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut se = child.stderr.take().unwrap();
    let errs = std::thread::spawn(move || {
        let mut s = String::new();
        se.read_to_string(&mut s).unwrap();
        s
    });
    // Any line: the plan exists, so both listings are done.
    let mut first = String::new();
    so.read_line(&mut first).unwrap();
    assert!(first.ends_with('\n'), "no plan: {first:?}");
    std::fs::remove_file(src.join("gone.txt")).unwrap();
    let rest = std::thread::spawn(move || {
        let mut v = Vec::new();
        so.read_to_end(&mut v).unwrap();
        v
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("sync did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = String::from_utf8(rest.join().unwrap()).unwrap();
    let stderr = errs.join().unwrap();
    assert!(out.contains(">f+++++++++ gone.txt"), "it was in the plan");
    assert_eq!(status.code(), Some(24), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("gone.txt")).collect();
    assert_eq!(
        lines,
        ["vtun: sync: gone.txt: vanished"],
        "stderr: {stderr}"
    );
    assert!(!dst.join("gone.txt").exists());
    assert_eq!(digest(&dst), digest(&src));
}

/// A large source file that another process keeps truncating and extending while it is sent
/// as a delta from the VM: the agent reads it with pread, so it cannot die of SIGBUS as a
/// reader of a map of it can, and it abandons that one file with one line, the other files arrive
/// intact, and the run exits 23 (partial). The file never drops below 32 MiB and changes size
/// every few dozen microseconds, so every read of it overlaps a change.
#[test]
fn file_truncated_while_synced_fails_alone_with_23_not_sigbus() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let bed = TestBed::start();
    let src = bed.dir("src");
    fixture(&src);
    let big = src.join("big");
    std::fs::write(&big, random_bytes(64 << 20, 5)).unwrap();
    let dst = bed.dir("dst");
    // An old copy at the destination, so the file goes as a delta (read by the sender's walk).
    std::fs::write(dst.join("big"), random_bytes(64 << 20, 6)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let stop = stop.clone();
        let f = std::fs::OpenOptions::new().write(true).open(&big).unwrap();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Each size held for a while (repeated calls, not a sleep), so a reader that
                // mapped the file at 64 MiB does touch pages past the end.
                for len in [32 << 20, 64 << 20] {
                    for _ in 0..20 {
                        f.set_len(len).unwrap();
                    }
                }
                n += 1;
            }
            n
        })
    };
    let out = sync(&bed, &[&format!("a:{}", slash(&src)), &slash(&dst)]);
    stop.store(true, Ordering::Relaxed);
    assert!(churn.join().unwrap() > 0);
    assert_eq!(out.status.code(), Some(23), "stderr: {}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().filter(|l| l.contains("big")).collect();
    assert_eq!(
        lines,
        ["vtun: sync: big: changed while being read"],
        "stderr: {}",
        out.stderr
    );
    let (mut want, mut got) = (digest(&src), digest(&dst));
    want.remove("big");
    got.remove("big");
    assert_eq!(got, want);
}

/// A source file over a destination directory that a directory-only rule excludes
/// (`--exclude 'x/'`): rsync decides exclusion by the source's entry, so the directory makes way
/// for the file. Once the excluded directory was invisible to the plan and the file could not land
/// ("Is a directory", exit 23). Agent and SFTP, both directions.
#[test]
fn file_replaces_a_directory_that_only_a_dir_rule_excludes() {
    let bed = TestBed::start();
    let src = bed.dir("src");
    std::fs::write(src.join("x"), "now a file\n").unwrap();
    for (n, how) in [&[][..], &["--no-agent"][..]].iter().enumerate() {
        for to_vm in [true, false] {
            let dst = bed.dir(&format!("dst-{n}-{to_vm}"));
            std::fs::create_dir_all(dst.join("x")).unwrap();
            let (from, to) = if to_vm {
                (slash(&src), format!("a:{}", slash(&dst)))
            } else {
                (format!("a:{}", slash(&src)), slash(&dst))
            };
            let what = format!("{how:?} to_vm={to_vm}");
            // An empty directory is replaced with or without --delete.
            let out = sync(
                &bed,
                &[&["-i", "--exclude", "x/"][..], how, &[&from, &to]].concat(),
            );
            out.assert_ok();
            assert_eq!(changes(&out), [">f+++++++++ x"], "{what}");
            assert_eq!(
                std::fs::read(dst.join("x")).unwrap(),
                b"now a file\n",
                "{what}"
            );

            // A non-empty one only with --delete, which itemizes what goes from inside it.
            std::fs::remove_file(dst.join("x")).unwrap();
            std::fs::create_dir_all(dst.join("x/sub")).unwrap();
            std::fs::write(dst.join("x/sub/inner"), "old\n").unwrap();
            let args = [&["--exclude", "x/"][..], how, &[&from, &to]].concat();
            let out = sync(&bed, &args);
            assert_eq!(out.code(), 23, "{what}: {}", out.stderr);
            assert!(
                dst.join("x/sub/inner").is_file(),
                "{what}: kept without --delete"
            );
            let args = [
                &["-i", "--delete", "--exclude", "x/"][..],
                how,
                &[&from, &to],
            ]
            .concat();
            let out = sync(&bed, &args);
            out.assert_ok();
            assert_eq!(
                changes(&out),
                [
                    "*deleting   x/sub/inner",
                    "*deleting   x/sub/",
                    ">f+++++++++ x"
                ],
                "{what}"
            );
            assert_eq!(
                std::fs::read(dst.join("x")).unwrap(),
                b"now a file\n",
                "{what}"
            );
        }
    }
}

/// Itemized changes, less the root directory's own line (its mtime depends on the test's timing).
fn changes(out: &Out) -> Vec<String> {
    out.stdout_str()
        .lines()
        .filter(|l| !l.ends_with(" ./"))
        .map(str::to_string)
        .collect()
}
