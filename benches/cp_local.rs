//! Throughput of the transfer engine with no network: "remote" paths are served by OpenSSH's
//! real `sftp-server` as local children (`LocalConnector`), so this measures the engine and
//! the SFTP protocol cost, not a link. Compared, in the same run on the same files:
//!
//! - `vtun` engine: upload, download, VM→VM (two "hosts"), with `--parallel` streams;
//! - `sftp -D sftp-server -b`: OpenSSH's client talking to the same server, no ssh (baseline);
//! - `cp`: the local ceiling.
//!
//! A second table emulates a WAN: every stream gets VTUN_BENCH_DELAY_MS (default 10) of one-way
//! delay each way and, like an OpenSSH channel, at most 2 MiB in flight per direction. It shows
//! what pipelining and parallel channels buy on a long link (no OpenSSH baseline there: `sftp -D`
//! cannot be put behind the delay).
//!
//! Run: `cargo bench --bench cp_local` (sizes: VTUN_BENCH_MB=256, VTUN_BENCH_FILES=500,
//! VTUN_BENCH_PARALLEL=4). Prints the tables; the machine is shared, so compare ratios.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use futures::future::BoxFuture;
use rand::RngCore;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use vtun::link::{Link, RemoteIo, Subprocess};
use vtun::progress::Progress;
use vtun::transfer::{Engine, Fs, Options, RemoteFs};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn write_random(path: &Path, len: usize) -> Result<()> {
    let mut data = vec![0u8; len];
    rand::rng().fill_bytes(&mut data);
    std::fs::write(path, data).with_context(|| path.display().to_string())
}

fn remote(parallel: usize) -> Result<Fs> {
    let opener: Arc<dyn Link> = Arc::new(Subprocess::new()?);
    Ok(Fs::Remote(Arc::new(RemoteFs::new(opener, parallel))))
}

/// A local sftp-server behind emulated latency and a 2 MiB per-direction window.
struct Wan {
    inner: Subprocess,
    one_way: Duration,
}

const WINDOW: usize = 2 << 20;

impl Link for Wan {
    fn sftp(&self) -> BoxFuture<'_, Result<Box<dyn RemoteIo>>> {
        Box::pin(async move {
            let io = self.inner.sftp().await?;
            let (ours, theirs) = tokio::io::duplex(WINDOW);
            let (ir, iw) = tokio::io::split(io);
            let (tr, tw) = tokio::io::split(theirs);
            tokio::spawn(pump(tr, iw, self.one_way));
            tokio::spawn(pump(ir, tw, self.one_way));
            let io: Box<dyn RemoteIo> = Box::new(ours);
            Ok(io)
        })
    }
    fn exec(&self, c: &str) -> BoxFuture<'_, Result<Box<dyn RemoteIo>>> {
        self.inner.exec(c)
    }
    fn name(&self) -> &str {
        "wan"
    }
}

