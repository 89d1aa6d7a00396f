//! Listing a whole remote tree: many directories listed at once (each listing costs round
//! trips, so a deep tree listed one directory at a time costs its depth times the latency), the
//! result sorted so every directory comes before its contents. cp and sync's SFTP fallback both
//! walk with this.
//!
//! The server decides what the tree looks like, so the walk is bounded ([`caps::DEPTH`],
//! [`caps::WALK_ENTRIES`], and per directory by [`Sftp::read_dir`]) and refuses a listing that
//! names one entry twice: a symlink `x` and a directory `x` in one listing is how a hostile
//! source would plant a link and then have a file written through it.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use futures::stream::{FuturesUnordered, StreamExt};

use super::{caps, DirEntry, Sftp};

/// Directory listings in flight at once.
const CONCURRENCY: usize = 16;

/// Every entry under `root` (not including it) that `keep` accepts, as (path relative to
/// `root`, entry), sorted by path so each directory precedes its contents. Directories `keep`
/// rejects are not descended; symlinks are reported, never followed. `host` names the server in
/// errors (`host:path: why`).
pub async fn walk<F>(
    sftp: &Sftp,
    host: &str,
    root: &Path,
    mut keep: F,
) -> Result<Vec<(PathBuf, DirEntry)>>
where
    F: FnMut(&Path, &DirEntry) -> bool,
{
    let show = |rel: &Path| format!("{host}:{}", root.join(rel).display());
    let mut out = Vec::new();
    let mut pending = vec![(PathBuf::new(), 0usize)];
    let mut running = FuturesUnordered::new();
    loop {
        while running.len() < CONCURRENCY {
            let Some((rel, depth)) = pending.pop() else {
                break;
            };
            let full = root.join(&rel);
            running.push(async move { (sftp.read_dir(&full).await, rel, depth) });
        }
        let Some((listing, rel, depth)) = running.next().await else {
            break;
        };
        let listing = listing.with_context(|| show(&rel))?;
        let mut seen = HashSet::new();
        for entry in listing {
            if !seen.insert(entry.name.clone()) {
                bail!(
                    "{}: refusing a listing that names {:?} twice",
                    show(&rel),
                    String::from_utf8_lossy(&entry.name)
                );
            }
            let child = rel.join(OsStr::from_bytes(&entry.name));
            if !keep(&child, &entry) {
                continue;
            }
            if entry.attrs.is_dir() {
                if depth + 1 > caps::DEPTH {
                    // The path itself would be a line of thousands of `d/`s: name the root.
                    bail!(
                        "{}: sftp server's tree is deeper than {} levels; refusing to continue",
                        show(Path::new("")),
                        caps::DEPTH
                    );
                }
                pending.push((child.clone(), depth + 1));
            }
            if out.len() >= caps::WALK_ENTRIES {
                bail!(
                    "{}: sftp server's tree has more than {} entries; refusing to continue",
                    show(Path::new("")),
                    caps::WALK_ENTRIES
                );
            }
            out.push((child, entry));
        }
    }
    // Path order compares component by component: a pre-order walk with sorted children.
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
