//! Fan-out output: lines prefixed with the VM's name as they arrive, or collected for
//! `--gather` and `--json`.
//!
//! Whole lines only: each VM's stdout and stderr are cut into lines on their own, and a line is
//! written with one `write_all` by the one task that owns our stdout (or stderr), so lines from
//! different VMs never interleave mid-line. A line longer than [`MAX_LINE`] is written in pieces
//! of that size (each prefixed), which bounds memory whatever a VM prints.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{Outcome, VmResult};

/// Longest line written as one piece.
pub const MAX_LINE: usize = 64 * 1024;

/// Most output kept per stream per VM for `--gather`/`--json`; the rest is dropped and marked.
pub const MAX_KEPT: usize = 16 << 20;

/// Which of our streams a line goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Out,
    Err,
}

/// The writer side of our stdout and stderr, shared by every VM's line splitters.
#[derive(Clone)]
pub struct Lines {
    tx: mpsc::Sender<(Stream, Vec<u8>)>,
}

impl Lines {
    /// Start the tasks that own our stdout and stderr. Await the returned handle after every
    /// [`Lines`] clone is dropped: everything has then been written.
    pub fn start(
        mut stdout: impl AsyncWrite + Unpin + Send + 'static,
        mut stderr: impl AsyncWrite + Unpin + Send + 'static,
    ) -> (Lines, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<(Stream, Vec<u8>)>(256);
        let task = tokio::spawn(async move {
            let mut out_open = true;
            while let Some((stream, bytes)) = rx.recv().await {
                // A reader that went away (`| head`) stops the writing, not the VMs' commands.
                match stream {
                    Stream::Out if out_open => {
                        if stdout.write_all(&bytes).await.is_err() || stdout.flush().await.is_err()
                        {
                            out_open = false;
                        }
                    }
                    Stream::Out => {}
                    Stream::Err => {
                        let _ = stderr.write_all(&bytes).await;
                        let _ = stderr.flush().await;
                    }
                }
            }
        });
        (Lines { tx }, task)
    }

    /// One whole line (or several) already prefixed.
    pub async fn write(&self, stream: Stream, bytes: Vec<u8>) {
        let _ = self.tx.send((stream, bytes)).await;
    }

    /// A writer for one VM's stream: what it is given comes out as `PREFIX: line` lines.
    pub fn prefixed(&self, label: &str, stream: Stream) -> impl AsyncWrite + Send + Unpin {
        let (w, r) = tokio::io::duplex(MAX_LINE);
        tokio::spawn(split_lines(r, format!("{label}: "), stream, self.clone()));
        w
    }
}

/// Read `from` and send each complete line, with `prefix`, to `lines`; a last line without a
/// newline gets one at the end.
async fn split_lines(
    mut from: impl AsyncRead + Unpin,
    prefix: String,
    stream: Stream,
    lines: Lines,
) {
    let mut buf = vec![0u8; MAX_LINE];
    let mut partial: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut batch = Vec::new();
        let mut rest = &buf[..n];
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            batch.extend_from_slice(prefix.as_bytes());
            batch.extend_from_slice(&partial);
            batch.extend_from_slice(&rest[..=i]);
            partial.clear();
            rest = &rest[i + 1..];
        }
        partial.extend_from_slice(rest);
        while partial.len() >= MAX_LINE {
            batch.extend_from_slice(prefix.as_bytes());
            batch.extend_from_slice(&partial[..MAX_LINE]);
            batch.push(b'\n');
            partial.drain(..MAX_LINE);
        }
        if !batch.is_empty() {
            lines.write(stream, batch).await;
        }
    }
    if !partial.is_empty() {
        let mut batch = prefix.into_bytes();
        batch.extend_from_slice(&partial);
        batch.push(b'\n');
        lines.write(stream, batch).await;
    }
}

/// A writer that keeps what it is given, up to [`MAX_KEPT`] bytes.
#[derive(Clone, Default)]
pub struct Kept(Arc<Mutex<(Vec<u8>, bool)>>);

impl Kept {
    pub fn take(&self) -> Vec<u8> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (mut bytes, truncated) = std::mem::take(&mut *g);
        if truncated {
            bytes.extend_from_slice(b"\n[vtun: output truncated]\n");
        }
        bytes
    }
}

