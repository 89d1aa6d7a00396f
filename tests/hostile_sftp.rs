//! `vtun cp -r` and `vtun sync --no-agent` against a hostile SFTP server (russh + russh-sftp,
//! reached through the real gateway): names that climb out of the destination, a symlink and a
//! directory under one name, directories without end, 1-byte reads. Each must stop in bounded
//! time with one clear line naming the server and path, and write nothing outside the
//! destination.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::hostile_sftp::{HostileSftp, Scenario, CONTENT};
use support::*;

/// Hostile scenarios must end well within this, on a shared machine, with a debug build.
const LIMIT: Duration = Duration::from_secs(90);

struct Case {
    bed: TestBed,
    _server: HostileSftp,
    _key_dir: tempfile::TempDir,
    _outside_dir: tempfile::TempDir,
    /// Holds the destination and nothing else: anything else here escaped.
    work: PathBuf,
    /// The symlink target the server offers: must stay empty.
    outside: PathBuf,
}

impl Case {
    fn start(scenario: impl FnOnce(&Path) -> Scenario) -> Case {
        let key_dir = tempfile::tempdir().unwrap();
        let key = key_dir.path().join("host_key");
        keygen(&key, "ed25519");
        let outside_dir = tempfile::tempdir().unwrap();
        let scenario = scenario(outside_dir.path());
        let server = HostileSftp::start(scenario, &key);
        let bed = TestBed::builder()
            .route(&format!("evil.{DOMAIN}=127.0.0.1:{}", server.port()))
            .start();
        let work = bed.dir("work");
        Case {
            bed,
            _server: server,
            _key_dir: key_dir,
            outside: outside_dir.path().to_path_buf(),
            _outside_dir: outside_dir,
            work,
        }
    }

    fn dest(&self) -> PathBuf {
        self.work.join("out")
    }

    fn cp(&self) -> (Out, Duration) {
        let t = Instant::now();
        let out = run_with_timeout(
            self.bed
                .vtun()
                .args(["cp", "-r", "evil:/d"])
                .arg(self.dest()),
            LIMIT,
        );
        (out, t.elapsed())
    }

    fn sync(&self) -> (Out, Duration) {
        let t = Instant::now();
        let dest = format!("{}/", self.dest().display());
        let out = run_with_timeout(
            self.bed
                .vtun()
                .args(["sync", "--no-agent", "evil:/d/", &dest]),
            LIMIT,
        );
        (out, t.elapsed())
    }

    /// Nothing landed beside the destination, in the link target, or at an absolute path the
    /// server named; no `..` or `pwned` entry exists anywhere under the work dir.
    fn assert_contained(&self) {
        for e in std::fs::read_dir(&self.work).unwrap() {
            let name = e.unwrap().file_name();
            assert_eq!(name, "out", "an entry appeared beside the destination");
        }
        assert_eq!(
            std::fs::read_dir(&self.outside).unwrap().count(),
            0,
            "something was written through the symlink"
        );
        assert!(!Path::new("/abs").exists(), "an absolute name was written");
        let mut stack = vec![self.work.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let name = e.file_name();
                assert!(
                    name != "pwned" && name != "..",
                    "{:?} was written",
                    e.path()
                );
                let ft = e.file_type().unwrap();
                if ft.is_dir() {
                    stack.push(e.path());
                }
            }
        }
    }
}

/// Exit status nonzero, and stderr is one line containing every one of `words`.
#[track_caller]
fn assert_one_line_failure(out: &Out, words: &[&str]) {
    assert_ne!(out.code(), 0, "expected failure; stderr: {}", out.stderr);
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one stderr line, got:\n{}",
        out.stderr
    );
    for w in words {
        assert!(lines[0].contains(w), "{w:?} missing from {:?}", lines[0]);
    }
}

fn link_then_file(outside: &Path) -> Scenario {
    Scenario::LinkThenFile {
        target: outside.display().to_string(),
    }
}

#[test]
fn cp_refuses_an_absolute_name_in_a_listing() {
    let c = Case::start(|_| Scenario::Absolute);
    let (out, _) = c.cp();
    assert_one_line_failure(
        &out,
        &["evil.vm.test:/d", "refusing unsafe name", "/abs/pwned"],
    );
    c.assert_contained();
}

#[test]
fn sync_refuses_an_absolute_name_in_a_listing() {
    let c = Case::start(|_| Scenario::Absolute);
    let (out, _) = c.sync();
    assert_one_line_failure(
        &out,
        &["evil.vm.test:/d", "refusing unsafe name", "/abs/pwned"],
    );
    c.assert_contained();
}

#[test]
fn cp_refuses_a_name_with_a_slash_in_a_listing() {
    let c = Case::start(|_| Scenario::Slash);
    let (out, _) = c.cp();
    assert_one_line_failure(
        &out,
        &["evil.vm.test:/d", "refusing unsafe name", "sub/pwned"],
    );
    c.assert_contained();
}

