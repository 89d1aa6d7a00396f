//! Bytes through a local forward: `vtun forward VM -L` vs `ssh -N -L` with the `openssl
//! s_client` ProxyCommand, on the test bed, in the same run, taking turns. A server on the VM
//! side (loopback: the bed's VM is this machine) sends N MiB to each connection that asks with
//! `D` and the size, or reads what one that sends `U` uploads and answers with the count; the client connects to
//! the forward's local port and times that one connection. Prints MB/s per run, the medians, the
//! ratio, and the forwarder process's CPU seconds (from /proc).
//!
//! Run: `cargo bench --bench forward_throughput` (VTUN_BENCH_MB sets the size, default 256;
//! VTUN_BENCH_RUNS the repetitions, default 3; VTUN_BENCH_DELAY_MS the gateway's one-way delay,
//! default 10, i.e. 20 ms RTT; VTUN_BENCH_DIRECTION=up sends the bytes from the client).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use support::*;

const CHUNK: usize = 256 * 1024;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The VM-side server: `D` and a big-endian u64 N → N bytes then close; `U` → read to EOF,
/// answer the count.
fn server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || serve(c));
        }
    });
    port
}

fn serve(mut c: TcpStream) {
    let mut cmd = [0u8; 9];
    if c.read_exact(&mut cmd).is_err() {
        return; // a readiness probe
    }
    let bytes = u64::from_be_bytes(cmd[1..].try_into().unwrap());
    let mut buf = vec![0u8; CHUNK];
    match cmd[0] {
        b'D' => {
            let mut left = bytes;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
                left -= n as u64;
            }
        }
        b'U' => {
            let mut got = 0u64;
            loop {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n as u64,
                }
            }
            let _ = c.write_all(&got.to_be_bytes());
        }
        _ => {}
    }
}

/// One timed transfer through the forward at `port`.
fn transfer(port: u16, bytes: u64, up: bool) -> f64 {
    let start = Instant::now();
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_nodelay(true).unwrap();
    let mut buf = vec![0u8; CHUNK];
    if up {
        c.write_all(&[b'U', 0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            c.write_all(&buf[..n]).unwrap();
            left -= n as u64;
        }
        c.shutdown(Shutdown::Write).unwrap();
        let mut count = [0u8; 8];
        c.read_exact(&mut count).unwrap();
        assert_eq!(u64::from_be_bytes(count), bytes, "upload arrived whole");
    } else {
        c.write_all(&[&[b'D'][..], &bytes.to_be_bytes()].concat())
            .unwrap();
        let mut got = 0u64;
        loop {
            match c.read(&mut buf).unwrap() {
                0 => break,
                n => got += n as u64,
            }
        }
        assert_eq!(got, bytes, "download arrived whole");
    }
    start.elapsed().as_secs_f64()
}

/// utime + stime of `pid` in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = read(std::path::Path::new(&format!("/proc/{pid}/stat")));
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat; `rest` starts at field 3.
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf takes no memory.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(port: u16, what: &str, child: &Spawned) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what} never listened: {}",
            child.stderr_so_far()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let mb = env_num("VTUN_BENCH_MB", 256);
    let runs = env_num("VTUN_BENCH_RUNS", 3) as usize;
    let delay = env_num("VTUN_BENCH_DELAY_MS", 10);
    let up = std::env::var("VTUN_BENCH_DIRECTION").is_ok_and(|d| d == "up");
    let bytes = mb << 20;
    let bed = TestBed::builder().vm("a").delay_ms(delay).start();
    let target = server();

    let vtun_spec = format!("0:127.0.0.1:{target}");
    let mut vtun_cmd = bed.vtun();
    vtun_cmd.args(["forward", "a", "-L", &vtun_spec]);
    let mut vtun = Spawned::start(&mut vtun_cmd);
    let needle = format!("-L {vtun_spec}: listening on 127.0.0.1:");
    vtun.wait_for_stderr(&needle, Duration::from_secs(30));
    let err = vtun.stderr_so_far();
    let at = err.find(&needle).unwrap() + needle.len();
    let vtun_port: u16 = err[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap();

    let ssh_port = free_port();
    let ssh_spec = format!("{ssh_port}:127.0.0.1:{target}");
    let mut ssh_cmd = bed.command("ssh");
    ssh_cmd
        .args(bed.ssh_options_with(&bed.openssl_proxy_command()))
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L", &ssh_spec])
        .arg("a.vm.test");
    let ssh = Spawned::start(&mut ssh_cmd);
    wait_listening(ssh_port, "ssh -L", &ssh);

    let way = if up { "upload" } else { "download" };
    println!(
        "forward throughput: {mb} MiB {way} over one TCP connection through a local forward to a \
         server on the VM's loopback,"
    );
    println!(
        "real sshd behind vtun gateway on loopback, one-way delay {delay} ms ({} ms RTT), median \
         of {runs}, taking turns",
        delay * 2
    );
    println!("  vtun: vtun forward a -L {vtun_spec}");
    println!(
        "  ssh:  ssh -N -L {ssh_spec} -o ProxyCommand='{}' a.vm.test",
        bed.openssl_proxy_command()
    );
    // Warm up both (window growth is per connection, but page cache and the forwarders' first
    // channel are not).
    transfer(vtun_port, 8 << 20, up);
    let _ = transfer(ssh_port, 8 << 20, up);
    let forwarders = [
        ("vtun forward", vtun_port, vtun.id()),
        ("ssh -L", ssh_port, ssh.id()),
    ];
    let mut secs: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut cpu: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut ratios = Vec::new();
    println!();
    for r in 0..runs {
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (_, port, pid) = forwarders[i];
            let before = cpu_secs(pid);
            secs[i].push(transfer(port, bytes, up));
            cpu[i].push(cpu_secs(pid) - before);
        }
        ratios.push(secs[1][r] / secs[0][r]);
        println!(
            "run {}: vtun {:.0} MB/s ({:.2} CPU s), ssh {:.0} MB/s ({:.2} CPU s): {:.2}x",
            r + 1,
            mb as f64 / secs[0][r],
            cpu[0][r],
            mb as f64 / secs[1][r],
            cpu[1][r],
            secs[1][r] / secs[0][r]
        );
    }
    println!();
    println!("| forwarder | MB/s | forwarder CPU s |");
    println!("|---|---:|---:|");
    let mut rates = Vec::new();
    for (i, (name, _, _)) in forwarders.iter().enumerate() {
        let rate = mb as f64 / median(secs[i].clone());
        rates.push(rate);
        println!("| {name} | {rate:.0} | {:.2} |", median(cpu[i].clone()));
    }
    println!();
    println!(
        "ratio vtun/ssh throughput: {:.2}x (median of the per-run ratios: {:.2}x)",
        rates[0] / rates[1],
        median(ratios)
    );
    drop(vtun);
    drop(ssh);
}