impl AsyncWrite for Kept {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let room = MAX_KEPT.saturating_sub(g.0.len());
        let take = room.min(buf.len());
        g.0.extend_from_slice(&buf[..take]);
        g.1 |= take < buf.len();
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// `--gather`: VMs with the same output and status under one header naming them and their
/// count (clush -b), in the order their first VM was given. Stdout blocks go to `out`, stderr
/// blocks (with the same header) to `err`; VMs that produced nothing and succeeded are named
/// in a closing block only when some others printed something.
pub fn gather(results: &[VmResult]) -> (String, String) {
    /// Stdout, stderr, outcome, and the VMs that had exactly those.
    type Group<'a> = (&'a [u8], &'a [u8], &'a Outcome, Vec<&'a str>);
    let mut groups: Vec<Group> = Vec::new();
    for r in results {
        match groups
            .iter_mut()
            .find(|g| g.0 == r.stdout.as_slice() && g.1 == r.stderr.as_slice() && g.2 == &r.outcome)
        {
            Some(g) => g.3.push(&r.label),
            None => groups.push((&r.stdout, &r.stderr, &r.outcome, vec![&r.label])),
        }
    }
    let mut out = String::new();
    let mut err = String::new();
    for (stdout, stderr, outcome, names) in groups {
        let status = match outcome {
            Outcome::Ok => String::new(),
            Outcome::Failed(c) => format!(", exit {c}"),
            Outcome::TimedOut => ", timed out".into(),
            Outcome::Unreachable(e) | Outcome::Lost(e) => format!(", {e}"),
        };
        let header = format!(
            "----------------\n{} ({}{status})\n----------------\n",
            names.join(","),
            names.len()
        );
        if !stdout.is_empty() || stderr.is_empty() {
            out.push_str(&header);
            push_text(&mut out, stdout);
        }
        if !stderr.is_empty() {
            err.push_str(&header);
            push_text(&mut err, stderr);
        }
    }
    (out, err)
}

fn push_text(to: &mut String, bytes: &[u8]) {
    to.push_str(&String::from_utf8_lossy(bytes));
    if !bytes.is_empty() && !bytes.ends_with(b"\n") {
        to.push('\n');
    }
}

/// `--json`: one object per VM on one line.
pub fn json_line(r: &VmResult) -> String {
    let status = match &r.outcome {
        Outcome::Ok => serde_json::json!(0),
        Outcome::Failed(c) => serde_json::json!(c),
        _ => serde_json::Value::Null,
    };
    let outcome = match &r.outcome {
        Outcome::Ok => "ok",
        Outcome::Failed(_) => "failed",
        Outcome::Unreachable(_) | Outcome::Lost(_) => "unreachable",
        Outcome::TimedOut => "timed_out",
    };
    let mut line = serde_json::json!({
        "name": r.label,
        "outcome": outcome,
        "status": status,
        "stdout": String::from_utf8_lossy(&r.stdout),
        "stderr": String::from_utf8_lossy(&r.stderr),
        "seconds": (r.seconds * 1000.0).round() / 1000.0,
        "error": r.outcome.error(),
    })
    .to_string();
    line.push('\n');
    line
}

// Tests only: unwrap on in-memory pipes.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_prefixed_whole_and_a_last_partial_line_is_ended() {
        let out = Kept::default();
        let (lines, task) = Lines::start(out.clone(), tokio::io::sink());
        let mut a = lines.prefixed("a", Stream::Out);
        let mut b = lines.prefixed("b", Stream::Out);
        a.write_all(b"one ").await.unwrap();
        b.write_all(b"x\ny").await.unwrap();
        a.write_all(b"two\nthree").await.unwrap();
        a.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
        drop((a, b, lines));
        task.await.unwrap();
        let text = String::from_utf8(out.take()).unwrap();
        let mut got: Vec<&str> = text.lines().collect();
        got.sort();
        assert_eq!(got, ["a: one two", "a: three", "b: x", "b: y"]);
    }

    #[test]
    fn gather_groups_identical_output_and_status() {
        let r = |l: &str, out: &str, o: Outcome| VmResult {
            label: l.into(),
            outcome: o,
            seconds: 0.0,
            stdout: out.as_bytes().to_vec(),
            stderr: Vec::new(),
        };
        let (out, err) = gather(&[
            r("a", "hi\n", Outcome::Ok),
            r("b", "ho\n", Outcome::Ok),
            r("c", "hi\n", Outcome::Ok),
            r("d", "hi\n", Outcome::Failed(2)),
        ]);
        assert_eq!(
            out,
            "----------------\na,c (2)\n----------------\nhi\n\
             ----------------\nb (1)\n----------------\nho\n\
             ----------------\nd (1, exit 2)\n----------------\nhi\n"
        );
        assert_eq!(err, "");
    }
}
