//! A reader of vtun's stdout that goes away (`vtun ssh-config | true`, `vtun cp --json … | head
//! -c0`) is a quiet exit 0, never a panic, for every command that prints.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

/// Run `cmd` with stdout a pipe whose reading end is already closed.
fn with_closed_stdout(cmd: &mut Command) -> (i32, String) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe() fills two new descriptors; the read end is closed at once, the write end
    // is owned by the OwnedFd from here on.
    let w = unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        libc::close(fds[0]);
        std::os::fd::OwnedFd::from_raw_fd(fds[1])
    };
    cmd.stdout(w).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stderr = String::new();
    {
        // A hung child is killed, which ends the read, and the test fails on its status.
        let _watchdog = Watchdog::new(&child, Duration::from_secs(60));
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    }
    let status = child.wait().unwrap();
    (status.code().unwrap_or(-1), stderr)
}

fn bare() -> Command {
    let mut cmd = Command::new(vtun_bin());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null());
    cmd
}

#[test]
fn ssh_config_completions_and_agent_probe_exit_quietly_when_stdout_is_closed() {
    for args in [&["ssh-config"][..], &["completions", "bash"][..]] {
        let (code, stderr) = with_closed_stdout(bare().args(args));
        assert_eq!((code, stderr.as_str()), (0, ""), "vtun {args:?}");
    }
    let (code, stderr) = with_closed_stdout(bare().arg("agent").env("VTUN_AGENT_PROBE", "1"));
    assert_eq!((code, stderr.as_str()), (0, ""), "agent probe");
}

#[test]
fn cp_json_and_bench_exit_quietly_when_stdout_is_closed() {
    let bed = TestBed::start();
    let src = bed.dir("src");
    std::fs::write(src.join("f"), random_bytes(100_000, 1)).unwrap();
    let dst = bed.vm("a").home().join("copied");
    let (code, stderr) = with_closed_stdout(bed.vtun().args([
        "cp",
        "--json",
        src.join("f").to_str().unwrap(),
        &format!("a:{}", dst.display()),
    ]));
    assert_eq!((code, stderr.as_str()), (0, ""), "cp --json");
    assert_eq!(
        hash_file(&dst),
        hash_file(&src.join("f")),
        "the copy itself completed"
    );

    for json in [true, false] {
        let mut cmd = bed.vtun();
        cmd.args(["bench", "--size", "1M", "--parallel", "2", "a"]);
        if json {
            cmd.arg("--json");
        }
        let (code, stderr) = with_closed_stdout(&mut cmd);
        assert_eq!((code, stderr.as_str()), (0, ""), "bench json={json}");
    }
}
