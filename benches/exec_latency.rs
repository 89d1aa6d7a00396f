//! Latency of one remote command: `vtun exec VM true` against what people run today,
//! `ssh -o ProxyCommand='openssl s_client …' VM true`, on the same test bed (real sshd behind
//! `vtun gateway`), at 0 ms and 20 ms round trip (gateway `--delay-ms 10`).
//!
//! Run: `cargo bench --bench exec_latency` (VTUN_BENCH_RUNS=N for more runs, VTUN_BIN to pick a
//! binary). Runs alternate between the two tools so drift on a shared machine hits both alike.
//! The round-trip count printed is (median at 20 ms − median at 0 ms) / 20 ms.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{TestBed, DOMAIN};

fn vtun_cmd(bed: &TestBed) -> Command {
    let mut cmd = bed.vtun();
    cmd.args(["exec", "a", "--", "true"]);
    cmd
}

fn ssh_cmd(bed: &TestBed) -> Command {
    let proxy = format!(
        "openssl s_client -quiet -connect {} -servername %h -verify_hostname %h \
         -verify_return_error -CAfile {}",
        bed.gateway_addr,
        bed.ca_file.display()
    );
    let mut cmd = bed.command("ssh");
    cmd.args(["-F", "/dev/null", "-o"])
        .arg(format!("ProxyCommand={proxy}"))
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            bed.ssh_known_hosts.display()
        ))
        .args([
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "LogLevel=ERROR",
            "-i",
        ])
        .arg(&bed.user_key)
        .args(["-l", &bed.user])
        .arg(format!("a.{DOMAIN}"))
        .arg("true");
    cmd
}

fn time(mut cmd: Command) -> Duration {
    let start = Instant::now();
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run");
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let runs: usize = std::env::var("VTUN_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11);
    println!("exec latency: vtun exec a -- true  vs  ssh (ProxyCommand openssl s_client) a true");
    println!(
        "test bed: OpenSSH sshd behind `vtun gateway` on loopback; median of {runs} runs each"
    );
    println!("vtun: {}", support::vtun_bin().display());
    println!();
    println!("| RTT | vtun exec (ms) | ssh + openssl (ms) | vtun / ssh |");
    println!("|---:|---:|---:|---:|");
    let (mut vtun_medians, mut ssh_medians) = (Vec::new(), Vec::new());
    for delay in [0u64, 10] {
        let bed = TestBed::builder().vm("a").delay_ms(delay).start();
        // Warm up: pin host keys for both clients, fill caches.
        time(vtun_cmd(&bed));
        time(ssh_cmd(&bed));
        let (mut v, mut s) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            v.push(time(vtun_cmd(&bed)));
            s.push(time(ssh_cmd(&bed)));
        }
        let (v, s) = (median(v), median(s));
        vtun_medians.push(v);
        ssh_medians.push(s);
        println!(
            "| {} ms | {:.1} | {:.1} | {:.2}× |",
            delay * 2,
            ms(v),
            ms(s),
            v.as_secs_f64() / s.as_secs_f64()
        );
    }
    println!();
    for (tool, m) in [("vtun", &vtun_medians), ("ssh", &ssh_medians)] {
        let extra = ms(m[1]) - ms(m[0]);
        println!(
            "{tool}: round trips ≈ {:.1} (Δ{extra:.0} ms / 20 ms; noisy on a shared machine)",
            extra / 20.0
        );
    }
}
