//! `vtun sync`: rsync-style sync with delta transfer.
//!
//! The pieces: `pattern` (exclude rules), `listing` (walks and listings), `plan` (what to change),
//! `endpoint` (one interface for both sides), `local` (a directory on this machine), `sftp` (a
//! remote root over plain SFTP, when no agent can run), `engine` (runs a plan between two
//! endpoints). The remote side with an agent is `crate::agent`; file contents move as deltas
//! made by `crate::delta`; writes go through `crate::fs`.
//!
//! A run that syncs all it can but not everything fails with [`Partial`], which `vtun sync`
//! turns into rsync's exit status: 23 when some entries failed, 24 when the only failures were
//! source files that vanished before they could be sent.
//!
//! Environment variables, all testing and debugging aids: `VTUN_AGENT_PATH` (client side) names
//! an agent executable the remote discovery script tries first; `VTUN_AGENT_BINARY` (client side)
//! is the file uploaded when the remote has no agent (default: this executable);
//! `VTUN_AGENT_PROBE=1 vtun agent` prints the agent protocol version and exits.

pub mod endpoint;
pub mod engine;
pub mod listing;
pub mod local;
pub mod pattern;
pub mod plan;
pub mod sftp;
pub mod write;

use std::io::Write;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::link::Connector;
use crate::settings::Settings;
use crate::target::Location;
use endpoint::Endpoint;
use engine::{EngineOpts, Summary};
use listing::RelPath;

/// What `vtun sync` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    /// Source and destination operands as the user wrote them.
    pub src: String,
    pub dst: String,
    pub dry_run: bool,
    pub delete: bool,
    pub delete_excluded: bool,
    pub exclude: Vec<String>,
    pub exclude_from: Vec<std::path::PathBuf>,
    pub checksum: bool,
    pub size_only: bool,
    /// Print rsync-style change lines.
    pub itemize: bool,
    pub no_agent: bool,
    /// Agent channels per side for file contents.
    pub parallel: usize,
    pub json: bool,
}

/// A run that synced everything it could, but not everything. `code` is
/// [`engine::EXIT_PARTIAL`] (23), or [`engine::EXIT_VANISHED`] (24) when the only failures were
/// source files that vanished before they could be sent. The command layer prints one line per
/// entry in `failed`, then this.
#[derive(Debug, thiserror::Error)]
#[error("{} entries could not be synced (partial sync, exit status {code})", failed.len())]
pub struct Partial {
    /// Each entry that failed, and why.
    pub failed: Vec<(String, String)>,
    pub code: u8,
}

impl Partial {
    /// The lines to print: one per failed entry, then the count.
    pub fn lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .failed
            .iter()
            .map(|(path, why)| format!("sync: {path}: {why}"))
            .collect();
        v.push(self.to_string());
        v
    }
}

/// `vtun sync`: itemized changes (with `-i` or `-n`) and the `--json` summary go to `out`;
/// a [`Partial`] error when any entry could not be synced (after syncing the rest).
pub async fn run_sync(
    settings: &Settings,
    args: &SyncOptions,
    connector: &dyn Connector,
    out: &mut (dyn Write + Send),
) -> Result<Summary> {
    let src = settings.location(&args.src)?;
    let dst = settings.location(&args.dst)?;
    let any_remote = [&src, &dst]
        .iter()
        .any(|l| matches!(l, Location::Remote { .. }));
    if args.no_agent && args.checksum && any_remote {
        bail!("-c/--checksum needs the sync agent; with --no-agent it would mean downloading every file");
    }
    let (src_root, start) = split_source(operand_path(&src))?;
    let dst_root = match operand_path(&dst) {
        "" => ".".to_string(),
        p => p.to_string(),
    };
    let excludes = pattern::Excludes::from_args(&args.exclude, &args.exclude_from)?;
    let opts = EngineOpts {
        plan: plan::PlanOpts {
            checksum: args.checksum,
            size_only: args.size_only,
            delete: args.delete || args.delete_excluded,
            mtime_seconds: false,
            keep_excluded: false,
        },
        dry_run: args.dry_run,
        excludes: excludes.patterns().to_vec(),
        delete_excluded: args.delete_excluded,
        start,
        parallel: args.parallel.max(1),
    };
    let (mut s, mut d) = futures::try_join!(
        open(&src, src_root, connector, args.no_agent),
        open(&dst, dst_root, connector, args.no_agent)
    )?;
    let show = args.itemize || args.dry_run;
    let mut io_err = None;
    let mut emit = |line: &str| {
        if show && io_err.is_none() {
            if let Err(e) = writeln!(out, "{line}") {
                io_err = Some(e);
            }
        }
    };
    let summary = engine::run(s.as_mut(), d.as_mut(), &opts, &mut emit).await?;
    if let Some(e) = io_err {
        return Err(e).context("cannot write to stdout");
    }
    if args.json {
        let j = serde_json::json!({
            "files": summary.files,
            "bytes": summary.bytes,
            "bytes_on_wire": summary.wire,
            "seconds": summary.seconds,
            "changes": summary.changes.len(),
            "failed": summary.failed.len(),
        });
        writeln!(out, "{j}").context("cannot write to stdout")?;
    }
    out.flush().ok();
    if !summary.failed.is_empty() {
        return Err(Partial {
            code: summary.exit_code(),
            failed: summary
                .failed
                .iter()
                .map(|(path, why)| (path.to_string(), why.to_string()))
                .collect(),
        }
        .into());
    }
    Ok(summary)
}