#[test]
fn sync_refuses_a_name_with_a_slash_in_a_listing() {
    let c = Case::start(|_| Scenario::Slash);
    let (out, _) = c.sync();
    assert_one_line_failure(
        &out,
        &["evil.vm.test:/d", "refusing unsafe name", "sub/pwned"],
    );
    c.assert_contained();
}

#[test]
fn cp_ignores_dot_dot_served_as_a_file() {
    let c = Case::start(|_| Scenario::DotDot);
    let (out, _) = c.cp();
    out.assert_ok();
    c.assert_contained();
    let names: Vec<_> = std::fs::read_dir(c.dest())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["ok.txt"]);
    assert_eq!(std::fs::read(c.dest().join("ok.txt")).unwrap(), CONTENT);
}

#[test]
fn sync_ignores_dot_dot_served_as_a_file() {
    let c = Case::start(|_| Scenario::DotDot);
    let (out, _) = c.sync();
    out.assert_ok();
    c.assert_contained();
    let names: Vec<_> = std::fs::read_dir(c.dest())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["ok.txt"]);
    assert_eq!(std::fs::read(c.dest().join("ok.txt")).unwrap(), CONTENT);
}

#[test]
fn cp_refuses_a_symlink_and_a_directory_under_one_name() {
    let c = Case::start(link_then_file);
    let (out, _) = c.cp();
    assert_one_line_failure(&out, &["evil.vm.test:/d", "twice"]);
    c.assert_contained();
}

#[test]
fn sync_refuses_a_symlink_and_a_directory_under_one_name() {
    let c = Case::start(link_then_file);
    let (out, _) = c.sync();
    assert_one_line_failure(&out, &["evil.vm.test:/d", "twice"]);
    c.assert_contained();
}

#[test]
fn cp_stops_a_directory_listing_without_end() {
    let c = Case::start(|_| Scenario::EndlessEntries);
    let (out, took) = c.cp();
    assert_one_line_failure(&out, &["evil.vm.test:/d", "more than", "entries"]);
    c.assert_contained();
    eprintln!("endless listing refused after {took:?}");
}

#[test]
fn sync_stops_a_directory_listing_without_end() {
    let c = Case::start(|_| Scenario::EndlessEntries);
    let (out, _) = c.sync();
    assert_one_line_failure(&out, &["evil.vm.test:/d", "more than", "entries"]);
    c.assert_contained();
}

#[test]
fn cp_stops_empty_listing_replies_without_end() {
    let c = Case::start(|_| Scenario::EndlessEmpty);
    let (out, _) = c.cp();
    assert_one_line_failure(&out, &["evil.vm.test:/d", "empty directory listings"]);
    c.assert_contained();
}

#[test]
fn cp_stops_a_tree_without_bottom() {
    let c = Case::start(|_| Scenario::EndlessDepth);
    let (out, took) = c.cp();
    assert_one_line_failure(&out, &["evil.vm.test:/d/:", "deeper than 1024 levels"]);
    c.assert_contained();
    eprintln!("bottomless tree refused after {took:?}");
}

#[test]
fn sync_stops_a_tree_without_bottom() {
    let c = Case::start(|_| Scenario::EndlessDepth);
    let (out, _) = c.sync();
    assert_one_line_failure(&out, &["evil.vm.test:/d/:", "deeper than 1024 levels"]);
    c.assert_contained();
}

#[test]
fn cp_refuses_a_server_that_answers_one_byte_per_read() {
    let c = Case::start(|_| Scenario::OneByteReads);
    let (out, took) = c.cp();
    assert_one_line_failure(&out, &["evil.vm.test:/d/big", "returns 1-byte reads"]);
    c.assert_contained();
    assert!(!c.dest().join("big").exists(), "a partial file was left");
    assert_eq!(std::fs::read(c.dest().join("ok.txt")).unwrap(), CONTENT);
    eprintln!("1-byte reads refused after {took:?}");
}

/// Sync reports a file it cannot read as one failed entry, completes the others and says the
/// run was partial: two lines.
#[test]
fn sync_refuses_a_server_that_answers_one_byte_per_read() {
    let c = Case::start(|_| Scenario::OneByteReads);
    let (out, _) = c.sync();
    assert_ne!(out.code(), 0, "stderr: {}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "stderr: {}", out.stderr);
    assert!(
        lines[0].contains("big: evil.vm.test:/d/big: sftp server returns 1-byte reads"),
        "stderr: {}",
        out.stderr
    );
    assert!(
        lines[1].contains("1 entries could not be synced"),
        "{}",
        lines[1]
    );
    c.assert_contained();
    assert!(!c.dest().join("big").exists(), "a partial file was left");
    assert_eq!(std::fs::read(c.dest().join("ok.txt")).unwrap(), CONTENT);
}
