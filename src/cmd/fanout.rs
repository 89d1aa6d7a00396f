//! The command side of fan-out: VM lists to targets, one runtime, the closing summary, the
//! `--failed` file and the exit status (see [`crate::fanout`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::cli::FanoutArgs;
use crate::fanout::exec::{exec_all, FanoutExec, Show};
use crate::fanout::output::{Lines, Stream};
use crate::fanout::{self, Target, VmResult};
use crate::link::{Connector, ExecRequest};
use crate::mux::MuxConnector;
use crate::settings::Settings;

/// The VMs an operand (and `--hosts`) names, each resolved as a single VM operand would be.
pub fn targets(
    settings: &Settings,
    operand: Option<&str>,
    hosts: Option<&Path>,
) -> Result<Vec<Target>> {
    let names = fanout::names(operand, hosts, || {
        Ok(crate::vers::names::load_aliases()?.into_keys().collect())
    })?;
    names
        .into_iter()
        .map(|label| {
            let host = settings.host(&label)?;
            Ok(Target { label, host })
        })
        .collect()
}

/// The fan-out settings from the flags.
pub fn limits(fa: &FanoutArgs) -> Result<(usize, Option<std::time::Duration>)> {
    if fa.fanout == 0 {
        anyhow::bail!("--fanout must be at least 1");
    }
    let timeout = fa
        .timeout
        .map(|t| super::seconds(t, "--timeout"))
        .transpose()?;
    Ok((fa.fanout, timeout))
}

/// `vtun exec LIST -- CMD`.
pub fn exec(
    settings: &Settings,
    operand: Option<&str>,
    fa: &FanoutArgs,
    request: ExecRequest,
    show: Show,
    broadcast_stdin: bool,
) -> Result<u8> {
    let targets = targets(settings, operand, fa.hosts.as_deref())?;
    let (fanout, timeout) = limits(fa)?;
    let stdin = if broadcast_stdin {
        if fa.hosts.as_deref() == Some(Path::new("-")) {
            anyhow::bail!("--stdin cannot be used with --hosts - (stdin is the VM list)");
        }
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("cannot read stdin")?;
        Some(bytes::Bytes::from(buf))
    } else {
        None
    };
    fanout::raise_fd_limit();
    let started = Instant::now();
    let connector: Arc<dyn Connector> = Arc::new(MuxConnector::reuse_only(settings.clone()));
    let results = super::Runtime::MultiThread.block_on(async move {
        let (lines, writer) = Lines::start(tokio::io::stdout(), tokio::io::stderr());
        let opts = FanoutExec {
            request,
            fanout,
            timeout,
            show,
            stdin,
        };
        let results = exec_all(connector, targets, opts, lines).await;
        let _ = writer.await;
        Ok(results)
    })?;
    if show == Show::Gather {
        let (out, err) = fanout::output::gather(&results);
        eprint!("{err}");
        super::print_stdout(&out)?;
    }
    finish(&results, fa, started, settings.quiet)
}

/// The summary (with more than one VM), the `--failed` file and the exit status.
pub fn finish(results: &[VmResult], fa: &FanoutArgs, started: Instant, quiet: bool) -> Result<u8> {
    if let Some(file) = &fa.failed {
        fanout::write_failed(file, results)?;
    }
    let status = fanout::exit_status(results);
    if results.len() > 1 && !(quiet && status == 0) {
        eprintln!(
            "{}",
            fanout::summary(results, started.elapsed().as_secs_f64())
        );
    }
    Ok(status)
}

/// Where a VM list stands among cp or sync operands: `LIST:PATH`, or `:PATH` with `--hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListOperand {
    /// Which operand it is.
    pub index: usize,
    /// The list as written (`None`: the `--hosts` file's).
    pub list: Option<String>,
    pub path: String,
}

/// Find the one operand that names several VMs, if any.
pub fn list_operand(paths: &[String], hosts: bool) -> Result<Option<ListOperand>> {
    let mut found = Vec::new();
    for (index, p) in paths.iter().enumerate() {
        let Some(colon) = p.find(':') else { continue };
        if p[..colon].contains('/') {
            continue;
        }
        let (host, path) = (&p[..colon], &p[colon + 1..]);
        if host.is_empty() && hosts {
            found.push(ListOperand {
                index,
                list: None,
                path: path.to_string(),
            });
        } else if fanout::is_list(host) {
            found.push(ListOperand {
                index,
                list: Some(host.to_string()),
                path: path.to_string(),
            });
        }
    }
    match found.len() {
        0 if hosts => anyhow::bail!("with --hosts, write the VMs' side as :PATH (e.g. :/srv/app)"),
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => anyhow::bail!("only one operand can name several VMs"),
    }
}

