//! `vtun sync` beside `rsync -a` and `rsync -az` (through the `openssl s_client` ProxyCommand) on
//! the test bed, same run, at 0 ms and 20 ms RTT: first sync of a tree, a no-change re-sync, a
//! re-sync after 1 file in 100 changed, and 8 bytes changed in the middle of one large file.
//! Reports wall time and bytes on the wire (SSH stream bytes counted by the gateway), with ratios
//! to `rsync -a`; first syncs are the mean of two runs in opposite orders. Each cell starts after
//! `sync`, so none pays for the previous one's writeback. The VM side writes to a fresh ext4 file
//! system of its own per bed (a loop device, when run as root), as a VM's disk would be.
//!
//! Run: `cargo bench --bench sync`. Knobs: VTUN_BENCH_MB (tree size, default 1024),
//! VTUN_BENCH_FILES (default 10000), VTUN_BENCH_BIG_MB (the single large file, default 1024),
//! VTUN_BENCH_DELAYS (one-way ms, default "0,10"), VTUN_BENCH_VM_DISK ("fresh", the default, or
//! "shared": the VM side writes into the bed's directory on the machine's file system).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use support::*;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn measure(bed: &TestBed, mut cmd: Command, what: &str) -> (f64, u64) {
    settle();
    let mark = bed.log_mark();
    let start = Instant::now();
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (up, down) = bed.wire_bytes_since(mark);
    // Progress while the run goes on; the table comes at the end.
    eprintln!("  {what}: {secs:.2} s, {} wire bytes", up + down);
    (secs, up + down)
}

/// The VM's side of the bed on a file system of its own, as a VM has: a fresh ext4 image on a
/// loop device (direct I/O, so its blocks are not cached twice). On the machine's shared file
/// system a first sync's speed depended on what had been deleted there in the minutes before
/// (ext4 passes over recently freed inodes while their table blocks are dirty), which moved
/// vtun's first sync between 4.1 s and 9.6 s while rsync's stayed within 13.4–16.2 s. Needs
/// root, mkfs.ext4 and losetup; otherwise (or with VTUN_BENCH_VM_DISK=shared) the bed's
/// directory is used and the header says so.
struct VmDisk {
    root: PathBuf,
    device: Option<String>,
}

impl VmDisk {
    fn new(bed: &TestBed, gib: u64) -> VmDisk {
        let root = bed.dir("vm-disk");
        let device = if env_or("VTUN_BENCH_VM_DISK", "fresh") == "shared" {
            None
        } else {
            Self::mount(&bed.dir("vm-disk-image").join("disk.img"), &root, gib)
        };
        match &device {
            Some(dev) => println!("VM side: fresh ext4 on {dev} ({gib} GiB, direct I/O)"),
            None => println!("VM side: the bed's directory on the machine's file system"),
        }
        VmDisk { root, device }
    }

    fn mount(image: &Path, at: &Path, gib: u64) -> Option<String> {
        let ok = |cmd: &mut Command| {
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        std::fs::File::create(image).ok()?.set_len(gib << 30).ok()?;
        if !ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(image)) {
            return None;
        }
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(image)
            .output()
            .ok()?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || dev.is_empty() {
            return None;
        }
        if !ok(Command::new("mount").arg(&dev).arg(at)) {
            ok(Command::new("losetup").arg("-d").arg(&dev));
            return None;
        }
        Some(dev)
    }

    fn dir(&self, name: &str) -> PathBuf {
        let d = self.root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

impl Drop for VmDisk {
    fn drop(&mut self) {
        if let Some(dev) = &self.device {
            let _ = Command::new("umount").arg(&self.root).status();
            let _ = Command::new("losetup").arg("-d").arg(dev).status();
        }
    }
}

fn make_tree(root: &Path, mb: usize, files: usize) {
    let per = (mb << 20) / files.max(1);
    for i in 0..files {
        let d = root.join(format!("d{:03}", i % 100));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("f{i:05}.dat")), random_bytes(per, i as u64)).unwrap();
    }
}

/// Change 1 file in 100: overwrite 64 bytes in the middle (mtime changes too).
fn touch_one_in_hundred(root: &Path, files: usize) {
    for i in (0..files).step_by(100) {
        let p = root
            .join(format!("d{:03}", i % 100))
            .join(format!("f{i:05}.dat"));
        edit_middle(&p, &random_bytes(64, 999 + i as u64));
    }
}

fn edit_middle(path: &Path, bytes: &[u8]) {
    let len = std::fs::metadata(path).unwrap().len();
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(len / 2)).unwrap();
    f.write_all(bytes).unwrap();
}

