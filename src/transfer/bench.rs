//! `vtun bench VM`: how fast is the path to this VM? Connection setup, SFTP round-trip time,
//! then a temporary file moved up and down through the real transfer engine, once over one
//! channel and once with `--parallel` channels, so the gain of the parallel engine is visible
//! on the user's own link. Only SFTP is used, which every stock sshd has. Both temporary files
//! are removed, also when a run fails.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::RngCore;

use super::file::{Engine, Options};
use super::fs::{Fs, RemoteFs};
use crate::fs::Kind;
use crate::link::{Connector, Link};
use crate::progress::Progress;
use crate::settings::Settings;

/// Parse `256M`, `1G`, `512K`, `1000` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => bail!("invalid size {s:?}: use a number with K, M or G"),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("invalid size {s:?}: use a number with K, M or G"))?;
    n.checked_mul(mult)
        .filter(|&v| v > 0)
        .with_context(|| format!("invalid size {s:?}"))
}

/// One direction at one parallelism.
#[derive(Debug, serde::Serialize)]
pub struct Run {
    pub direction: &'static str,
    pub channels: usize,
    pub seconds: f64,
    pub mb_per_s: f64,
}

/// Everything `vtun bench` reports.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub host: String,
    pub bytes: u64,
    pub connect_ms: f64,
    pub sftp_open_ms: f64,
    pub rtt_ms: f64,
    pub runs: Vec<Run>,
}

/// What `vtun bench` was asked to do.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The VM operand as the user wrote it.
    pub vm: String,
    /// Bytes to move each way.
    pub size: u64,
    /// Channels for the parallel run.
    pub parallel: usize,
    /// Print JSON instead of a table.
    pub json: bool,
}

/// Run `vtun bench`; the report goes to `out`.
pub async fn bench(
    settings: &Settings,
    args: &BenchOptions,
    connector: &dyn Connector,
    out: &mut (dyn Write + Send),
) -> Result<u8> {
    let size = args.size;
    if args.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    let host = settings.host(&args.vm)?;
    let started = Instant::now();
    let opener = connector.connect(&host).await?;
    let connect = started.elapsed();
    let report = measure(opener, size, args.parallel, connect).await?;
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&report)?).context("cannot write to stdout")?;
    } else {
        print_table(&report, out)?;
    }
    out.flush().context("cannot write to stdout")?;
    Ok(0)
}

/// Measure through an already connected `opener` (`connect` is how long that took).
pub async fn measure(
    opener: Arc<dyn Link>,
    size: u64,
    parallel: usize,
    connect: Duration,
) -> Result<Report> {
    let name = opener.name().to_string();
    let meta_fs = RemoteFs::new(opener.clone(), 1);
    let t = Instant::now();
    let sftp = meta_fs.client(0).await?;
    let sftp_open = t.elapsed();
    let mut rtts = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        sftp.realpath(Path::new(".")).await?;
        rtts.push(t.elapsed());
    }
    rtts.sort();

    let tag = format!("{:016x}", rand::random::<u64>());
    let local = std::env::temp_dir().join(format!("vtun-bench-{tag}"));
    let back = std::env::temp_dir().join(format!("vtun-bench-{tag}.back"));
    let remote = PathBuf::from(format!(".vtun-bench-{tag}"));
    let remote_fs = Fs::Remote(Arc::new(meta_fs));
    let result = async {
        write_random(&local, size).await?;
        let mut runs = Vec::new();
        let mut channels = vec![1];
        if parallel > 1 {
            channels.push(parallel);
        }
        for &n in &channels {
            let fs = Fs::Remote(Arc::new(RemoteFs::new(opener.clone(), n)));
            let secs = copy(&Fs::Local, &local, &fs, &remote, n).await?;
            runs.push(run("upload", n, size, secs));
            let secs = copy(&fs, &remote, &Fs::Local, &back, n).await?;
            runs.push(run("download", n, size, secs));
        }
        Ok::<_, anyhow::Error>(runs)
    }
    .await;
    // Clean up whatever exists, whatever happened.
    let _ = std::fs::remove_file(&local);
    let _ = std::fs::remove_file(&back);
    if let Ok(Some(m)) = remote_fs.lstat(&remote).await {
        if m.kind == Kind::File {
            if let Err(e) = remote_fs.remove(&remote).await {
                tracing::warn!("could not remove {}: {e:#}", remote_fs.show(&remote));
            }
        }
    }
    let median = rtts.get(rtts.len() / 2).copied().unwrap_or_default();
    Ok(Report {
        host: name,
        bytes: size,
        connect_ms: ms(connect),
        sftp_open_ms: ms(sftp_open),
        rtt_ms: ms(median),
        runs: result?,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn run(direction: &'static str, channels: usize, bytes: u64, seconds: f64) -> Run {
    Run {
        direction,
        channels,
        seconds,
        mb_per_s: bytes as f64 / 1e6 / seconds.max(1e-9),
    }
}

async fn copy(
    src: &Fs,
    src_path: &Path,
    dst: &Fs,
    dst_path: &Path,
    parallel: usize,
) -> Result<f64> {
    let engine = Engine::new(
        Options {
            recursive: false,
            preserve: false,
            resume: false,
            parallel,
        },
        Progress::hidden(),
    );
    let meta = src
        .stat(src_path)
        .await?
        .with_context(|| format!("{}: vanished", src.show(src_path)))?;
    let t = Instant::now();
    engine
        .copy_file(src, src_path, &meta, dst, dst_path, 0)
        .await?;
    Ok(t.elapsed().as_secs_f64())
}

/// Incompressible data, written in 1 MiB blocks.
async fn write_random(path: &Path, size: u64) -> Result<()> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| path.display().to_string())?,
        );
        let mut block = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            rand::rng().fill_bytes(&mut block);
            let n = left.min(block.len() as u64) as usize;
            f.write_all(&block[..n])?;
            left -= n as u64;
        }
        f.flush()?;
        Ok(())
    })
    .await?
}

fn print_table(r: &Report, out: &mut (dyn Write + Send)) -> Result<()> {
    writeln!(out, "{}", r.host)?;
    writeln!(out, "  connect        {:>9.1} ms", r.connect_ms)?;
    writeln!(out, "  sftp open      {:>9.1} ms", r.sftp_open_ms)?;
    writeln!(out, "  round trip     {:>9.1} ms  (median of 5)", r.rtt_ms)?;
    for run in &r.runs {
        writeln!(
            out,
            "  {:<9} {:>2} ch {:>9.2} s  {:>8.1} MB/s  ({} MiB)",
            run.direction,
            run.channels,
            run.seconds,
            run.mb_per_s,
            r.bytes >> 20
        )?;
    }
    Ok(())
}

// Tests only: unwrap on values the test itself built (in-memory data, temp files, local
// processes), where a failure is the test failing.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("512K").unwrap(), 512 << 10);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("0").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999G").is_err());
    }
}