/// Run `work` once per VM of `list` (the operand replaced by `NAME:PATH`, and for a pull the
/// destination by `DIR/NAME`), each VM's output lines prefixed with its name.
pub fn each_vm<F, Fut>(
    settings: &Settings,
    paths: &[String],
    list: ListOperand,
    fa: &FanoutArgs,
    work: F,
) -> Result<u8>
where
    F: Fn(Settings, Vec<String>, Arc<MuxConnector>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = (Result<u8>, Vec<u8>)> + 'static,
{
    let targets = targets(settings, list.list.as_deref(), fa.hosts.as_deref())?;
    let (fanout, timeout) = limits(fa)?;
    let last = paths.len() - 1;
    let pull = list.index != last;
    if pull && last != 1 {
        anyhow::bail!("a copy from several VMs takes one source (VMS:PATH DIR)");
    }
    if pull
        && paths[last].contains(':')
        && !paths[last][..paths[last].find(':').unwrap_or(0)].contains('/')
    {
        anyhow::bail!(
            "a copy from several VMs goes into a local directory (one subdirectory per VM)"
        );
    }
    if pull {
        if let Some(t) = targets
            .iter()
            .find(|t| t.label.contains('/') || t.label == "." || t.label == "..")
        {
            anyhow::bail!(
                "{:?} cannot name a directory (a copy from several VMs writes DIR/NAME/)",
                t.label
            );
        }
    }
    fanout::raise_fd_limit();
    let started = Instant::now();
    // Progress bars for many VMs at once would be noise: the summary says what happened.
    let quiet = Settings {
        quiet: true,
        ..settings.clone()
    };
    let connector = Arc::new(MuxConnector::reuse_only(quiet.clone()));
    let (paths, work) = (paths.to_vec(), Arc::new(work));
    let results = super::Runtime::MultiThread.block_on(async move {
        let (lines, writer) = Lines::start(tokio::io::stdout(), tokio::io::stderr());
        let results = fanout::run_all(targets, fanout, |t, pacer| {
            let (lines, work, connector, quiet) = (
                lines.clone(),
                work.clone(),
                connector.clone(),
                quiet.clone(),
            );
            let mut argv = paths.clone();
            argv[list.index] = format!("{}:{}", t.label, list.path);
            let dir = pull.then(|| std::path::PathBuf::from(&paths[last]).join(&t.label));
            if let Some(d) = &dir {
                argv[last] = d.display().to_string();
            }
            async move {
                let t0 = Instant::now();
                let run = async {
                    if let Some(d) = &dir {
                        if let Err(e) = tokio::fs::create_dir_all(d).await {
                            return (
                                Err(anyhow::Error::new(e)
                                    .context(format!("cannot create {}", d.display()))),
                                Vec::new(),
                            );
                        }
                    }
                    // Connected here, paced, so that a VM that cannot be reached is told apart
                    // from one lost mid-way; `work` then finds the session in the connector.
                    if let Err(e) = pacer.connect(connector.connect(&t.host)).await {
                        return (Err(Unreachable(e).into()), Vec::new());
                    }
                    // The cp and sync engines' futures are not Send, so each VM's runs on a
                    // blocking thread of its own; what they spawn still uses the workers.
                    // Dropping `_stop` (at --timeout) drops the VM's work there too.
                    let rt = tokio::runtime::Handle::current();
                    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
                    let job = move || {
                        rt.block_on(async move {
                            tokio::select! {
                                r = work(quiet, argv, connector) => Some(r),
                                _ = stopped => None,
                            }
                        })
                    };
                    match tokio::task::spawn_blocking(job).await {
                        Ok(Some(r)) => r,
                        Ok(None) => (Err(crate::error::Failure::TimedOut.into()), Vec::new()),
                        Err(e) => (Err(anyhow::anyhow!("internal error: {e}")), Vec::new()),
                    }
                };
                let (r, out) = match timeout {
                    Some(limit) => tokio::time::timeout(limit, run).await.unwrap_or_else(|_| {
                        (Err(crate::error::Failure::TimedOut.into()), Vec::new())
                    }),
                    None => run.await,
                };
                let outcome = match r
                    .as_ref()
                    .err()
                    .and_then(|e| e.downcast_ref::<Unreachable>())
                {
                    Some(u) => fanout::Outcome::Unreachable(format!("{:#}", u.0)),
                    None => fanout::Outcome::of(&r),
                };
                let prefix = format!("{}: ", t.label);
                let mut text = Vec::new();
                for line in out.split_inclusive(|&b| b == b'\n') {
                    // A --json summary stays JSON: the VM's name goes inside the object.
                    if let Ok(serde_json::Value::Object(mut o)) = serde_json::from_slice(line) {
                        o.insert("name".into(), t.label.clone().into());
                        text.extend_from_slice(serde_json::Value::Object(o).to_string().as_bytes());
                        text.push(b'\n');
                        continue;
                    }
                    text.extend_from_slice(prefix.as_bytes());
                    text.extend_from_slice(line);
                    if !line.ends_with(b"\n") {
                        text.push(b'\n');
                    }
                }
                if !text.is_empty() {
                    lines.write(Stream::Out, text).await;
                }
                if let Err(e) = &r {
                    let msg: String = match e.downcast_ref::<crate::sync::Partial>() {
                        Some(p) => p
                            .lines()
                            .iter()
                            .map(|l| format!("{prefix}vtun: {l}\n"))
                            .collect(),
                        None => format!("{prefix}vtun: {e:#}\n"),
                    };
                    lines.write(Stream::Err, msg.into_bytes()).await;
                }
                VmResult {
                    label: t.label,
                    outcome,
                    seconds: t0.elapsed().as_secs_f64(),
                    stdout: Vec::new(),
                    stderr: Vec::new(),
                }
            }
        })
        .await;
        drop(lines);
        let _ = writer.await;
        Ok(results)
    })?;
    finish(&results, fa, started, settings.quiet)
}

/// A VM's connection could not be made (the rest of its run never started).
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
struct Unreachable(anyhow::Error);
