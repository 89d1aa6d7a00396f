//! Recursive copies: list a whole tree (many directories listed concurrently, since each
//! listing costs a round trip), then create directories, copy files concurrently, make symlinks
//! and finally fix directory modes and times, deepest first.
//!
//! Symlinks are created last and as links (never followed), and a listing that names the same
//! entry twice is refused: together these stop a hostile source from planting a link and then
//! writing through it. A symlink already in the destination where the source has a directory
//! is replaced by that directory, never written through (sync's rule too, and rsync's), so one
//! run cannot plant a link that a later run follows; where the copied directory itself would go,
//! anything but a directory is refused.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use futures::stream::{FuturesUnordered, StreamExt};

use super::file::Engine;
use super::fs::Fs;
use crate::fs::{Kind, Meta, Root};
use std::sync::Arc;

/// Directory listings (or mkdirs) in flight at once.
const LIST_CONCURRENCY: usize = 16;
/// Files in flight per SFTP stream: enough to hide a few round trips per small file.
pub const FILES_PER_STREAM: usize = 32;

/// Group sorted relative directory paths by depth, shallowest first.
fn by_depth(dirs: &[(PathBuf, Meta)]) -> Vec<Vec<&(PathBuf, Meta)>> {
    let mut levels: Vec<Vec<&(PathBuf, Meta)>> = Vec::new();
    for d in dirs {
        let depth = d.0.components().count().max(1) - 1;
        if levels.len() <= depth {
            levels.resize_with(depth + 1, Vec::new);
        }
        levels[depth].push(d);
    }
    levels
}

/// Every entry under `root` (not including it) as (relative path, metadata), sorted so each
/// directory comes before its contents. Symlinks are reported, not followed.
pub async fn walk(fs: &Fs, root: &Path) -> Result<Vec<(PathBuf, Meta)>> {
    if let Fs::Remote(r) = fs {
        return r.walk(root, |_, _| true).await;
    }
    let mut out = Vec::new();
    let mut pending = vec![PathBuf::new()];
    let mut running = FuturesUnordered::new();
    loop {
        while running.len() < LIST_CONCURRENCY {
            let Some(rel) = pending.pop() else { break };
            let full = root.join(&rel);
            running.push(async move { (fs.read_dir(&full).await, rel) });
        }
        let Some((listing, rel)) = running.next().await else {
            break;
        };
        let mut seen = HashSet::new();
        for (name, meta) in listing? {
            if !seen.insert(name.clone()) {
                bail!(
                    "refusing listing of {}: it names {:?} twice",
                    fs.show(&root.join(&rel)),
                    name
                );
            }
            let child = rel.join(&name);
            if meta.kind == Kind::Dir {
                pending.push(child.clone());
            }
            out.push((child, meta));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Copy directory `src_root` to `dst_root` (created if missing). Returns every failure.
pub async fn copy_tree(
    engine: &Engine,
    src: &Fs,
    src_root: &Path,
    root_meta: &Meta,
    dst: &Fs,
    dst_root: &Path,
) -> Vec<anyhow::Error> {
    match copy_tree_inner(engine, src, src_root, root_meta, dst, dst_root).await {
        Ok(errors) => errors,
        Err(e) => vec![e],
    }
}

async fn copy_tree_inner(
    engine: &Engine,
    src: &Fs,
    src_root: &Path,
    root_meta: &Meta,
    dst: &Fs,
    dst_root: &Path,
) -> Result<Vec<anyhow::Error>> {
    if let Some(m) = dst.lstat(dst_root).await? {
        if m.kind != Kind::Dir {
            bail!("{}: exists and is not a directory", dst.show(dst_root));
        }
    }
    let entries = walk(src, src_root).await?;
    let (mut files, mut bytes) = (0, 0);
    for (_, m) in &entries {
        if m.kind == Kind::File {
            files += 1;
            bytes += m.size;
        }
    }
    engine.progress.add_total(files, bytes);

    dst.mkdir(dst_root, 0o700 | root_meta.mode).await?;
    // A local destination is written beneath its root by directory descriptor from here on.
    let beneath;
    let dst = match dst {
        Fs::Local => {
            let root = Root::open(dst_root).map_err(|e| {
                anyhow!(
                    "cannot open {}: {}",
                    dst.show(dst_root),
                    crate::fs::io_text(&e)
                )
            })?;
            beneath = Fs::Beneath(Arc::new(root));
            &beneath
        }
        other => other,
    };
    let dirs: Vec<(PathBuf, Meta)> = entries
        .iter()
        .filter(|(_, m)| m.kind == Kind::Dir)
        .map(|(rel, m)| (rel.clone(), *m))
        .collect();
    // Parents before children, siblings concurrently (each mkdir is a round trip).
    for level in by_depth(&dirs) {
        let made =
            futures::stream::iter(level)
                .map(|(rel, m)| async move {
                    dst.mkdir_inside(&dst_root.join(rel), 0o700 | m.mode).await
                })
                .buffer_unordered(LIST_CONCURRENCY)
                .collect::<Vec<_>>()
                .await;
        made.into_iter().collect::<Result<Vec<()>>>()?;
    }

    let mut errors = Vec::new();
    let parallel = engine.opts.parallel.max(1);
    let mut copies = futures::stream::iter(
        entries
            .iter()
            .filter(|(_, m)| m.kind == Kind::File)
            .enumerate(),
    )
    .map(|(i, (rel, m))| {
        let (s, d) = (src_root.join(rel), dst_root.join(rel));
        async move { engine.copy_file(src, &s, m, dst, &d, i).await }
    })
    .buffer_unordered(parallel * FILES_PER_STREAM);
    while let Some(r) = copies.next().await {
        if let Err(e) = r {
            errors.push(e);
        }
    }
    drop(copies);

    for (rel, m) in &entries {
        match m.kind {
            Kind::Symlink => {
                let (s, d) = (src_root.join(rel), dst_root.join(rel));
                if let Err(e) = copy_link(src, &s, dst, &d).await {
                    errors.push(e);
                }
            }
            Kind::Other => errors.push(anyhow!(
                "{}: not a regular file, skipped",
                src.show(&src_root.join(rel))
            )),
            _ => {}
        }
    }

    // Modes and times last (writing into a directory changes its mtime), deepest first.
    let preserve = engine.opts.preserve;
    let set = |d: PathBuf, m: Meta| async move {
        dst.set_meta(&d, m.mode, preserve.then_some((m.atime, m.mtime)))
            .await
    };
    for level in by_depth(&dirs).into_iter().rev() {
        let done = futures::stream::iter(level)
            .map(|(rel, m)| set(dst_root.join(rel), *m))
            .buffer_unordered(LIST_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        errors.extend(done.into_iter().filter_map(Result::err));
    }
    if let Err(e) = set(dst_root.to_path_buf(), *root_meta).await {
        errors.push(e);
    }
    Ok(errors)
}

/// Recreate symlink `src_path` at `dst_path` (atomically replacing what is there).
pub async fn copy_link(src: &Fs, src_path: &Path, dst: &Fs, dst_path: &Path) -> Result<()> {
    let target = src.read_link(src_path).await?;
    // A symlink cannot be locked: only age marks a leftover one.
    let temp = crate::fs::temp::beside(dst_path, crate::fs::temp::Hold::Age);
    dst.symlink(&target, &temp).await?;
    if let Err(e) = dst.rename(&temp, dst_path).await {
        let _ = dst.remove(&temp).await;
        return Err(e);
    }
    Ok(())
}
