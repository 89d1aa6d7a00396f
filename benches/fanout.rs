//! Fan-out against Debian's pssh (OpenSSH through the openssl ProxyCommand), in one run on the
//! test bed at 20 ms round trip (gateway `--delay-ms 10`): `exec true` on 50 VMs against
//! `parallel-ssh -p 50`, a 10 MiB file pushed to 20 VMs against `parallel-scp -p 20`, and 200
//! VMs with `--fanout 64` (all must succeed; peak RSS from `/usr/bin/time -v`).
//!
//! The VMs are names routed by the gateway onto two sshd, so every VM is its own TLS and SSH
//! connection, as on Vers. Run: `cargo bench --bench fanout` (VTUN_BENCH_RUNS=N, default 5;
//! VTUN_BIN to pick a binary). Runs alternate between the tools.

#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("w{i:03}")).collect()
}

fn timed(cmd: &mut Command) -> (Duration, std::process::Output) {
    let start = Instant::now();
    let out = cmd.stdin(Stdio::null()).output().expect("run");
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (took, out)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// `parallel-ssh`/`parallel-scp` with the bed's OpenSSH options, through openssl s_client.
fn pssh(bed: &TestBed, program: &str, hosts: &std::path::Path, par: usize) -> Command {
    let mut cmd = bed.command(program);
    cmd.arg("-h")
        .arg(hosts)
        .args(["-p", &par.to_string(), "-t", "120"]);
    // `-l` means a bandwidth limit to scp: the user goes in as an option for both tools.
    let mut opts = bed.ssh_options_with(&bed.openssl_proxy_command());
    if let Some(i) = opts.iter().position(|o| o == "-l") {
        opts.drain(i..i + 2);
    }
    opts.extend(["-o".to_string(), format!("User={}", bed.user)]);
    for o in opts {
        cmd.arg("-X").arg(o);
    }
    cmd
}

fn main() {
    let runs: usize = std::env::var("VTUN_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let all = names(200);
    let (odd, even): (Vec<_>, Vec<_>) = all.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let bed = TestBed::builder()
        .vm("a")
        .vm("b")
        .names(odd.into_iter().map(|(_, n)| n.clone()), "a")
        .names(even.into_iter().map(|(_, n)| n.clone()), "b")
        .delay_ms(10)
        .start();
    let lists = bed.dir("lists");
    let hosts_file = |n: usize| {
        let f = lists.join(format!("hosts-{n}"));
        let text: String = names(n).iter().map(|h| format!("{h}.{DOMAIN}\n")).collect();
        std::fs::write(&f, text).unwrap();
        f
    };
    let (h50, h20) = (hosts_file(50), hosts_file(20));
    let list = |n: usize| names(n).join(",");
    println!("fan-out on the test bed at 20 ms RTT; each VM its own TLS + SSH connection");
    println!("vtun: {}; median of {runs} runs each", vtun_bin().display());
    println!();

    // Warm up both clients (host keys pinned for every name) before measuring.
    let vtun_exec = |n: usize| {
        let mut c = bed.vtun();
        c.args(["exec", &list(n), "--", "true"]);
        c
    };
    let pssh_exec = || {
        let mut c = pssh(&bed, "parallel-ssh", &h50, 50);
        c.arg("true");
        c
    };
    timed(&mut vtun_exec(50));
    timed(&mut pssh_exec());
    let (mut v, mut p) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        v.push(timed(&mut vtun_exec(50)).0);
        p.push(timed(&mut pssh_exec()).0);
    }
    let (v, p) = (median(v), median(p));

    let file = bed.dir("payload").join("ten.bin");
    std::fs::write(&file, random_bytes(10 << 20, 1)).unwrap();
    let (to_v, to_p) = (bed.dir("to-vtun"), bed.dir("to-pscp"));
    let vtun_cp = || {
        let mut c = bed.vtun();
        c.args(["cp"])
            .arg(&file)
            .arg(format!("{}:{}/", list(20), to_v.display()));
        c
    };
    let pscp = || {
        let mut c = pssh(&bed, "parallel-scp", &h20, 20);
        c.arg(&file).arg(format!("{}/", to_p.display()));
        c
    };
    timed(&mut vtun_cp());
    timed(&mut pscp());
    let (mut cv, mut cp) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        cv.push(timed(&mut vtun_cp()).0);
        cp.push(timed(&mut pscp()).0);
    }
    let (cv, cp) = (median(cv), median(cp));
    assert_eq!(hash_file(&to_v.join("ten.bin")), hash_file(&file));

    println!("| job | vtun (s) | pssh (s) | vtun / pssh |");
    println!("|---|---:|---:|---:|");
    println!(
        "| `exec true` on 50 VMs (`parallel-ssh -p 50`) | {:.2} | {:.2} | {:.2}× |",
        v.as_secs_f64(),
        p.as_secs_f64(),
        v.as_secs_f64() / p.as_secs_f64()
    );
    println!(
        "| 10 MiB to 20 VMs (`parallel-scp -p 20`) | {:.2} | {:.2} | {:.2}× |",
        cv.as_secs_f64(),
        cp.as_secs_f64(),
        cv.as_secs_f64() / cp.as_secs_f64()
    );

    // 200 VMs, 64 at a time: every one must succeed; peak RSS of the one vtun process.
    let report = lists.join("time-200");
    let mut big = Command::new("/usr/bin/time");
    big.env_clear()
        .arg("-v")
        .arg("-o")
        .arg(&report)
        .arg(vtun_bin());
    for (k, val) in bed.vtun().get_envs() {
        match val {
            Some(val) => big.env(k, val),
            None => big.env_remove(k),
        };
    }
    big.args(["exec", "--fanout", "64", &list(200), "--", "true"]);
    let (took, out) = timed(&mut big);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary = stderr.lines().last().unwrap_or("");
    assert!(summary.ends_with(": 200 ok"), "{summary}");
    let rss_kb: u64 = std::fs::read_to_string(&report)
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Maximum resident set size (kbytes): ")
                .map(str::to_string)
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    println!(
        "| `exec true` on 200 VMs, `--fanout 64` | {:.2} | | all 200 ok, peak RSS {:.0} MB |",
        took.as_secs_f64(),
        rss_kb as f64 / 1024.0
    );
}
