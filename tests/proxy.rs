//! `vtun proxy` as the ProxyCommand of the real OpenSSH clients, through the real gateway.

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn ssh_runs_commands_and_passes_exit_codes() {
    let bed = TestBed::start();
    let out = run(bed.ssh().args(["a.vm.test", "echo hello-from-$((6*7))"]));
    out.assert_ok();
    assert_eq!(out.stdout_str(), "hello-from-42\n");
    assert!(
        out.stderr.is_empty(),
        "proxy must be silent: {}",
        out.stderr
    );

    let out = run(bed.ssh().args(["b.vm.test", "exit 7"]));
    assert_eq!(out.code(), 7, "stderr: {}", out.stderr);
}
