//! Exec channels on an SSH session: a pump per channel moves stdout and stderr to their own
//! bounded queues, control requests (signal, window change, close) to the server, and the exit
//! status (or the lack of one) into the status future.
//!
//! The non-obvious part: once we have sent our close, russh drops whatever the server sends on
//! the channel, its close included, so our close is confirmed by a ping's answer instead.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Result;
use bytes::Bytes;
use futures::future::BoxFuture;
use russh::client::Msg;
use russh::{Channel, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Sig};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::channel::{Closed, Outgoing};
use super::SshError;
use crate::link::{Control, ControlMsg, ExecChannel, ExitStatus};

/// Start an exec channel's pump and hand out its parts. `round_trip` is polled after our close
/// is queued, to learn that it reached the server.
pub(super) fn channel(
    channel: Channel<Msg>,
    host: &str,
    round_trip: BoxFuture<'static, ()>,
) -> ExecChannel {
    let writer = Box::pin(channel.make_writer());
    let (rd, wr) = channel.split();
    let (out_tx, out_rx) = output();
    let (err_tx, err_rx) = output();
    let (status_tx, status_rx) = oneshot::channel();
    let (control, requests) = Control::new();
    let closed = Arc::new(Closed::new(host));
    let outputs = Outputs {
        stdout: Some(out_tx),
        stderr: Some(err_tx),
    };
    tokio::spawn(pump_exec(
        rd,
        wr,
        outputs,
        status_tx,
        requests,
        closed.clone(),
        round_trip,
    ));
    let host = host.to_string();
    ExecChannel {
        stdin: Box::new(Outgoing { writer, closed }),
        stdout: Box::new(out_rx),
        stderr: Box::new(err_rx),
        status: Box::pin(async move {
            status_rx.await.unwrap_or_else(|_| {
                Err(SshError::ConnectionLost(format!("the channel to {host} vanished")).into())
            })
        }),
        control,
    }
}

/// Bytes one output stream may hold between the pump and its reader. Counted in bytes, not
/// chunks, so a reader that stalls one stream leaves the other this much room whatever size the
/// server's packets are (the pump reads the channel in order: a full stream stops both).
const STREAM_BUDGET: u32 = 4 << 20;
/// What a chunk costs at least, so a flood of tiny packets is bounded in memory too.
const CHUNK_COST: usize = 256;

fn cost(data: &Bytes) -> u32 {
    // Chunks are at most one SSH packet (64 KiB), far below u32::MAX.
    data.len().max(CHUNK_COST).min(STREAM_BUDGET as usize) as u32
}

/// The pump's end of one output stream.
struct OutputTx {
    tx: mpsc::UnboundedSender<Bytes>,
    room: Arc<Semaphore>,
}

/// The reader's end: gives the budget back as it takes chunks; dropping it tells the pump to
/// discard that stream from then on.
struct OutputRx {
    rx: mpsc::UnboundedReceiver<Bytes>,
    room: Arc<Semaphore>,
    pending: Bytes,
}

fn output() -> (OutputTx, OutputRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let room = Arc::new(Semaphore::new(STREAM_BUDGET as usize));
    let rx = OutputRx {
        rx,
        room: room.clone(),
        pending: Bytes::new(),
    };
    (OutputTx { tx, room }, rx)
}

impl Drop for OutputRx {
    fn drop(&mut self) {
        self.room.close();
    }
}

impl AsyncRead for OutputRx {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.pending.is_empty() {
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(b)) => {
                    self.room.add_permits(cost(&b) as usize);
                    self.pending = b;
                }
            }
        }
        let n = self.pending.len().min(buf.remaining());
        let chunk = self.pending.split_to(n);
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

/// An exec channel's two output streams; a side whose reader went away is dropped and its data
/// discarded, so the other side and the control requests keep moving.
struct Outputs {
    stdout: Option<OutputTx>,
    stderr: Option<OutputTx>,
}

