//! `vtun exec LIST -- CMD`: one command on every VM of a list.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::output::{json_line, Kept, Lines, Stream};
use super::{run_all, Outcome, Target, VmResult};
use crate::exec::Stdio;
use crate::link::{Connector, ExecRequest};

/// How results are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    /// Each line as it arrives, prefixed `NAME: `.
    Lines,
    /// At the end, VMs with identical output grouped (`--gather`).
    Gather,
    /// One JSON object per VM, as each finishes (`--json`).
    Json,
}

pub struct FanoutExec {
    pub request: ExecRequest,
    pub fanout: usize,
    pub timeout: Option<Duration>,
    pub show: Show,
    /// Sent to every VM's command (`--stdin`); `None`: each gets an immediate EOF.
    pub stdin: Option<Bytes>,
}

/// Run `opts.request` on every target; what is printed goes through `lines`.
pub async fn exec_all(
    connector: Arc<dyn Connector>,
    targets: Vec<Target>,
    opts: FanoutExec,
    lines: Lines,
) -> Vec<VmResult> {
    let opts = Arc::new(opts);
    run_all(targets, opts.fanout, move |t, pacer| {
        let (connector, opts, lines) = (connector.clone(), opts.clone(), lines.clone());
        async move {
            let started = Instant::now();
            let deadline = super::deadline(opts.timeout);
            let kept = (Kept::default(), Kept::default());
            let stdin: Box<dyn tokio::io::AsyncRead + Send + Unpin> = match &opts.stdin {
                Some(b) => Box::new(std::io::Cursor::new(b.clone())),
                None => Box::new(tokio::io::empty()),
            };
            let io = match opts.show {
                Show::Lines => Stdio {
                    stdin,
                    stdout: Box::new(lines.prefixed(&t.label, Stream::Out)),
                    stderr: Box::new(lines.prefixed(&t.label, Stream::Err)),
                },
                Show::Gather | Show::Json => Stdio {
                    stdin,
                    stdout: Box::new(kept.0.clone()),
                    stderr: Box::new(kept.1.clone()),
                },
            };
            let connect = pacer.connect(connector.connect(&t.host));
            let link = match deadline {
                Some(at) => tokio::time::timeout_at(at, connect).await.ok(),
                None => Some(connect.await),
            };
            let outcome = match link {
                None => Outcome::TimedOut,
                Some(Err(e)) => Outcome::Unreachable(format!("{e:#}")),
                Some(Ok(link)) => {
                    let r =
                        crate::exec::run_until(link.as_ref(), opts.request.clone(), io, deadline)
                            .await;
                    Outcome::of(&r)
                }
            };
            let r = VmResult {
                label: t.label.clone(),
                outcome,
                seconds: started.elapsed().as_secs_f64(),
                stdout: kept.0.take(),
                stderr: kept.1.take(),
            };
            match opts.show {
                Show::Lines => {
                    if let Some(e) = r.outcome.error() {
                        let line = format!("{}: vtun: {e}\n", t.label);
                        lines.write(Stream::Err, line.into_bytes()).await;
                    }
                }
                Show::Json => lines.write(Stream::Out, json_line(&r).into_bytes()).await,
                Show::Gather => {}
            }
            r
        }
    })
    .await
}
