//! Peak memory of a no-change `vtun sync` of a large tree (local → VM through the test bed):
//! the client's and the agent's maximum resident set size, measured by `/usr/bin/time -v`
//! wrapped around each (the agent through a `VTUN_AGENT_PATH` wrapper script), and the wall
//! time of the re-sync. The tree is built once and synced once before the measured run.
//!
//! Run: `cargo bench --bench sync_rss` (release), or `cargo test --release --bench sync_rss`.
//! Knobs: VTUN_RSS_FILES (default 200000), VTUN_RSS_RUNS (measured re-syncs, default 1),
//! VTUN_BIN (the vtun binary to measure, client and agent; default the one cargo built).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

/// `/usr/bin/time -v`'s "Maximum resident set size (kbytes)" from its output file.
fn max_rss_kb(report: &str) -> Option<u64> {
    report
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Maximum resident set size (kbytes): ")
        })
        .and_then(|v| v.trim().parse().ok())
}

/// A command like `bed.vtun()` (same environment) that runs `program` instead.
fn with_bed_env(bed: &TestBed, program: &str) -> Command {
    let base = bed.vtun();
    let mut cmd = Command::new(program);
    cmd.env_clear();
    for (k, v) in base.get_envs() {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    cmd
}

fn build_tree(root: &Path, files: usize) {
    // 1000 files a directory, a few dozen bytes each: the listing, not the data, is the load.
    for i in 0..files {
        let dir = root.join(format!("d{:04}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&dir).unwrap();
        }
        std::fs::write(
            dir.join(format!("file-{i:07}.txt")),
            format!("content of {i}\n"),
        )
        .unwrap();
    }
}

fn main() {
    let files: usize = std::env::var("VTUN_RSS_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let runs: usize = std::env::var("VTUN_RSS_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let bin = vtun_bin();
    let bed = TestBed::start();
    let src = bed.dir("src");
    let dst = bed.dir("dst");
    let reports = bed.dir("reports");
    // The agent on the VM side, under /usr/bin/time (the discovery probe runs bare).
    let wrapper = bed.dir("agent-bin").join("vtun");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ -n \"$VTUN_AGENT_PROBE\" ]; then exec '{bin}' \"$@\"; fi\n\
             exec /usr/bin/time -v -o '{dir}/agent-'$$.txt '{bin}' \"$@\"\n",
            bin = bin.display(),
            dir = reports.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();

    eprintln!("building a tree of {files} files in {}", src.display());
    let t = Instant::now();
    build_tree(&src, files);
    eprintln!("  built in {:.1} s", t.elapsed().as_secs_f64());
    let sync = |tag: &str| {
        let client_report = reports.join(format!("client-{tag}.txt"));
        let mut cmd = with_bed_env(&bed, "/usr/bin/time");
        cmd.arg("-v")
            .arg("-o")
            .arg(&client_report)
            .arg(&bin)
            .args(["sync", &format!("{}/", src.display())])
            .arg(format!("a:{}/", dst.display()))
            .env("VTUN_AGENT_PATH", &wrapper);
        let t = Instant::now();
        let out = run_with_timeout(&mut cmd, Duration::from_secs(1800));
        let secs = t.elapsed().as_secs_f64();
        assert!(out.status.success(), "sync failed: {}", out.stderr);
        // The agent's report is written when it exits, just after the client does.
        let deadline = Instant::now() + Duration::from_secs(60);
        let agent = loop {
            let found = std::fs::read_dir(&reports)
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("agent-"))
                .filter_map(|e| {
                    std::fs::read_to_string(e.path())
                        .ok()
                        .map(|s| (e.path(), s))
                })
                .find(|(_, s)| s.contains("Exit status"));
            if let Some((path, s)) = found {
                std::fs::rename(&path, reports.join(format!("done-{tag}.txt"))).unwrap();
                break s;
            }
            assert!(Instant::now() < deadline, "no report from the agent");
            std::thread::sleep(Duration::from_millis(50));
        };
        let client = std::fs::read_to_string(&client_report).unwrap();
        (
            secs,
            max_rss_kb(&client).unwrap_or(0),
            max_rss_kb(&agent).unwrap_or(0),
        )
    };
    let (s, c, a) = sync("first");
    eprintln!(
        "first sync: {s:.2} s, client {} MB, agent {} MB",
        c / 1024,
        a / 1024
    );
    let n = std::fs::read_dir(dst.join("d0000")).unwrap().count();
    assert_eq!(n, files.min(1000), "first sync landed");
    println!(
        "vtun {}: no-change re-sync of {files} files, local → VM",
        bin.display()
    );
    // What one listed entry costs before its path's bytes: each side holds whole listings.
    println!(
        "a listing entry is {} bytes plus its path",
        std::mem::size_of::<vtun::sync::listing::Entry>()
    );
    println!("| run | wall s | client max RSS MB | agent max RSS MB |");
    println!("|---|---|---|---|");
    for r in 0..runs {
        let (s, c, a) = sync(&format!("again-{r}"));
        println!(
            "| {} | {s:.2} | {:.1} | {:.1} |",
            r + 1,
            c as f64 / 1024.0,
            a as f64 / 1024.0
        );
    }
}
