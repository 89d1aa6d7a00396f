//! `vtun cp` beside what users run today — `scp`, `sftp` and `rsync -e ssh`, all through the
//! `openssl s_client` ProxyCommand — on the test bed, in the same run: one large file and a tree
//! of many files; upload, download and VM→VM; at 0 ms and at 20 ms RTT (gateway delay 10 ms each
//! way). Prints MB/s, the ratio to scp, and the client's CPU seconds (all its processes).
//! The ceiling is raw bytes/s through `vtun proxy` into `cat > /dev/null`. Each cell starts after
//! `sync`, so none pays for the previous one's writeback.
//!
//! Run: `cargo bench --bench transfer`. Knobs: VTUN_BENCH_MB (default 1024), VTUN_BENCH_FILES
//! (default 2000), VTUN_BENCH_DELAYS (one-way ms, default "0,10"), VTUN_BENCH_TOOLS (default
//! "vtun,scp,sftp,rsync"; "vtun-master" is vtun cp through connection masters started before
//! the cells and stopped after), VTUN_BENCH_SETS (default "one,many").
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use support::*;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Wall seconds and CPU seconds (user+sys of the command and its children).
fn timed(bed: &TestBed, mut cmd: Command, what: &str) -> (f64, f64) {
    let stats = bed.root.join("last.time");
    let mut wrapped = Command::new("/usr/bin/time");
    wrapped
        .arg("-f")
        .arg("%e %U %S")
        .arg("-o")
        .arg(&stats)
        .arg(cmd.get_program());
    wrapped.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        wrapped.current_dir(d);
    }
    cmd = wrapped;
    settle();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&stats).unwrap();
    let f: Vec<f64> = text
        .lines()
        .last()
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    (f[0], f[1] + f[2])
}

fn make_sets(root: &Path, mb: usize, files: usize) -> (PathBuf, PathBuf) {
    let one = root.join("src-one");
    let many = root.join("src-many");
    std::fs::create_dir_all(&one).unwrap();
    std::fs::create_dir_all(&many).unwrap();
    std::fs::write(one.join("big.bin"), random_bytes(mb << 20, 11)).unwrap();
    let per = (mb << 20) / files.max(1);
    for i in 0..files {
        let d = many.join(format!("d{:02}", i % 40));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("f{i:05}.bin")), random_bytes(per, i as u64)).unwrap();
    }
    (one, many)
}

fn reset(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
}

struct Row {
    set: String,
    dir: String,
    rtt: u64,
    tool: String,
    mbps: f64,
    cpu: f64,
}

/// User + system CPU seconds the processes `pids` have used so far.
fn cpu_of(pids: &[u32]) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    pids.iter()
        .map(|pid| {
            let stat = read(Path::new(&format!("/proc/{pid}/stat")));
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().collect();
            // Fields after the command: state is 0, utime is 11, stime is 12.
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            (n(11) + n(12)) / tick
        })
        .sum()
}

/// Resident set size of `pid` and the part of it that is its own (not the binary's pages
/// shared with every other vtun process), in KiB.
fn rss_kib(pid: u32) -> String {
    let field = |file: &str, name: &str| -> u64 {
        read(Path::new(&format!("/proc/{pid}/{file}")))
            .lines()
            .filter_map(|l| l.strip_prefix(name))
            .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    };
    let private = field("smaps_rollup", "Private_Clean:") + field("smaps_rollup", "Private_Dirty:");
    format!(
        "{} KiB resident, {private} KiB private",
        field("status", "VmRSS:")
    )
}