fn operand_path(l: &Location) -> &str {
    match l {
        Location::Local(p) => p.to_str().unwrap_or(""),
        Location::Remote { path, .. } => {
            // The agent runs in the home directory, so `~/x` is `x`.
            let p = path.as_str();
            if p == "~" {
                "."
            } else {
                p.strip_prefix("~/").unwrap_or(p)
            }
        }
    }
}

/// rsync's trailing-slash rule: `dir/` (or `.`) syncs the contents of dir, `dir` syncs dir itself
/// into the destination. Returns the root to open and the start below it.
pub fn split_source(path: &str) -> Result<(String, RelPath)> {
    if path.is_empty() {
        bail!("empty source path");
    }
    let contents = path.ends_with('/')
        || path == "."
        || path == ".."
        || path.ends_with("/.")
        || path.ends_with("/..");
    if contents {
        return Ok((path.to_string(), RelPath::root()));
    }
    let (parent, name) = match path.rsplit_once('/') {
        Some(("", name)) => ("/", name),
        Some((parent, name)) => (parent, name),
        None => (".", path),
    };
    let start = RelPath::parse(name).with_context(|| format!("bad source path {path:?}"))?;
    Ok((parent.to_string(), start))
}

/// Open one side: a local directory, the agent on a host, or (with `no_agent`, or when no agent
/// can be found or uploaded) plain SFTP to it.
async fn open(
    loc: &Location,
    root: String,
    connector: &dyn Connector,
    no_agent: bool,
) -> Result<Box<dyn Endpoint>> {
    let host = match loc {
        Location::Local(_) => return Ok(Box::new(local::LocalEndpoint::new(root))),
        Location::Remote { host, .. } => host,
    };
    let opener: Arc<dyn crate::link::Link> = connector.connect(host).await?;
    if !no_agent {
        match crate::agent::AgentEndpoint::start(&opener, &root).await {
            Ok(ep) => return Ok(Box::new(ep)),
            Err(e) => {
                // Whatever kept the agent away (another platform, no shell, a failed upload),
                // SFTP may still work; if the connection itself is gone, opening it says so.
                let why = format!("{e:#}").replace('\n', " ");
                eprintln!(
                    "vtun: no sync agent on {} ({why}); copying whole files over SFTP",
                    opener.name()
                );
            }
        }
    }
    let ep = sftp::SftpEndpoint::open(opener.clone(), &root)
        .await
        .with_context(|| format!("cannot sync with {} over SFTP", opener.name()))?;
    Ok(Box::new(ep))
}

// Tests only: unwrap on values the test itself built (in-memory data, temp files, local
// processes), where a failure is the test failing.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn trailing_slash_means_contents() {
        assert_eq!(
            split_source("a/b/").unwrap(),
            ("a/b/".into(), RelPath::root())
        );
        assert_eq!(split_source(".").unwrap(), (".".into(), RelPath::root()));
        assert_eq!(
            split_source("a/b").unwrap(),
            ("a".into(), RelPath::parse("b").unwrap())
        );
        assert_eq!(
            split_source("b").unwrap(),
            (".".into(), RelPath::parse("b").unwrap())
        );
        assert_eq!(
            split_source("/b").unwrap(),
            ("/".into(), RelPath::parse("b").unwrap())
        );
        assert!(split_source("").is_err());
    }
}