fn main() {
    let mb: usize = env_or("VTUN_BENCH_MB", "1024").parse().unwrap();
    let files: usize = env_or("VTUN_BENCH_FILES", "10000").parse().unwrap();
    let big_mb: usize = env_or("VTUN_BENCH_BIG_MB", "1024").parse().unwrap();
    let delays: Vec<u64> = env_or("VTUN_BENCH_DELAYS", "0,10")
        .split(',')
        .map(|d| d.trim().parse().unwrap())
        .collect();
    println!(
        "sync: tree of {mb} MiB in {files} files, and one {big_mb} MiB file; real sshd behind"
    );
    println!(
        "vtun gateway on loopback; rsync uses ProxyCommand=openssl s_client; one run per cell"
    );

    let mut rows: Vec<(String, u64, String, f64, u64)> = Vec::new();
    // Beds are removed only at the end: right after tens of thousands of files are deleted,
    // ext4 passes over their inodes when allocating new ones, and a first sync of 10,000 files
    // then took 7.4 s instead of 5.3 s, for whichever tool happened to run first.
    let mut done_beds = Vec::new();
    for &delay in &delays {
        let bed = TestBed::builder().vm("a").delay_ms(delay).start();
        // Two first syncs per tool of the tree, one staged copy per tool of the big file and
        // its temporary while it syncs, and room to spare.
        let disk = VmDisk::new(&bed, ((mb * 6 + big_mb * 4) as u64 >> 10) + 4);
        let rtt = delay * 2;
        let work = bed.dir("bench");
        let tree = work.join("tree");
        make_tree(&tree, mb, files);
        let big_dir = work.join("big");
        std::fs::create_dir_all(&big_dir).unwrap();
        std::fs::write(big_dir.join("disk.img"), random_bytes(big_mb << 20, 77)).unwrap();

        let rsh = {
            let mut p = vec!["ssh".to_string()];
            p.extend(
                bed.ssh_options_with(&bed.openssl_proxy_command())
                    .iter()
                    .map(|o| {
                        if o.contains(' ') {
                            format!("'{o}'")
                        } else {
                            o.clone()
                        }
                    }),
            );
            p.join(" ")
        };
        let tools = ["vtun sync", "rsync -a", "rsync -az"];
        let dest =
            |tool: &str, what: &str| disk.dir(&format!("dst-{}-{what}", tool.replace(' ', "")));
        let cmd_for = |tool: &str, src: &Path, dst: &Path| {
            let mut c;
            if tool == "vtun sync" {
                c = bed.vtun();
                c.arg("sync")
                    .arg(format!("{}/", src.display()))
                    .arg(format!("a:{}/", dst.display()));
            } else {
                c = Command::new("rsync");
                c.arg(if tool.ends_with('z') { "-az" } else { "-a" })
                    .arg("-e")
                    .arg(&rsh)
                    .arg(format!("{}/", src.display()))
                    .arg(format!("a.vm.test:{}/", dst.display()));
            }
            c
        };

        // Tree: first sync, no-change re-sync, 1 in 100 changed.
        // First syncs run twice, in turn and then in reverse order (vtun, rsync -a, rsync -az,
        // rsync -az, rsync -a, vtun), and the table has the mean: the same vtun first sync took
        // 6.9 s, 5.8 s and 4.1 s in three runs in a row while ext4 recovered from earlier
        // deletions, so whoever always went first paid for the drift.
        let mut first: Vec<Vec<(f64, u64)>> = vec![Vec::new(); tools.len()];
        let mut unchanged = Vec::new();
        for (i, tool) in tools.iter().enumerate() {
            let d = dest(tool, "tree");
            first[i].push(measure(
                &bed,
                cmd_for(tool, &tree, &d),
                &format!("{rtt} ms first {tool}"),
            ));
            let (s, b) = measure(
                &bed,
                cmd_for(tool, &tree, &d),
                &format!("{rtt} ms no-change {tool}"),
            );
            unchanged.push(("no-change re-sync".into(), rtt, tool.to_string(), s, b));
        }
        for (i, tool) in tools.iter().enumerate().rev() {
            let d = dest(tool, "tree-again");
            first[i].push(measure(
                &bed,
                cmd_for(tool, &tree, &d),
                &format!("{rtt} ms first {tool} (again)"),
            ));
        }
        for (tool, runs) in tools.iter().zip(&first) {
            let secs = runs.iter().map(|r| r.0).sum::<f64>() / runs.len() as f64;
            let bytes = runs.iter().map(|r| r.1).sum::<u64>() / runs.len() as u64;
            rows.push((
                "first sync of the tree".into(),
                rtt,
                tool.to_string(),
                secs,
                bytes,
            ));
        }
        rows.extend(unchanged);
        touch_one_in_hundred(&tree, files);
        for tool in tools {
            let d = dest(tool, "tree");
            let (s, b) = measure(
                &bed,
                cmd_for(tool, &tree, &d),
                &format!("{rtt} ms 1/100 {tool}"),
            );
            rows.push(("1 file in 100 changed".into(), rtt, tool.into(), s, b));
        }

        // One big file with 8 bytes changed in the middle; destinations pre-staged identical.
        for tool in tools {
            let d = dest(tool, "big");
            let st = Command::new("cp")
                .args(["-p"])
                .arg(big_dir.join("disk.img"))
                .arg(&d)
                .status()
                .unwrap();
            assert!(st.success());
        }
        // Write the staged copies out first: otherwise the first tool timed pays for their
        // writeback (3 GiB at the default size) while the last one does not.
        assert!(Command::new("sync").status().unwrap().success());
        edit_middle(&big_dir.join("disk.img"), b"8 bytes!");
        for tool in tools {
            let d = dest(tool, "big");
            let (s, b) = measure(
                &bed,
                cmd_for(tool, &big_dir, &d),
                &format!("{rtt} ms 8 bytes {tool}"),
            );
            rows.push((
                format!("8 bytes changed in {big_mb} MiB"),
                rtt,
                tool.into(),
                s,
                b,
            ));
        }
        // The disk is unmounted before its bed's directory goes.
        done_beds.push((disk, bed));
    }
    drop(done_beds);

    println!();
    println!("| case | RTT | tool | wall s | × rsync -a time | wire bytes | × rsync -a bytes |");
    println!("|---|---:|---|---:|---:|---:|---:|");
    for (case, rtt, tool, secs, bytes) in &rows {
        let base = rows
            .iter()
            .find(|r| &r.0 == case && r.1 == *rtt && r.2 == "rsync -a")
            .unwrap();
        println!(
            "| {case} | {rtt} ms | {tool} | {secs:.2} | {:.2} | {bytes} | {:.2} |",
            secs / base.3,
            *bytes as f64 / base.4.max(1) as f64
        );
    }
}