impl Outputs {
    async fn send(side: &mut Option<OutputTx>, data: Bytes) {
        let Some(out) = side else { return };
        if data.is_empty() {
            return;
        }
        let sent = match out.room.acquire_many(cost(&data)).await {
            Ok(permit) => {
                permit.forget();
                out.tx.send(data).is_ok()
            }
            Err(_) => false,
        };
        if !sent {
            *side = None;
        }
    }
}

/// Moves an exec channel's messages to its output queues and its control requests to the
/// server, until the channel closes; then resolves the status. The outputs end first, so a
/// reader has all the data by the time the status arrives.
///
/// Once we have sent our close, russh drops whatever the server sends on the channel, its close
/// included: a close of ours is confirmed by a ping's answer instead, and ends the pump.
#[allow(clippy::too_many_arguments)]
async fn pump_exec(
    mut rd: ChannelReadHalf,
    wr: ChannelWriteHalf<Msg>,
    mut out: Outputs,
    status_tx: oneshot::Sender<Result<ExitStatus>>,
    mut requests: mpsc::Receiver<ControlMsg>,
    closed: Arc<Closed>,
    round_trip: BoxFuture<'static, ()>,
) {
    let mut status = None;
    let mut refused = false;
    let mut close_ack = None;
    let mut lost = false;
    loop {
        tokio::select! {
            msg = rd.wait() => match msg {
                Some(ChannelMsg::Data { data }) => Outputs::send(&mut out.stdout, data).await,
                Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                    Outputs::send(&mut out.stderr, data).await
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    status = Some(ExitStatus::Code(exit_status));
                }
                Some(ChannelMsg::ExitSignal { signal_name, core_dumped, .. }) => {
                    let name = match signal_name {
                        Sig::Custom(name) => name.trim_start_matches("SIG").to_string(),
                        other => format!("{other:?}"),
                    };
                    status = Some(ExitStatus::Signal { name, core_dumped });
                }
                // The only request sent with want-reply is the exec (or shell) itself.
                Some(ChannelMsg::Failure) if status.is_none() => {
                    refused = true;
                    break;
                }
                Some(ChannelMsg::Eof) => {
                    out.stdout = None;
                    out.stderr = None;
                }
                Some(ChannelMsg::Close) => break,
                None => {
                    lost = true;
                    break;
                }
                Some(_) => {}
            },
            Some(req) = requests.recv() => match req {
                ControlMsg::Signal(name) => {
                    let _ = wr.signal(sig(&name)).await;
                }
                ControlMsg::Resize { cols, rows } => {
                    let _ = wr.window_change(cols, rows, 0, 0).await;
                }
                ControlMsg::Close(ack) => {
                    let _ = wr.close().await;
                    round_trip.await;
                    close_ack = Some(ack);
                    break;
                }
            },
        }
    }
    closed.set();
    drop(out);
    // A channel that ends without a status (the link died, keepalives went unanswered) is a
    // lost connection, never a success.
    let result = match (status, refused) {
        (_, true) => {
            Err(SshError::Protocol("the server refused to start the command".into()).into())
        }
        (Some(st), _) => Ok(st),
        (None, _) => Err(SshError::ConnectionLost(
            "the remote command's exit status never arrived".into(),
        )
        .into()),
    };
    let _ = status_tx.send(result);
    match close_ack {
        Some(ack) => {
            let _ = ack.send(());
        }
        None if !lost => {
            let _ = wr.close().await;
        }
        None => {}
    }
}

/// russh's name for a signal (named without `SIG`).
fn sig(name: &str) -> Sig {
    match name {
        "ABRT" => Sig::ABRT,
        "ALRM" => Sig::ALRM,
        "FPE" => Sig::FPE,
        "HUP" => Sig::HUP,
        "ILL" => Sig::ILL,
        "INT" => Sig::INT,
        "KILL" => Sig::KILL,
        "PIPE" => Sig::PIPE,
        "QUIT" => Sig::QUIT,
        "SEGV" => Sig::SEGV,
        "TERM" => Sig::TERM,
        "USR1" => Sig::USR1,
        other => Sig::Custom(other.to_string()),
    }
}
