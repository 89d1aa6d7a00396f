//! Run a sync between two endpoints: list both, plan, then carry the plan out in a fixed number
//! of batched phases (deletes and directories, file contents, links and metadata), so the number
//! of round trips does not grow with the number of files.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{bail, Result};
use tokio::sync::mpsc;

use super::endpoint::{Endpoint, Op, Piece, RecvReport, SendReq, VANISHED};
use super::listing::{EntryKind, ListOpts, RelPath};
use super::pattern::Excludes;
use super::plan::{hidden_in_the_way, itemize, plan, Action, PlanOpts};

/// Below this many bytes to send, extra connections cost more than they bring.
const PARALLEL_MIN: u64 = 8 << 20;

/// Files per signature request: bounds memory for signatures of a huge tree.
const UPDATE_BATCH: usize = 1000;

#[derive(Debug, Clone, Default)]
pub struct EngineOpts {
    pub plan: PlanOpts,
    pub dry_run: bool,
    pub excludes: Vec<String>,
    pub delete_excluded: bool,
    /// What to sync below both roots (SRC's basename, or the root itself for `SRC/`).
    pub start: RelPath,
    /// Connections per side for file contents when there is much to send (0 or 1: one).
    pub parallel: usize,
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

/// Exit status of a run in which some entries failed (rsync's "partial transfer due to error").
pub const EXIT_PARTIAL: u8 = 23;
/// Exit status of a run in which the only failures were source files that vanished before they
/// could be sent (rsync's 24).
pub const EXIT_VANISHED: u8 = 24;

impl Summary {
    /// 0 when everything was synced, else [`EXIT_VANISHED`] or [`EXIT_PARTIAL`].
    pub fn exit_code(&self) -> u8 {
        if self.failed.is_empty() {
            0
        } else if self.failed.iter().all(|(_, why)| why == VANISHED) {
            EXIT_VANISHED
        } else {
            EXIT_PARTIAL
        }
    }
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
    let excludes = dst_opts.excludes.clone();
    let (sl, mut dl) = futures::try_join!(src.list(src_opts), dst.list(dst_opts))?;
    // An excluded destination entry in the way of a source entry of another type (`--exclude
    // 'x/'`, destination directory `x`, source file `x`) is not kept: rsync makes way for the new
    // entry. List each such path, the entry itself and what the excludes leave of its contents.
    if !excludes.is_empty() {
        let ex = Excludes::new(&excludes)?;
        for path in hidden_in_the_way(&sl.entries, &dl.entries, &ex) {
            let found = dst
                .list(ListOpts {
                    start: path.clone(),
                    hashes,
                    excludes: excludes.clone(),
                    clean_temps: false,
                })
                .await?;
            if found.entries.first().is_some_and(|e| e.path == path) {
                tracing::debug!("excluded {path} is in the way of the source's");
                dl.entries.extend(found.entries);
            }
        }
    }
    tracing::debug!(
        "listed {} source and {} destination entries in {:.3} s",
        sl.entries.len(),
        dl.entries.len(),
        t0.elapsed().as_secs_f64()
    );
    let Some(top) = sl.entries.first() else {
        bail!("source {:?} does not exist", display(&o.start));
    };
    if o.start.is_root() && !top.is_dir() {
        bail!("source with a trailing '/' must be a directory");
    }
    let popts = PlanOpts {
        mtime_seconds: o.plan.mtime_seconds || sl.mtime_seconds || dl.mtime_seconds,
        keep_excluded: !o.excludes.is_empty() && !o.delete_excluded,
        ..o.plan
    };
    let p = plan(&sl.entries, &dl.entries, popts);
    let mut summary = Summary::default();
    for line in p.actions.iter().filter_map(itemize) {
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
    let sizes: HashMap<RelPath, u64> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Transfer { entry, .. } => Some((entry.path.clone(), entry.size())),
            _ => None,
        })
        .collect();
    // What is likely to cross the wire: new files whole, updates mostly as small deltas.
    let total: u64 = p
        .actions
        .iter()
        .map(|a| match a {
            Action::Transfer { entry, update, .. } if *update => entry.size() / 16,
            Action::Transfer { entry, .. } => entry.size(),
            _ => 0,
        })
        .sum();
    let mut forks: Vec<Fork> = Vec::new();
    if o.parallel > 1 && total >= PARALLEL_MIN && sizes.len() > 1 {
        // All at once: each fork costs round trips (channel, agent start), not bandwidth.
        let (src_ref, dst_ref) = (&*src, &*dst);
        let opened = futures::future::join_all(
            (1..o.parallel.min(sizes.len()))
                .map(|_| async move { futures::try_join!(src_ref.fork(), dst_ref.fork()) }),
        )
        .await;
        for f in opened {
            match f {
                Ok((Some(src), Some(dst))) => forks.push(Fork { src, dst }),
                Ok(_) => break,
                Err(e) => {
                    tracing::info!("cannot open another connection: {e:#}");
                    break;
                }
            }
        }
    }
    if !forks.is_empty() {
        tracing::debug!(
            "sending over {} connections per side (at {:.3} s)",
            forks.len() + 1,
            t0.elapsed().as_secs_f64()
        );
    }
    let transfers: Vec<(&RelPath, bool)> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Transfer { entry, update, .. } => Some((&entry.path, *update)),
            _ => None,
        })
        .collect();
    if !transfers.is_empty() {
        // New files need no signatures and go in the first batch; updates go in batches so
        // signatures for a huge tree are never all in memory at once.
        let (updates, fresh): (Vec<_>, Vec<_>) = transfers.iter().partition(|(_, u)| *u);
        let mut batches: Vec<(Vec<RelPath>, Vec<RelPath>)> = Vec::new();
        let mut chunks = updates.chunks(UPDATE_BATCH);
        batches.push((
            fresh.iter().map(|(p, _)| (*p).clone()).collect(),
            chunks
                .next()
                .unwrap_or_default()
                .iter()
                .map(|(p, _)| (*p).clone())
                .collect(),
        ));
        for c in chunks {
            batches.push((Vec::new(), c.iter().map(|(p, _)| (*p).clone()).collect()));
        }
        for (fresh, updates) in batches {
            let sigs = if updates.is_empty() {
                Vec::new()
            } else {
                dst.signatures(updates.clone()).await?
            };
            let mut reqs: Vec<SendReq> = fresh
                .into_iter()
                .map(|path| SendReq {
                    path,
                    signature: None,
                })
                .collect();
            reqs.extend(
                updates
                    .into_iter()
                    .zip(sigs)
                    .map(|(path, signature)| SendReq { path, signature }),
            );
            let report = transfer_spread(src, dst, &mut forks, reqs, &sizes).await?;
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
    }

    tracing::debug!("file contents done at {:.3} s", t0.elapsed().as_secs_f64());
    // Phase 3: symlinks, then metadata, directories last and deepest first.
    let mut ops = Vec::new();
    for a in &p.actions {
        match a {
            Action::Symlink { entry, .. } => {
                if let EntryKind::Symlink { target } = &entry.kind {
                    ops.push(Op::Symlink {
                        path: entry.path.clone(),
                        target: target.clone(),
                    });
                    // The link's own mtime, as rsync -a keeps it on Linux.
                    ops.push(Op::SetMeta {
                        path: entry.path.clone(),
                        mode: None,
                        mtime: Some(entry.mtime),
                    });
                }
            }
            Action::Meta { entry, .. } if !entry.is_dir() => ops.push(Op::SetMeta {
                path: entry.path.clone(),
                // A link has no mode of its own to set (chmod would follow it).
                mode: (!matches!(entry.kind, EntryKind::Symlink { .. })).then_some(entry.mode),
                mtime: Some(entry.mtime),
            }),
            _ => {}
        }
    }
    for d in &p.dir_meta {
        ops.push(Op::SetMeta {
            path: d.path.clone(),
            mode: Some(d.mode),
            mtime: Some(d.mtime),
        });
    }
    apply(dst, ops, &mut summary).await?;
    summary.wire = src.wire_bytes()
        + dst.wire_bytes()
        + forks
            .iter()
            .map(|f| f.src.wire_bytes() + f.dst.wire_bytes())
            .sum::<u64>();
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

/// An extra connection to each side, for parallel transfers.
struct Fork {
    src: Box<dyn Endpoint>,
    dst: Box<dyn Endpoint>,
}

/// Spread `reqs` over the main pair and the forks, balancing bytes, and run them all at once.
async fn transfer_spread(
    src: &mut dyn Endpoint,
    dst: &mut dyn Endpoint,
    forks: &mut [Fork],
    reqs: Vec<SendReq>,
    sizes: &HashMap<RelPath, u64>,
) -> Result<RecvReport> {
    if forks.is_empty() || reqs.len() < 2 {
        return transfer(src, dst, reqs).await;
    }
    let n = forks.len() + 1;
    // Largest first into the lightest group; each group keeps the plan's order.
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    order.sort_by_key(|i| std::cmp::Reverse(sizes.get(&reqs[*i].path).copied().unwrap_or(0)));
    let mut load = vec![0u64; n];
    let mut group_of = vec![0usize; reqs.len()];
    for i in order {
        let g = (0..n).min_by_key(|g| load[*g]).unwrap_or(0);
        load[g] += sizes.get(&reqs[i].path).copied().unwrap_or(0) + 4096;
        group_of[i] = g;
    }
    let mut groups: Vec<Vec<SendReq>> = vec![Vec::new(); n];
    for (r, g) in reqs.into_iter().zip(group_of) {
        groups[g].push(r);
    }
    let mut pairs: Vec<(&mut dyn Endpoint, &mut dyn Endpoint)> = vec![(src, dst)];
    for f in forks.iter_mut() {
        pairs.push((f.src.as_mut(), f.dst.as_mut()));
    }
    let reports = futures::future::join_all(pairs.into_iter().zip(groups).enumerate().map(
        |(i, ((s, d), g))| async move {
            let t = Instant::now();
            let n = g.len();
            let r = transfer(s, d, g).await;
            tracing::debug!(
                "connection {i}: {n} files in {:.3} s",
                t.elapsed().as_secs_f64()
            );
            r
        },
    ))
    .await;
    let mut total = RecvReport::default();
    for r in reports {
        let r = r?;
        total.files += r.files;
        total.bytes += r.bytes;
        total.mismatched.extend(r.mismatched);
        total.failed.extend(r.failed);
    }
    Ok(total)
}

/// Stream files from `src` into `dst`, both running at once. The client checks that the sender
/// sends exactly the files asked for, in order, so a hostile sending agent cannot make the
/// receiver write anything the plan did not decide to write.
async fn transfer(
    src: &mut dyn Endpoint,
    dst: &mut dyn Endpoint,
    reqs: Vec<SendReq>,
) -> Result<RecvReport> {
    let expected: Vec<RelPath> = reqs.iter().map(|r| r.path.clone()).collect();
    let (tx, from_src) = mpsc::channel(32);
    let (to_dst, rx) = mpsc::channel(32);
    let (sent, checked, received) = tokio::join!(
        src.send(reqs, tx),
        check_order(expected, from_src, to_dst),
        dst.receive(rx)
    );
    // The receiver's error explains most (it usually caused the others), then the check's.
    let report = received?;
    checked?;
    sent?;
    Ok(report)
}

async fn check_order(
    expected: Vec<RelPath>,
    mut from_src: mpsc::Receiver<Piece>,
    to_dst: mpsc::Sender<Piece>,
) -> Result<()> {
    let mut next = expected.into_iter();
    // The file being sent: a `Skip` of it abandons it (it changed while being read).
    let mut open: Option<RelPath> = None;
    while let Some(p) = from_src.recv().await {
        match &p {
            Piece::Skip { path, .. } if open.as_ref() == Some(path) => open = None,
            Piece::Start { path, .. } | Piece::Skip { path, .. } => {
                if next.next().as_ref() != Some(path) {
                    bail!("the sender sent {path:?}, which was not asked for");
                }
                open = matches!(p, Piece::Start { .. }).then(|| path.clone());
            }
            Piece::End { .. } => open = None,
            Piece::Data(_) => {}
        }
        if to_dst.send(p).await.is_err() {
            bail!("the receiver stopped");
        }
    }
    Ok(())
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

// Tests only: unwrap on values the test itself built (in-memory data, temp files, local
// processes), where a failure is the test failing.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::{Arc, Mutex};

    use futures::future::BoxFuture;

    use super::*;
    use crate::sync::listing::Listing;
    use crate::sync::local::LocalEndpoint;

    /// Records every call: each one is a round trip when the endpoint is remote.
    struct Counting {
        inner: LocalEndpoint,
        calls: Arc<Mutex<Vec<&'static str>>>,
    }

    impl Counting {
        fn log(&self, c: &'static str) {
            self.calls.lock().unwrap().push(c);
        }
    }

    impl Endpoint for Counting {
        fn list(&mut self, o: ListOpts) -> BoxFuture<'_, Result<Listing>> {
            self.log("list");
            self.inner.list(o)
        }
        fn signatures(&mut self, p: Vec<RelPath>) -> BoxFuture<'_, Result<Vec<Option<Vec<u8>>>>> {
            self.log("signatures");
            self.inner.signatures(p)
        }
        fn send(&mut self, r: Vec<SendReq>, o: mpsc::Sender<Piece>) -> BoxFuture<'_, Result<()>> {
            self.log("send");
            self.inner.send(r, o)
        }
        fn receive(&mut self, i: mpsc::Receiver<Piece>) -> BoxFuture<'_, Result<RecvReport>> {
            self.log("receive");
            self.inner.receive(i)
        }
        fn apply(&mut self, ops: Vec<Op>) -> BoxFuture<'_, Result<Vec<Option<String>>>> {
            self.log("apply");
            self.inner.apply(ops)
        }
    }

    #[test]
    fn exit_code_is_24_only_when_every_failure_is_a_vanished_file() {
        let with = |reasons: &[&str]| Summary {
            failed: reasons
                .iter()
                .map(|r| ("f".into(), r.to_string()))
                .collect(),
            ..Summary::default()
        };
        assert_eq!(with(&[]).exit_code(), 0);
        assert_eq!(with(&[VANISHED, VANISHED]).exit_code(), EXIT_VANISHED);
        assert_eq!(
            with(&[VANISHED, "changed while being read"]).exit_code(),
            23
        );
        assert_eq!(with(&["permission denied"]).exit_code(), EXIT_PARTIAL);
    }

    #[tokio::test]
    async fn round_trips_do_not_grow_with_file_count() {
        let t = tempfile::tempdir().unwrap();
        for d in 0..20 {
            for f in 0..50 {
                let p = t.path().join(format!("src/d{d}/f{f}"));
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, format!("{d}/{f}")).unwrap();
            }
        }
        let calls = Arc::new(Mutex::new(Vec::new()));
        let ep = |dir: &str| Counting {
            inner: LocalEndpoint::new(t.path().join(dir)),
            calls: calls.clone(),
        };
        let opts = EngineOpts {
            plan: PlanOpts {
                delete: true,
                ..PlanOpts::default()
            },
            ..EngineOpts::default()
        };
        let (mut s, mut d) = (ep("src"), ep("dst"));
        let first = run(&mut s, &mut d, &opts, &mut |_| {}).await.unwrap();
        assert_eq!(first.files, 1000);
        let n = calls.lock().unwrap().len();
        assert!(n <= 6, "first sync made {n} calls");
        calls.lock().unwrap().clear();
        let again = run(&mut s, &mut d, &opts, &mut |_| {}).await.unwrap();
        assert!(again.changes.is_empty());
        assert_eq!(*calls.lock().unwrap(), ["list", "list"]);
        // One changed file: one more batch, not one per file.
        std::fs::write(t.path().join("src/d3/f7"), "changed, and longer").unwrap();
        calls.lock().unwrap().clear();
        run(&mut s, &mut d, &opts, &mut |_| {}).await.unwrap();
        let n = calls.lock().unwrap().len();
        assert!(n <= 7, "one-file sync made {n} calls");
    }
}
