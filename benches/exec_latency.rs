//! Latency of one remote command: `vtun exec VM true` against what people run today,
//! `ssh -o ProxyCommand='openssl s_client …' VM true`, on the same test bed (real sshd behind
//! `vtun gateway`), at 0 ms and 20 ms round trip (gateway `--delay-ms 10`); and with connection
//! reuse on both sides: vtun through its background master against OpenSSH's ControlMaster,
//! one command and a loop of 100.
//!
//! Run: `cargo bench --bench exec_latency` (VTUN_BENCH_RUNS=N for more runs, VTUN_BIN to pick a
//! binary, VTUN_BENCH_LOOP=N for the loop length). Runs alternate between the tools so drift on
//! a shared machine hits all alike. The round-trip count printed is (median at 20 ms − median
//! at 0 ms) / 20 ms. Masters (vtun's and OpenSSH's) are stopped at the end of each bed.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{TestBed, DOMAIN};

fn vtun_cmd(bed: &TestBed) -> Command {
    let mut cmd = bed.vtun();
    cmd.args(["exec", "a", "--", "true"]);
    cmd
}

/// `vtun exec` through a master (its sockets under the bed).
fn vtun_reused_cmd(bed: &TestBed, run: &Path) -> Command {
    let mut cmd = vtun_cmd(bed);
    cmd.env("VTUN_PERSIST", "120").env("XDG_RUNTIME_DIR", run);
    cmd
}

/// `ssh` with ControlMaster=auto on `socket`: the first run becomes the master. `front` goes
/// before the other options (`-O exit` to stop the master).
fn ssh_cm_cmd(bed: &TestBed, socket: &Path, front: &[&str]) -> Command {
    let args: Vec<_> = ssh_cmd(bed).get_args().map(|a| a.to_owned()).collect();
    let mut cmd = bed.command("ssh");
    cmd.args(front)
        .args(["-o", "ControlMaster=auto", "-o", "ControlPersist=120", "-o"])
        .arg(format!("ControlPath={}", socket.display()))
        .args(args);
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

fn row(name: &str, m: &[Duration]) {
    println!("| {name} | {:.1} | {:.1} |", ms(m[0]), ms(m[1]));
}

fn main() {
    let runs: usize = std::env::var("VTUN_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11);
    let loop_len: usize = std::env::var("VTUN_BENCH_LOOP")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    println!(
        "exec latency: `vtun exec a -- true` vs `ssh a true` (ProxyCommand openssl s_client),"
    );
    println!("fresh and reused (vtun's background master vs OpenSSH ControlMaster)");
    println!(
        "test bed: OpenSSH sshd behind `vtun gateway` on loopback; median of {runs} runs each, \
         alternating; loops of {loop_len} sequential commands"
    );
    println!("vtun: {}", support::vtun_bin().display());
    println!();
    let (mut fresh, mut ssh, mut reused, mut cm) = (vec![], vec![], vec![], vec![]);
    let (mut reused_loop, mut cm_loop, mut starting) = (vec![], vec![], vec![]);
    for delay in [0u64, 10] {
        let bed = TestBed::builder().vm("a").delay_ms(delay).start();
        let run = bed.dir("run");
        let cm_socket = bed.dir("cm").join("s");
        // Warm up: pin host keys for both clients, start both masters.
        time(vtun_cmd(&bed));
        time(ssh_cmd(&bed));
        time(vtun_reused_cmd(&bed, &run));
        time(ssh_cm_cmd(&bed, &cm_socket, &[]));
        let (mut f, mut s, mut r, mut c) = (vec![], vec![], vec![], vec![]);
        // The first command with masters on (the default): it starts one, then uses it.
        let mut first = vec![];
        let stop = |bed: &TestBed| {
            let mut stop = bed.vtun();
            let _ = stop
                .env("XDG_RUNTIME_DIR", &run)
                .args(["master", "stop"])
                .output();
        };
        for _ in 0..runs {
            stop(&bed);
            first.push(time(vtun_reused_cmd(&bed, &run)));
        }
        for _ in 0..runs {
            f.push(time(vtun_cmd(&bed)));
            s.push(time(ssh_cmd(&bed)));
            r.push(time(vtun_reused_cmd(&bed, &run)));
            c.push(time(ssh_cm_cmd(&bed, &cm_socket, &[])));
        }
        let timed_loop = |mk: &dyn Fn() -> Command| {
            let start = Instant::now();
            for _ in 0..loop_len {
                time(mk());
            }
            start.elapsed()
        };
        let rl = timed_loop(&|| vtun_reused_cmd(&bed, &run));
        let cl = timed_loop(&|| ssh_cm_cmd(&bed, &cm_socket, &[]));
        fresh.push(median(f));
        starting.push(median(first));
        ssh.push(median(s));
        reused.push(median(r));
        cm.push(median(c));
        reused_loop.push(rl);
        cm_loop.push(cl);
        // Stop both masters.
        stop(&bed);
        let _ = ssh_cm_cmd(&bed, &cm_socket, &["-O", "exit"]).output();
    }
    println!("| median (ms) | 0 ms RTT | 20 ms RTT |");
    println!("|---|---:|---:|");
    row("vtun exec, fresh connection (--persist 0)", &fresh);
    row("vtun exec, first command (starts a master)", &starting);
    row("ssh + openssl ProxyCommand, fresh", &ssh);
    row("vtun exec, reused (master)", &reused);
    row("ssh, ControlMaster reused", &cm);
    row(
        &format!("{loop_len} × vtun exec reused (total)"),
        &reused_loop,
    );
    row(&format!("{loop_len} × ssh ControlMaster (total)"), &cm_loop);
    println!();
    for (i, rtt) in ["0 ms", "20 ms"].iter().enumerate() {
        println!(
            "{rtt}: reused vtun / ControlMaster {:.2}×; reused / fresh vtun {:.2}×; \
             loop vtun / ControlMaster {:.2}×; fresh vtun / fresh ssh {:.2}×",
            reused[i].as_secs_f64() / cm[i].as_secs_f64(),
            reused[i].as_secs_f64() / fresh[i].as_secs_f64(),
            reused_loop[i].as_secs_f64() / cm_loop[i].as_secs_f64(),
            fresh[i].as_secs_f64() / ssh[i].as_secs_f64(),
        );
    }
    for (tool, m) in [("vtun fresh", &fresh), ("ssh fresh", &ssh)] {
        let extra = ms(m[1]) - ms(m[0]);
        println!(
            "{tool}: round trips ≈ {:.1} (Δ{extra:.0} ms / 20 ms; noisy on a shared machine)",
            extra / 20.0
        );
    }
}
