//! Progress on stderr when it is a terminal, silence in pipes, and `--json` summaries.
//!
//! Counters are plain atomics updated from every concurrent range and file; the bar (when there
//! is one) is redrawn by indicatif at a fixed rate, so per-chunk updates cost no terminal I/O.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Bytes and files moved so far, optionally drawn as a bar.
pub struct Progress {
    bytes: AtomicU64,
    files: AtomicU64,
    total_files: AtomicU64,
    started: Instant,
    bar: Option<ProgressBar>,
    /// Print a summary line at the end (`-v`, where a bar may be impossible: a pipe).
    verbose: bool,
}

/// What a finished transfer reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub files: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
}

impl Progress {
    /// A bar when stderr is a terminal, unless `quiet`; with `verbose` also a summary line at
    /// the end (the only output on a pipe, where indicatif draws nothing).
    pub fn new(quiet: bool, verbose: bool) -> Progress {
        let show = !quiet && (verbose || std::io::stderr().is_terminal());
        let bar = show.then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(4));
            let style = ProgressStyle::with_template(
                "{bytes:>10}/{total_bytes:<10} {wide_bar} {binary_bytes_per_sec:>12} ETA {eta:<4} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        Progress {
            bytes: AtomicU64::new(0),
            files: AtomicU64::new(0),
            total_files: AtomicU64::new(0),
            started: Instant::now(),
            bar,
            verbose: verbose && !quiet,
        }
    }

    /// Silent: for engines driven by other code (sync, bench).
    pub fn hidden() -> Progress {
        Progress::new(true, false)
    }

    /// Announce more work: `files` files holding `bytes` bytes.
    pub fn add_total(&self, files: u64, bytes: u64) {
        let total = self.total_files.fetch_add(files, Ordering::Relaxed) + files;
        if let Some(bar) = &self.bar {
            bar.inc_length(bytes);
            bar.set_message(format!(
                "{}/{} files",
                self.files.load(Ordering::Relaxed),
                total
            ));
        }
    }

    pub fn add_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    /// Take back bytes counted for an attempt that failed or restarted.
    pub fn sub_bytes(&self, n: u64) {
        self.bytes.fetch_sub(n, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_position(bar.position().saturating_sub(n));
        }
    }

    pub fn file_done(&self) {
        let done = self.files.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "{done}/{} files",
                self.total_files.load(Ordering::Relaxed)
            ));
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stop drawing and return the totals.
    pub fn finish(&self) -> Summary {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let seconds = self.started.elapsed().as_secs_f64();
        let bytes = self.bytes();
        let summary = Summary {
            files: self.files.load(Ordering::Relaxed),
            bytes,
            seconds,
            mb_per_s: if seconds > 0.0 {
                bytes as f64 / 1e6 / seconds
            } else {
                0.0
            },
        };
        if self.verbose {
            eprintln!(
                "vtun: {} files, {} bytes in {:.2} s ({:.1} MB/s)",
                summary.files, summary.bytes, summary.seconds, summary.mb_per_s
            );
        }
        summary
    }
}
