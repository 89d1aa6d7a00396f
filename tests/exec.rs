//! `vtun exec` and `vtun ssh` against real sshd behind the gateway: what a user sees (exit codes,
//! stderr lines, bytes) for commands, quoting, PTYs, host keys, auth, boot-wait and keepalive.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const LIMIT: Duration = Duration::from_secs(30);

fn exec(bed: &TestBed, vm: &str, args: &[&str]) -> Out {
    let mut cmd = bed.vtun();
    cmd.args(["exec", vm, "--"]).args(args);
    run_with_timeout(&mut cmd, LIMIT)
}

fn exec_sh(bed: &TestBed, vm: &str, line: &str) -> Out {
    let mut cmd = bed.vtun();
    cmd.args(["exec", vm, "--sh", "--", line]);
    run_with_timeout(&mut cmd, LIMIT)
}

#[test]
fn exit_codes_are_the_remote_ones() {
    let bed = TestBed::builder().vm("a").start();
    let out = exec(&bed, "a", &["true"]);
    out.assert_ok();
    assert!(out.stderr.is_empty(), "quiet on success: {}", out.stderr);
    assert_eq!(exec(&bed, "a", &["false"]).code(), 1);
    assert_eq!(exec(&bed, "a", &["sh", "-c", "exit 7"]).code(), 7);

    let out = exec_sh(&bed, "a", "kill -TERM $$");
    assert_eq!(out.code(), 128 + 15, "stderr: {}", out.stderr);
    assert!(out.stderr.contains("signal TERM"), "{}", out.stderr);
}

#[test]
fn stdout_and_stderr_stay_apart() {
    let bed = TestBed::builder().vm("a").start();
    let out = exec_sh(&bed, "a", "echo out; echo err >&2; echo out2");
    out.assert_ok();
    assert_eq!(out.stdout_str(), "out\nout2\n");
    assert_eq!(out.stderr, "err\n");
}

#[test]
fn arguments_are_quoted_for_the_remote_shell() {
    let bed = TestBed::builder().vm("a").start();
    let args = [
        "a b",
        "it's \"q\"",
        "$HOME",
        "a;b",
        "x\ny",
        "ünïcødé ✓",
        "*",
        "",
    ];
    let mut argv = vec!["printf", "[%s]\\n"];
    argv.extend(args);
    let out = exec(&bed, "a", &argv);
    out.assert_ok();
    let want: String = args.iter().map(|a| format!("[{a}]\n")).collect();
    assert_eq!(out.stdout_str(), want);

    // --sh runs one shell line; --cd and --env apply to it.
    let dir = bed.dir("cd here");
    let mut cmd = bed.vtun();
    cmd.args(["exec", "a", "--sh", "--env", "GREETING=hi there", "--cd"])
        .arg(&dir)
        .args(["--", "echo \"$GREETING\" $(pwd) | tr a-z A-Z"]);
    let out = run_with_timeout(&mut cmd, LIMIT);
    out.assert_ok();
    let want = format!("HI THERE {}\n", dir.display().to_string().to_uppercase());
    assert_eq!(out.stdout_str(), want);
}

#[test]
fn stdin_at_dev_null_is_eof_at_once() {
    let bed = TestBed::builder().vm("a").start();
    let start = Instant::now();
    let out = exec(&bed, "a", &["wc", "-c"]);
    out.assert_ok();
    assert_eq!(out.stdout_str().trim(), "0");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn sixty_four_mib_through_cat_is_byte_identical() {
    let bed = TestBed::builder().vm("a").start();
    let data = random_bytes(64 << 20, 3);
    let input = bed.dir("big").join("in");
    std::fs::write(&input, &data).expect("write");
    let mut cmd = bed.vtun();
    cmd.args(["exec", "a", "--", "cat"])
        .stdin(std::fs::File::open(&input).expect("open"));
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60));
    out.assert_ok();
    assert_eq!(out.stdout.len(), data.len());
    assert_eq!(hash(&out.stdout), hash(&data));
}
