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

use super::proto::Attrs;
use super::{caps, DirEntry, Sftp};

/// Directory listings in flight at once.
const CONCURRENCY: usize = 16;

/// Every entry under `root` (not including it) that `keep` accepts, as (path relative to
/// `root`, attributes), sorted by path so each directory precedes its contents. Directories `keep`
/// rejects are not descended; symlinks are reported, never followed. `host` names the server in
/// errors (`host:path: why`).
pub async fn walk<F>(sftp: &Sftp, host: &str, root: &Path, keep: F) -> Result<Vec<(PathBuf, Attrs)>>
where
    F: FnMut(&Path, &DirEntry) -> bool,
{
    let bounds = Bounds {
        entries: caps::WALK_ENTRIES,
        depth: caps::DEPTH,
    };
    walk_within(sftp, host, root, keep, bounds).await
}

/// How large a walk may grow ([`caps::WALK_ENTRIES`] and [`caps::DEPTH`] in production).
#[derive(Debug, Clone, Copy)]
struct Bounds {
    entries: usize,
    depth: usize,
}

async fn walk_within<F>(
    sftp: &Sftp,
    host: &str,
    root: &Path,
    mut keep: F,
    bounds: Bounds,
) -> Result<Vec<(PathBuf, Attrs)>>
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
                if depth + 1 > bounds.depth {
                    // The path itself would be a line of thousands of `d/`s: name the root.
                    bail!(
                        "{}: sftp server's tree is deeper than {} levels; refusing to continue",
                        show(Path::new("")),
                        bounds.depth
                    );
                }
                pending.push((child.clone(), depth + 1));
            }
            if out.len() >= bounds.entries {
                bail!(
                    "{}: sftp server's tree has more than {} entries; refusing to continue",
                    show(Path::new("")),
                    bounds.entries
                );
            }
            // Only the attributes: the name (a slice of its reply packet) would keep the whole
            // packet alive for as long as the walk is held.
            out.push((child, entry.attrs));
        }
    }
    // Path order compares component by component: a pre-order walk with sorted children.
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

// Tests only: unwrap on values the test itself built (in-memory data, temp files, local
// processes), where a failure is the test failing.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sftp::proto::{self, put_str, Parser};
    use bytes::{BufMut, Bytes, BytesMut};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn reply(b: &mut BytesMut, kind: u8, id: u32, fields: impl FnOnce(&mut BytesMut)) {
        let mut body = BytesMut::new();
        body.put_u8(kind);
        body.put_u32(id);
        fields(&mut body);
        b.put_u32(body.len() as u32);
        b.put_slice(&body);
    }

    /// Serve a tree where every directory at depth < `levels` holds `width` directories and
    /// `width` files. READDIR answers everything at once, then end-of-file.
    async fn tree_server(mut io: DuplexStream, width: usize, levels: usize) {
        let len = io.read_u32().await.unwrap();
        io.read_exact(&mut vec![0; len as usize]).await.unwrap();
        let mut b = BytesMut::new();
        b.put_u32(5);
        b.put_u8(proto::VERSION);
        b.put_u32(3);
        io.write_all(&b.split()).await.unwrap();
        let mut served = std::collections::HashSet::new();
        while let Ok(len) = io.read_u32().await {
            let mut body = vec![0; len as usize];
            io.read_exact(&mut body).await.unwrap();
            let mut p = Parser::new(Bytes::from(body));
            let (kind, id) = (p.u8().unwrap(), p.u32().unwrap());
            let arg = p.string().unwrap();
            match kind {
                proto::OPENDIR => reply(&mut b, proto::HANDLE, id, |b| put_str(b, &arg)),
                proto::READDIR if served.insert(arg.clone()) => {
                    // "/r/" is the root: depth 0.
                    let path = arg.strip_suffix(b"/").unwrap_or(&arg);
                    let depth = path.iter().filter(|&&c| c == b'/').count() - 1;
                    let n = if depth < levels { width } else { 0 };
                    reply(&mut b, proto::NAME, id, |b| {
                        b.put_u32(2 * n as u32);
                        for i in 0..n {
                            for (name, perm) in [("d", proto::S_IFDIR), ("f", proto::S_IFREG)] {
                                put_str(b, format!("{name}{i}").as_bytes());
                                put_str(b, b"");
                                let attrs = Attrs {
                                    perm: Some(perm | 0o755),
                                    ..Attrs::default()
                                };
                                attrs.encode(b);
                            }
                        }
                    })
                }
                proto::READDIR | proto::CLOSE => reply(&mut b, proto::STATUS, id, |b| {
                    b.put_u32(if kind == proto::CLOSE {
                        proto::FX_OK
                    } else {
                        proto::FX_EOF
                    });
                }),
                k => panic!("unexpected request {k}"),
            }
            io.write_all(&b.split()).await.unwrap();
        }
    }

    async fn walk_tree(width: usize, levels: usize, bounds: Bounds) -> Result<Vec<PathBuf>> {
        let (client, server) = tokio::io::duplex(1 << 20);
        tokio::spawn(tree_server(server, width, levels));
        let sftp = Sftp::connect(Box::new(client)).await.unwrap();
        let all = walk_within(&sftp, "h", Path::new("/r"), |_, _| true, bounds).await?;
        Ok(all.into_iter().map(|(p, _)| p).collect())
    }

    const WIDE: Bounds = Bounds {
        entries: 1000,
        depth: 1000,
    };

    #[tokio::test]
    async fn a_walk_lists_every_level_in_pre_order() {
        let paths = walk_tree(3, 2, WIDE).await.unwrap();
        // 3 dirs + 3 files at the top, and 6 entries in each of the 3 directories.
        assert_eq!(paths.len(), 6 + 3 * 6);
        assert_eq!(paths[0], Path::new("d0"));
        assert_eq!(paths[1], Path::new("d0/d0"));
        let mut sorted = paths.clone();
        sorted.sort();
        assert_eq!(paths, sorted);
    }

    #[tokio::test]
    async fn a_walk_stops_at_its_entry_and_depth_bounds() {
        let few = Bounds {
            entries: 20,
            ..WIDE
        };
        let err = walk_tree(3, 2, few).await.unwrap_err().to_string();
        assert_eq!(
            err,
            "h:/r/: sftp server's tree has more than 20 entries; refusing to continue"
        );
        let shallow = Bounds { depth: 1, ..WIDE };
        let err = walk_tree(3, 2, shallow).await.unwrap_err().to_string();
        assert_eq!(
            err,
            "h:/r/: sftp server's tree is deeper than 1 levels; refusing to continue"
        );
        walk_tree(3, 2, Bounds { depth: 2, ..WIDE }).await.unwrap();
    }
}
