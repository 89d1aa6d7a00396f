//! `vtun agent`: serves a [`LocalEndpoint`] over stdin/stdout for a `vtun sync` on another machine.
//!
//! It is the same binary as the client, started through an exec channel by `vtun sync`, and it
//! does exactly what the in-process local endpoint does, so both directions behave alike. With
//! `VTUN_AGENT_PROBE=1` in its environment it only prints its protocol version and exits, which
//! is how discovery checks that a `vtun` found on the remote PATH speaks our protocol.
//!
//! Every reply is kept within its message kind's limit whatever the tree: a listing goes out
//! in parts, signatures beyond `MAX_SIG` in all are left out (those files go whole), and a
//! receive report with more failures than its frame holds is summed up.

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::mpsc;

use super::protocol::{hello, read_msg, write_listing, write_msg, Msg, MAX_SIG, PROTO};
use crate::sync::endpoint::{Endpoint, Piece, RecvReport};
use crate::sync::listing::RelPath;
use crate::sync::local::LocalEndpoint;

/// The line `VTUN_AGENT_PROBE=1 vtun agent` prints.
pub fn probe_line() -> String {
    format!("vtun-agent-proto {PROTO}")
}

/// Serve one client until it closes the stream.
pub async fn serve<R, W>(r: R, w: W) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut r = BufReader::with_capacity(256 * 1024, r);
    let mut w = BufWriter::with_capacity(256 * 1024, w);
    w.write_all(&hello()).await?;
    w.flush().await?;
    let mut theirs = [0u8; 16];
    r.read_exact(&mut theirs)
        .await
        .context("no handshake from client")?;
    if theirs != hello() {
        bail!("client does not speak agent protocol {PROTO}");
    }
    let mut ep: Option<LocalEndpoint> = None;
    while let Some((msg, _)) = read_msg(&mut r).await? {
        if let Msg::Root(root) = msg {
            ep = Some(LocalEndpoint::new(root));
            continue;
        }
        let Some(ep) = ep.as_mut() else {
            bail!("request before the root was set");
        };
        let reply = match msg {
            Msg::List(opts) => match ep.list(opts).await {
                Ok(l) => {
                    write_listing(&mut w, &l.entries, l.root_exists).await?;
                    w.flush().await?;
                    continue;
                }
                Err(e) => Err(e),
            },
            Msg::Signatures(paths) => ep.signatures(paths).await.map(|s| Msg::Sigs(within(s))),
            Msg::Apply(ops) => ep.apply(ops).await.map(Msg::Applied),
            Msg::Send(reqs) => {
                let (tx, rx) = mpsc::channel(16);
                let (sent, fwd) = tokio::join!(ep.send(reqs, tx), forward(rx, &mut w));
                fwd?;
                sent.map(|_| Msg::SendDone)
            }
            Msg::RecvBegin => {
                let (tx, rx) = mpsc::channel(16);
                let (report, fed) = tokio::join!(ep.receive(rx), feed(&mut r, tx));
                fed?;
                report.map(|r| Msg::RecvDone(fit(r)))
            }
            other => bail!("unexpected request {other:?}"),
        };
        let reply = reply.unwrap_or_else(|e| Msg::Error(error_text(&e)));
        write_msg(&mut w, &reply).await?;
        w.flush().await?;
    }
    Ok(())
}

/// Signatures that fit one reply: beyond [`MAX_SIG`] bytes in all, the rest become `None`, so
/// those files are sent whole rather than the reply being too big to send.
fn within(sigs: Vec<Option<Vec<u8>>>) -> Vec<Option<Vec<u8>>> {
    let mut left = MAX_SIG;
    sigs.into_iter()
        .map(|s| match s {
            Some(s) if s.len() <= left => {
                left -= s.len();
                Some(s)
            }
            _ => None,
        })
        .collect()
}

