//! Run a sync between two endpoints: list both, plan, then carry the plan out in a fixed number
//! of batched phases (deletes and directories, file contents, links and metadata), so the number
//! of round trips does not grow with the number of files.

use std::time::Instant;

use anyhow::{bail, Result};
use tokio::sync::mpsc;

use super::endpoint::{Endpoint, Op, RecvReport, SendReq};
use super::plan::{itemize, plan, Action, PlanOpts};
use super::tree::{Kind, ListOpts, RelPath};

#[derive(Debug, Clone, Default)]
pub struct EngineOpts {
    pub plan: PlanOpts,
    pub dry_run: bool,
    pub excludes: Vec<String>,
    pub delete_excluded: bool,
    /// What to sync below both roots (SRC's basename, or the root itself for `SRC/`).
    pub start: RelPath,
}

#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Files whose content was sent.
    pub files: u64,
    /// Their size.
    pub bytes: u64,
    /// Bytes both endpoints moved over their connections.
    pub wire: u64,
    pub seconds: f64,
    /// Itemized changes (planned, for a dry run).
    pub changes: Vec<String>,
    /// Entries that could not be synced, with the reason.
    pub failed: Vec<(String, String)>,
}

/// Sync `src` into `dst`. `emit` gets each itemize line as soon as the plan is known.
pub async fn run(
    src: &mut dyn Endpoint,
    dst: &mut dyn Endpoint,
    o: &EngineOpts,
    emit: &mut (dyn FnMut(&str) + Send),
) -> Result<Summary> {
    let t0 = Instant::now();
    let hashes = o.plan.checksum;
    let src_opts = ListOpts {
        start: o.start.clone(),
        hashes,
        excludes: o.excludes.clone(),
        clean_temps: false,
    };
    let dst_opts = ListOpts {
        start: o.start.clone(),
        hashes,
        // Excluded destination entries are invisible, hence kept, unless --delete-excluded.
        excludes: if o.delete_excluded {
            Vec::new()
        } else {
            o.excludes.clone()
        },
        clean_temps: !o.dry_run,
    };
    let (sl, dl) = futures::try_join!(src.list(src_opts), dst.list(dst_opts))?;
    let Some(top) = sl.entries.first() else {
        bail!("source {:?} does not exist", display(&o.start));
    };
    if o.start.is_root() && !top.is_dir() {
        bail!("source with a trailing '/' must be a directory");
    }
    let p = plan(&sl.entries, &dl.entries, o.plan);
    let mut summary = Summary::default();
    for a in &p.actions {
        let line = itemize(a);
        emit(&line);
        summary.changes.push(line);
    }
    if o.dry_run {
        summary.seconds = t0.elapsed().as_secs_f64();
        return Ok(summary);
    }

    // Phase 1: the root, deletions and directories.
    let mut ops = Vec::new();
    if !dl.root_exists {
        ops.push(Op::MkRoot);
    }
    for a in &p.actions {
        match a {
            Action::Delete {
                path, recursive, ..
            } => ops.push(Op::Delete {
                path: path.clone(),
                recursive: *recursive,
            }),
            Action::Mkdir(e) => ops.push(Op::Mkdir {
                path: e.path.clone(),
                mode: e.mode,
            }),
            _ => {}
        }
    }
    apply(dst, ops, &mut summary).await?;

    // Phase 2: file contents, deltas where the receiver has an old copy.
    let transfers: Vec<(&RelPath, bool)> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Transfer { entry, update, .. } => Some((&entry.path, *update)),
            _ => None,
        })
        .collect();
    if !transfers.is_empty() {
        let updates: Vec<RelPath> = transfers
            .iter()
            .filter(|(_, u)| *u)
            .map(|(p, _)| (*p).clone())
            .collect();
        let mut sigs = if updates.is_empty() {
            Vec::new()
        } else {
            dst.signatures(updates).await?
        }
        .into_iter();
        let reqs: Vec<SendReq> = transfers
            .iter()
            .map(|(path, update)| SendReq {
                path: (*path).clone(),
                signature: if *update { sigs.next().flatten() } else { None },
            })
            .collect();
        let report = transfer(src, dst, reqs).await?;
        let retry: Vec<SendReq> = report
            .mismatched
            .iter()
            .map(|p| SendReq {
                path: p.clone(),
                signature: None,
            })
            .collect();
        add(&mut summary, report);
        if !retry.is_empty() {
            tracing::info!("{} deltas did not verify; sending whole files", retry.len());
            let again = transfer(src, dst, retry).await?;
            for p in &again.mismatched {
                summary
                    .failed
                    .push((p.to_string(), "content hash mismatch".into()));
            }
            add(&mut summary, again);
        }
    }

    // Phase 3: symlinks, then metadata, directories last and deepest first.
    let mut ops = Vec::new();
    for a in &p.actions {
        match a {
            Action::Symlink { entry, .. } => {
                if let Kind::Symlink { target } = &entry.kind {
                    ops.push(Op::Symlink {
                        path: entry.path.clone(),
                        target: target.clone(),
                    });
                }
            }
            Action::Meta { entry, .. } if !entry.is_dir() => ops.push(Op::SetMeta {
                path: entry.path.clone(),
                mode: Some(entry.mode),
                mtime_ns: Some(entry.mtime_ns),
            }),
            _ => {}
        }
    }
    for d in &p.dir_meta {
        ops.push(Op::SetMeta {
            path: d.path.clone(),
            mode: Some(d.mode),
            mtime_ns: Some(d.mtime_ns),
        });
    }
    apply(dst, ops, &mut summary).await?;
    summary.wire = src.wire_bytes() + dst.wire_bytes();
    summary.seconds = t0.elapsed().as_secs_f64();
    Ok(summary)
}

fn display(p: &RelPath) -> String {
    if p.is_root() {
        ".".into()
    } else {
        p.to_string()
    }
}

fn add(s: &mut Summary, r: RecvReport) {
    s.files += r.files;
    s.bytes += r.bytes;
    s.failed
        .extend(r.failed.into_iter().map(|(p, m)| (p.to_string(), m)));
}

/// Stream files from `src` into `dst`, both running at once.
async fn transfer(
    src: &mut dyn Endpoint,
    dst: &mut dyn Endpoint,
    reqs: Vec<SendReq>,
) -> Result<RecvReport> {
    let (tx, rx) = mpsc::channel(32);
    let (sent, received) = tokio::join!(src.send(reqs, tx), dst.receive(rx));
    // The receiver's error explains more when both failed (it usually caused the other).
    let report = received?;
    sent?;
    Ok(report)
}

async fn apply(dst: &mut dyn Endpoint, ops: Vec<Op>, summary: &mut Summary) -> Result<()> {
    if ops.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = ops
        .iter()
        .map(|op| match op {
            Op::MkRoot => ".".to_string(),
            Op::Mkdir { path, .. }
            | Op::Symlink { path, .. }
            | Op::Delete { path, .. }
            | Op::SetMeta { path, .. } => display(path),
        })
        .collect();
    let results = dst.apply(ops).await?;
    for (name, r) in names.into_iter().zip(results) {
        if let Some(msg) = r {
            summary.failed.push((name, msg));
        }
    }
    Ok(())
}
