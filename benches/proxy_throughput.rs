//! Bytes through the ProxyCommand: `vtun proxy` vs `openssl s_client -quiet`, as the
//! ProxyCommand of the same OpenSSH client running `cat > /dev/null` on the test bed, in the same
//! run. Prints MB/s, the ratio, and the proxy's peak RSS and CPU seconds (from /usr/bin/time).
//!
//! The two proxies take turns (vtun, openssl, then openssl, vtun, ...) so that load from anything
//! else on the machine falls on both alike; each pair also gives a ratio of its own.
//!
//! Run: `cargo bench --bench proxy_throughput` (VTUN_BENCH_MB sets the size, default 1024;
//! VTUN_BENCH_RUNS the repetitions, default 3; VTUN_BENCH_DELAY_MS a one-way gateway delay;
//! VTUN_BENCH_DIRECTION=down sends the bytes the other way, `head -c N /dev/zero` on the VM into
//! the client's /dev/null, through the proxy's stdout; VTUN_BENCH_OTHER=CMD compares with
//! ProxyCommand=CMD instead of openssl, e.g. another build of vtun: `/path/to/vtun proxy %h`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::Instant;

use support::*;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Sample {
    secs: f64,
    rss_kb: u64,
    cpu: f64,
}

fn one_run(bed: &TestBed, proxy: &str, mb: u64, down: bool, tag: &str) -> Sample {
    let stats = bed.root.join(format!("{tag}.time"));
    // ssh sends SIGHUP to its ProxyCommand on exit; ignoring it lets /usr/bin/time report.
    let proxy_cmd = format!(
        "sh -c 'trap \"\" HUP; exec /usr/bin/time -f \"%%M %%U %%S\" -o {} {proxy}'",
        stats.display()
    );
    let mut opts = bed.ssh_options();
    let i = opts
        .iter()
        .position(|o| o.starts_with("ProxyCommand="))
        .unwrap();
    opts[i] = format!("ProxyCommand={proxy_cmd}");
    let quoted: Vec<String> = opts
        .iter()
        .map(|o| format!("'{}'", o.replace('\'', r"'\''")))
        .collect();
    let script = if down {
        format!(
            "ssh {} a.vm.test 'head -c {} /dev/zero' > /dev/null",
            quoted.join(" "),
            mb << 20
        )
    } else {
        format!(
            "head -c {} /dev/zero | ssh {} a.vm.test 'cat > /dev/null'",
            mb << 20,
            quoted.join(" ")
        )
    };
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(&script);
    cmd.env("VTUN_CONNECT", bed.gateway_addr.to_string())
        .env("VTUN_CA_FILE", &bed.ca_file)
        .env("VTUN_DOMAIN", DOMAIN)
        .stdin(Stdio::null());
    let start = Instant::now();
    let out = cmd.output().unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{tag} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&stats).unwrap_or_default();
    let last = text.lines().last().unwrap_or("0 0 0").to_string();
    let f: Vec<&str> = last.split_whitespace().collect();
    Sample {
        secs,
        rss_kb: f.first().and_then(|v| v.parse().ok()).unwrap_or(0),
        cpu: f.get(1).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
            + f.get(2).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let mb = env_num("VTUN_BENCH_MB", 1024);
    let runs = env_num("VTUN_BENCH_RUNS", 3) as usize;
    let delay = env_num("VTUN_BENCH_DELAY_MS", 0);
    let down = std::env::var("VTUN_BENCH_DIRECTION").is_ok_and(|d| d == "down");
    let bed = TestBed::builder().vm("a").delay_ms(delay).start();
    let vtun = format!("{} proxy %h", vtun_bin().display());
    // What vtun is compared with: openssl, or VTUN_BENCH_OTHER.
    let (other, other_name, short) = match std::env::var("VTUN_BENCH_OTHER") {
        Ok(cmd) => (cmd, "other", "other"),
        Err(_) => (
            format!(
                "openssl s_client -connect {} -servername %h -quiet -CAfile {}",
                bed.gateway_addr,
                bed.ca_file.display()
            ),
            "openssl s_client",
            "openssl",
        ),
    };
    if down {
        println!("proxy throughput: {mb} MiB of zeros through `ssh a.vm.test 'head -c N /dev/zero' > /dev/null`,");
    } else {
        println!("proxy throughput: {mb} MiB of zeros through `ssh a.vm.test 'cat > /dev/null'`,");
    }
    println!(
        "real sshd behind vtun gateway on loopback, one-way delay {delay} ms, median of {runs}, taking turns"
    );
    println!("  vtun:    ProxyCommand={vtun}");
    println!("  {:8} ProxyCommand={other}", format!("{short}:"));
    // Warm up both (host key pinning, page cache).
    one_run(&bed, &vtun, 8, down, "warm-vtun");
    one_run(&bed, &other, 8, down, "warm-other");
    let proxies = [("vtun proxy", &vtun), (other_name, &other)];
    let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    let mut pair_ratios = Vec::new();
    println!();
    for r in 0..runs {
        // Alternate who goes first, so a slow drift in background load favours neither.
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (name, proxy) = proxies[i];
            let s = one_run(
                &bed,
                proxy,
                mb,
                down,
                &format!("{}-{r}", name.replace(' ', "-")),
            );
            samples[i].push(s);
        }
        let (v, o) = (&samples[0][r], &samples[1][r]);
        pair_ratios.push(o.secs / v.secs);
        println!(
            "run {}: vtun {:.0} MB/s ({:.2} CPU s), {} {:.0} MB/s ({:.2} CPU s): {:.2}x",
            r + 1,
            mb as f64 / v.secs,
            v.cpu,
            short,
            mb as f64 / o.secs,
            o.cpu,
            o.secs / v.secs
        );
    }
    let results: Vec<_> = proxies
        .iter()
        .zip(&samples)
        .map(|((name, _), s)| {
            let t = median(s.iter().map(|s| s.secs).collect());
            let rss = s.iter().map(|s| s.rss_kb).max().unwrap_or(0);
            let cpu = median(s.iter().map(|s| s.cpu).collect());
            (name, mb as f64 / t, rss, cpu)
        })
        .collect();
    println!();
    println!("| ProxyCommand | MB/s | proxy peak RSS | proxy CPU s |");
    println!("|---|---:|---:|---:|");
    for (name, rate, rss, cpu) in &results {
        println!(
            "| {name} | {rate:.0} | {:.1} MB | {cpu:.2} |",
            *rss as f64 / 1024.0
        );
    }
    println!();
    println!(
        "ratio vtun/{short} throughput: {:.2}x (median of the per-run ratios: {:.2}x)",
        results[0].1 / results[1].1,
        median(pair_ratios)
    );
}