/// A receive report that fits its reply however many files failed: deltas past what the reply
/// has room for are reported as failed (not retried), and failures past that are summed up in
/// one entry. Either way the run is reported partial.
fn fit(mut r: RecvReport) -> RecvReport {
    const ROOM: usize = 12 << 20;
    let size = |p: &RelPath| p.as_str().len() + 8;
    let mut used = 0;
    let keep = r
        .mismatched
        .iter()
        .take_while(|p| {
            used += size(p);
            used <= ROOM
        })
        .count();
    for p in r.mismatched.split_off(keep) {
        r.failed
            .push((p, "its delta did not apply; sync again".into()));
    }
    let keep = r
        .failed
        .iter()
        .take_while(|(p, m)| {
            used += size(p) + m.len() + 8;
            used <= 2 * ROOM
        })
        .count();
    let more = r.failed.len() - keep;
    if more > 0 {
        r.failed.truncate(keep);
        let why = format!("and {more} more files could not be written");
        r.failed.push((RelPath::root(), why));
    }
    r
}

/// An error for the client: one line, cut to a length any reply has room for.
fn error_text(e: &anyhow::Error) -> String {
    let s = format!("{e:#}").replace('\n', " ");
    match s.char_indices().nth(4000) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// Write the pieces a local send produces to the client. Owning `rx` matters: if the client is
/// gone, dropping it stops the sender instead of leaving it blocked on a full channel.
async fn forward<W: AsyncWrite + Unpin>(mut rx: mpsc::Receiver<Piece>, w: &mut W) -> Result<()> {
    while let Some(p) = rx.recv().await {
        write_msg(w, &Msg::Piece(p)).await?;
    }
    Ok(())
}

/// Feed the client's pieces to the local receiver until `RecvEnd`. Returning drops `tx`, which
/// ends the receiver; a file cut off mid-stream is then discarded, never renamed into place.
async fn feed<R: AsyncRead + Unpin>(r: &mut R, tx: mpsc::Sender<Piece>) -> Result<()> {
    loop {
        let (m, _) = read_msg(r)
            .await?
            .context("client went away mid-transfer")?;
        match m {
            Msg::Piece(p) => {
                if tx.send(p).await.is_err() {
                    bail!("receiver stopped");
                }
            }
            Msg::RecvEnd => return Ok(()),
            other => bail!("unexpected {other:?} during transfer"),
        }
    }
}

// Tests only: unwrap on values the test itself built (in-memory data, temp files, local
// processes), where a failure is the test failing.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Signatures past `MAX_SIG` in all are left out (those files go whole), in order.
    #[test]
    fn signatures_beyond_the_reply_budget_become_none() {
        let big = Some(vec![0u8; MAX_SIG / 2 + 1]);
        let got = within(vec![big.clone(), None, big.clone(), Some(vec![1; 10])]);
        assert_eq!(got, vec![big, None, None, Some(vec![1; 10])]);
    }

    /// However many files failed, the report the agent sends fits a `RecvDone` frame.
    #[tokio::test]
    async fn a_huge_receive_report_still_fits_its_frame() {
        let p = |i: usize| RelPath::parse(&format!("{}/{i}", "d".repeat(200))).unwrap();
        let r = RecvReport {
            files: 1,
            bytes: 2,
            mismatched: (0..100_000).map(p).collect(),
            failed: (0..200_000).map(|i| (p(i), "x".repeat(100))).collect(),
        };
        let r = fit(r);
        let n = write_msg(&mut Vec::new(), &Msg::RecvDone(r.clone()))
            .await
            .unwrap();
        assert!(n < 32 << 20, "{n}");
        assert!(r.mismatched.len() < 100_000);
        let last = &r.failed.last().unwrap().1;
        assert!(last.contains("more files could not be written"), "{last}");
        // A small report is untouched.
        let small = RecvReport {
            files: 1,
            bytes: 2,
            mismatched: vec![p(1)],
            failed: vec![(p(2), "no".into())],
        };
        assert_eq!(fit(small.clone()), small);
    }
}