fn main() {
    let mb: usize = env_or("VTUN_BENCH_MB", "1024").parse().unwrap();
    let files: usize = env_or("VTUN_BENCH_FILES", "2000").parse().unwrap();
    let delays: Vec<u64> = env_or("VTUN_BENCH_DELAYS", "0,10")
        .split(',')
        .map(|d| d.trim().parse().unwrap())
        .collect();
    let tools = env_or("VTUN_BENCH_TOOLS", "vtun,scp,sftp,rsync");
    let sets = env_or("VTUN_BENCH_SETS", "one,many");
    println!("transfer: {mb} MiB as one file and as {files} files; real sshd behind vtun gateway");
    println!("on loopback; OpenSSH tools use ProxyCommand=openssl s_client; one run per cell");

    let mut rows = Vec::new();
    let mut ceilings = Vec::new();
    for &delay in &delays {
        let bed = TestBed::builder().vm("a").vm("b").delay_ms(delay).start();
        let work = bed.dir("bench");
        let (one, many) = make_sets(&work, mb, files);
        let remote_a = bed.dir("vm-a");
        let remote_b = bed.dir("vm-b");
        let local_dst = work.join("dst");
        let openssl = bed.openssl_proxy_command();
        let ssh_opts = bed.ssh_options_with(&openssl);
        let scp_opts: Vec<String> = ssh_opts[..ssh_opts.len() - 2].to_vec();
        let rsh = {
            let mut p = vec!["ssh".to_string()];
            p.extend(ssh_opts.iter().map(|o| {
                if o.contains(' ') {
                    format!("'{o}'")
                } else {
                    o.clone()
                }
            }));
            p.join(" ")
        };
        let user = bed.user.clone();
        let rtt = delay * 2;
        // "vtun-master": cp through connection masters, started here so no cell pays for that.
        let run = bed.dir("run");
        let mut master_pids = Vec::new();
        if tools.split(',').any(|t| t == "vtun-master") {
            for vm in ["a", "b"] {
                let mut warm = bed.vtun();
                warm.env("VTUN_PERSIST", "600")
                    .env("XDG_RUNTIME_DIR", &run)
                    .args(["exec", vm, "true"]);
                timed(&bed, warm, "start a master");
            }
            let mut list = bed.vtun();
            let out = list
                .env("XDG_RUNTIME_DIR", &run)
                .args(["master", "list", "--json"])
                .output()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            master_pids = v
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["pid"].as_u64().unwrap() as u32)
                .collect();
            for pid in &master_pids {
                println!("master {pid} after connecting: {}", rss_kib(*pid));
            }
        }

        // Ceiling: raw bytes through `vtun proxy` into `cat > /dev/null`.
        let mut c = Command::new("sh");
        let quoted: Vec<String> = bed
            .ssh_options()
            .iter()
            .map(|o| format!("'{}'", o.replace('\'', r"'\''")))
            .collect();
        c.arg("-c").arg(format!(
            "head -c {} /dev/zero | ssh {} a.vm.test 'cat > /dev/null'",
            mb << 20,
            quoted.join(" ")
        ));
        c.env("VTUN_CONNECT", bed.gateway_addr.to_string())
            .env("VTUN_CA_FILE", &bed.ca_file)
            .env("VTUN_DOMAIN", DOMAIN);
        let (secs, _) = timed(&bed, c, "ceiling");
        ceilings.push((rtt, mb as f64 / secs));

        for set in sets.split(',') {
            let (src, recursive, name) = match set {
                "one" => (one.join("big.bin"), false, "big.bin"),
                _ => (many.clone(), true, "src-many"),
            };
            let label = if set == "one" {
                format!("1 × {mb} MiB")
            } else {
                format!("{files} files")
            };
            for dir in ["upload", "download", "vm→vm"] {
                // Stage the remote source for download / vm→vm with vtun-independent cp.
                reset(&remote_a);
                reset(&remote_b);
                reset(&local_dst);
                if dir != "upload" {
                    let st = Command::new("cp")
                        .arg("-r")
                        .arg(&src)
                        .arg(&remote_a)
                        .status()
                        .unwrap();
                    assert!(st.success());
                }
                let remote_src = format!("{}/{name}", remote_a.display());
                for tool in tools.split(',') {
                    let mut cmd;
                    match (tool, dir) {
                        ("vtun" | "vtun-master", _) => {
                            cmd = bed.vtun();
                            if tool == "vtun-master" {
                                cmd.env("VTUN_PERSIST", "600").env("XDG_RUNTIME_DIR", &run);
                            }
                            cmd.arg("cp");
                            if recursive {
                                cmd.arg("-r");
                            }
                            match dir {
                                "upload" => cmd.arg(&src).arg(format!("a:{}/", remote_b.display())),
                                "download" => cmd.arg(format!("a:{remote_src}")).arg(&local_dst),
                                _ => cmd
                                    .arg(format!("a:{remote_src}"))
                                    .arg(format!("b:{}/", remote_b.display())),
                            };
                        }
                        ("scp", _) => {
                            cmd = Command::new("scp");
                            cmd.args(&scp_opts);
                            if recursive {
                                cmd.arg("-r");
                            }
                            match dir {
                                "upload" => cmd
                                    .arg(&src)
                                    .arg(format!("{user}@a.vm.test:{}/", remote_b.display())),
                                "download" => cmd
                                    .arg(format!("{user}@a.vm.test:{remote_src}"))
                                    .arg(&local_dst),
                                _ => cmd
                                    .arg("-3")
                                    .arg(format!("{user}@a.vm.test:{remote_src}"))
                                    .arg(format!("{user}@b.vm.test:{}/", remote_b.display())),
                            };
                        }
                        ("sftp", "upload" | "download") => {
                            let batch = work.join("sftp.batch");
                            let r = if recursive { "-R " } else { "" };
                            let line = if dir == "upload" {
                                format!("put {r}{} {}/\n", src.display(), remote_b.display())
                            } else {
                                format!("get {r}{remote_src} {}/\n", local_dst.display())
                            };
                            std::fs::write(&batch, line).unwrap();
                            cmd = Command::new("sftp");
                            cmd.args(&scp_opts).arg("-b").arg(&batch);
                            cmd.arg(format!("{user}@a.vm.test"));
                        }
                        ("rsync", "upload" | "download") => {
                            cmd = Command::new("rsync");
                            cmd.arg("-a").arg("-e").arg(&rsh);
                            if dir == "upload" {
                                cmd.arg(&src)
                                    .arg(format!("a.vm.test:{}/", remote_b.display()));
                            } else {
                                cmd.arg(format!("a.vm.test:{remote_src}"))
                                    .arg(format!("{}/", local_dst.display()));
                            }
                        }
                        _ => continue,
                    }
                    cmd.env("VTUN_CONNECT", bed.gateway_addr.to_string())
                        .env("VTUN_CA_FILE", &bed.ca_file);
                    let before = cpu_of(&master_pids);
                    let (secs, mut cpu) = timed(&bed, cmd, &format!("{tool} {dir} {set}"));
                    if tool == "vtun-master" {
                        // The masters are not children of the timed command: add their CPU.
                        cpu += cpu_of(&master_pids) - before;
                    }
                    rows.push(Row {
                        set: label.clone(),
                        dir: dir.to_string(),
                        rtt,
                        tool: tool.to_string(),
                        mbps: mb as f64 / secs,
                        cpu,
                    });
                    // Clear destinations so every tool writes fresh files.
                    reset(&remote_b);
                    reset(&local_dst);
                }
            }
        }
        for pid in &master_pids {
            println!("master {pid} after the copies: {}", rss_kib(*pid));
        }
        if !master_pids.is_empty() {
            // Idle masters hand their buffers back within a tick (200 ms).
            std::thread::sleep(std::time::Duration::from_secs(1));
            for pid in &master_pids {
                println!("master {pid} idle again: {}", rss_kib(*pid));
            }
        }
        let mut stop = bed.vtun();
        let _ = stop
            .env("XDG_RUNTIME_DIR", &run)
            .args(["master", "stop"])
            .output();
    }

    println!();
    println!("| data | direction | RTT | tool | MB/s | × scp | client CPU s |");
    println!("|---|---|---:|---|---:|---:|---:|");
    for r in &rows {
        let scp = rows
            .iter()
            .find(|o| o.tool == "scp" && o.set == r.set && o.dir == r.dir && o.rtt == r.rtt)
            .map(|o| o.mbps);
        let ratio = scp.map_or("–".to_string(), |s| format!("{:.2}", r.mbps / s));
        println!(
            "| {} | {} | {} ms | {} | {:.0} | {} | {:.1} |",
            r.set, r.dir, r.rtt, r.tool, r.mbps, ratio, r.cpu
        );
    }
    println!();
    for (rtt, c) in &ceilings {
        let vtun_up = rows
            .iter()
            .filter(|r| r.tool == "vtun" && r.rtt == *rtt && r.dir == "upload")
            .map(|r| r.mbps)
            .fold(0.0, f64::max);
        println!(
            "ceiling at {rtt} ms RTT (ssh | vtun proxy | cat > /dev/null): {c:.0} MB/s; best vtun cp upload is {:.0}% of it",
            100.0 * vtun_up / c
        );
    }
}