/// Forward bytes after `delay`, with at most WINDOW bytes in flight.
async fn pump<R, W>(mut r: R, mut w: W, delay: Duration)
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let window = Arc::new(Semaphore::new(WINDOW));
    let (tx, mut rx) =
        mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>, OwnedSemaphorePermit)>();
    let win = window.clone();
    tokio::spawn(async move {
        loop {
            let Ok(permit) = win.clone().acquire_many_owned(64 * 1024).await else {
                return;
            };
            let mut buf = vec![0u8; 64 * 1024];
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx
                        .send((tokio::time::Instant::now() + delay, buf, permit))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    while let Some((due, buf, permit)) = rx.recv().await {
        tokio::time::sleep_until(due).await;
        if w.write_all(&buf).await.is_err() {
            return;
        }
        drop(permit);
    }
    let _ = w.shutdown().await;
}

fn wan(parallel: usize, one_way: Duration) -> Result<Fs> {
    let opener: Arc<dyn Link> = Arc::new(Wan {
        inner: Subprocess::new()?,
        one_way,
    });
    Ok(Fs::Remote(Arc::new(RemoteFs::new(opener, parallel))))
}

/// One engine copy; returns seconds.
async fn engine(src: (Fs, PathBuf), dst: (Fs, PathBuf), parallel: usize) -> Result<f64> {
    let engine = Engine::new(
        Options {
            recursive: true,
            preserve: false,
            resume: false,
            parallel,
        },
        Progress::hidden(),
    );
    let start = Instant::now();
    let errors = engine.copy_many(&[src], &dst.0, &dst.1).await;
    if let Some(e) = errors.into_iter().next() {
        return Err(e);
    }
    Ok(start.elapsed().as_secs_f64())
}

fn timed(cmd: &mut Command) -> Result<f64> {
    let start = Instant::now();
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(start.elapsed().as_secs_f64())
}

fn sftp_batch(server: &Path, dir: &Path, batch: &str) -> Result<f64> {
    let file = dir.join("batch");
    std::fs::write(&file, batch)?;
    timed(
        Command::new("sftp")
            .arg("-q")
            .arg("-D")
            .arg(server)
            .arg("-b")
            .arg(&file),
    )
}

fn fresh(p: &Path) -> Result<()> {
    if p.exists() {
        if p.is_dir() {
            std::fs::remove_dir_all(p)?;
        } else {
            std::fs::remove_file(p)?;
        }
    }
    Ok(())
}

fn row(what: &str, tool: &str, bytes: u64, secs: f64, base: Option<f64>) {
    let mbs = bytes as f64 / 1e6 / secs;
    let ratio = base.map_or(String::new(), |b| format!("{:.2}×", b / secs));
    println!("{what:<22} {tool:<26} {secs:>8.3} s {mbs:>9.1} MB/s {ratio:>8}");
}

#[tokio::main]
async fn main() -> Result<()> {
    let mb = env("VTUN_BENCH_MB", 256);
    let nfiles = env("VTUN_BENCH_FILES", 500);
    let parallel = env("VTUN_BENCH_PARALLEL", 4);
    let server = Subprocess::new()?.sftp_server;
    let t = tempfile::tempdir()?;
    let d = t.path();
    let big = d.join("big");
    write_random(&big, mb << 20)?;
    let tree = d.join("tree");
    std::fs::create_dir(&tree)?;
    let mut tree_bytes = 0;
    for i in 0..nfiles {
        // 1 KiB .. ~128 KiB, like a source tree with some assets.
        let len = 1024 + (i * 7919) % (127 * 1024);
        tree_bytes += len as u64;
        let sub = tree.join(format!("d{}", i % 10));
        std::fs::create_dir_all(&sub)?;
        write_random(&sub.join(format!("f{i}")), len)?;
    }
    let big_bytes = (mb as u64) << 20;
    println!(
        "vtun cp engine through local sftp-server ({}), parallel {parallel}",
        server.display()
    );
    println!(
        "one file of {mb} MiB; a tree of {nfiles} files ({:.1} MB)",
        tree_bytes as f64 / 1e6
    );
    println!(
        "{:<22} {:<26} {:>10} {:>14} {:>8}",
        "case", "tool", "time", "rate", "vs sftp"
    );

    let (up, down, vm2vm) = (d.join("up"), d.join("down"), d.join("vm2vm"));
    let local = Fs::Local;

    // One large file.
    let cp_secs = timed(Command::new("cp").arg(&big).arg(&up))?;
    fresh(&up)?;
    let sftp_up = sftp_batch(
        &server,
        d,
        &format!("put {} {}\n", big.display(), up.display()),
    )?;
    fresh(&up)?;
    let sftp_down = sftp_batch(
        &server,
        d,
        &format!("get {} {}\n", big.display(), down.display()),
    )?;
    fresh(&down)?;
    row(
        "file upload",
        "cp (ceiling)",
        big_bytes,
        cp_secs,
        Some(sftp_up),
    );
    row("file upload", "sftp -D", big_bytes, sftp_up, Some(sftp_up));
    for p in [1, parallel] {
        fresh(&up)?;
        let s = engine((local.clone(), big.clone()), (remote(p)?, up.clone()), p).await?;
        row(
            "file upload",
            &format!("vtun --parallel {p}"),
            big_bytes,
            s,
            Some(sftp_up),
        );
    }
    row(
        "file download",
        "sftp -D",
        big_bytes,
        sftp_down,
        Some(sftp_down),
    );
    for p in [1, parallel] {
        fresh(&down)?;
        let s = engine((remote(p)?, up.clone()), (local.clone(), down.clone()), p).await?;
        row(
            "file download",
            &format!("vtun --parallel {p}"),
            big_bytes,
            s,
            Some(sftp_down),
        );
    }
    fresh(&vm2vm)?;
    let s = engine(
        (remote(parallel)?, up.clone()),
        (remote(parallel)?, vm2vm.clone()),
        parallel,
    )
    .await?;
    row(
        "file VM→VM",
        &format!("vtun --parallel {parallel}"),
        big_bytes,
        s,
        None,
    );
    for p in [&up, &down, &vm2vm] {
        fresh(p)?;
    }

    // Many small files.
    let cp_secs = timed(Command::new("cp").arg("-r").arg(&tree).arg(&up))?;
    fresh(&up)?;
    let sftp_up = sftp_batch(
        &server,
        d,
        &format!("put -r {} {}\n", tree.display(), up.display()),
    )?;
    fresh(&up)?;
    let sftp_down = sftp_batch(
        &server,
        d,
        &format!("get -r {} {}\n", tree.display(), down.display()),
    )?;
    fresh(&down)?;
    row(
        "tree upload",
        "cp -r (ceiling)",
        tree_bytes,
        cp_secs,
        Some(sftp_up),
    );
    row("tree upload", "sftp -D", tree_bytes, sftp_up, Some(sftp_up));
    let s = engine(
        (local.clone(), tree.clone()),
        (remote(parallel)?, up.clone()),
        parallel,
    )
    .await?;
    row(
        "tree upload",
        &format!("vtun --parallel {parallel}"),
        tree_bytes,
        s,
        Some(sftp_up),
    );
    row(
        "tree download",
        "sftp -D",
        tree_bytes,
        sftp_down,
        Some(sftp_down),
    );
    let s = engine(
        (remote(parallel)?, up.clone()),
        (local.clone(), down.clone()),
        parallel,
    )
    .await?;
    row(
        "tree download",
        &format!("vtun --parallel {parallel}"),
        tree_bytes,
        s,
        Some(sftp_down),
    );
    let s = engine(
        (remote(parallel)?, up.clone()),
        (remote(parallel)?, vm2vm.clone()),
        parallel,
    )
    .await?;
    row(
        "tree VM→VM",
        &format!("vtun --parallel {parallel}"),
        tree_bytes,
        s,
        None,
    );
    for p in [&up, &down, &vm2vm] {
        fresh(p)?;
    }

    let delay = Duration::from_millis(env("VTUN_BENCH_DELAY_MS", 10) as u64);
    println!();
    println!(
        "emulated WAN: {} ms round trip, 2 MiB in flight per stream and direction",
        delay.as_millis() * 2
    );
    println!(
        "{:<22} {:<26} {:>10} {:>14} {:>8}",
        "case", "tool", "time", "rate", "vs 1 ch"
    );
    let mut one = None;
    for p in [1, parallel, parallel * 2] {
        fresh(&up)?;
        let s = engine(
            (local.clone(), big.clone()),
            (wan(p, delay)?, up.clone()),
            p,
        )
        .await?;
        one.get_or_insert(s);
        row(
            "file upload",
            &format!("vtun --parallel {p}"),
            big_bytes,
            s,
            one,
        );
    }
    let mut one = None;
    for p in [1, parallel, parallel * 2] {
        fresh(&down)?;
        let s = engine(
            (wan(p, delay)?, up.clone()),
            (local.clone(), down.clone()),
            p,
        )
        .await?;
        one.get_or_insert(s);
        row(
            "file download",
            &format!("vtun --parallel {p}"),
            big_bytes,
            s,
            one,
        );
    }
    fresh(&up)?;
    let mut one = None;
    for p in [1, parallel] {
        fresh(&down)?;
        let s = engine(
            (local.clone(), tree.clone()),
            (wan(p, delay)?, down.clone()),
            p,
        )
        .await?;
        one.get_or_insert(s);
        row(
            "tree upload",
            &format!("vtun --parallel {p}"),
            tree_bytes,
            s,
            one,
        );
    }
    Ok(())
}
