//! Writing into a sync root. Every path comes from the peer (or from a listing the peer sent), so
//! nothing is reached by path: each write descends from the root by directory descriptor
//! (`crate::fs::beneath`), so a symlink inside the root — there before, or swapped in while we
//! work — is never followed. Content lands in a locked temporary file beside the target
//! (`crate::fs::temp`) and is renamed over it only after its hash checks out; a temporary file
//! is removed if its stream breaks off.

use crate::fs::temp::{self, TempFile};
use crate::fs::{io_text, Dir, FileTime, Kind, Root};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{mpsc as mpsc_std, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use tokio::sync::mpsc;

use super::endpoint::{Op, Piece, RecvReport};
use super::listing::RelPath;
use crate::delta;

/// How much written data `write_behind` lets pile up before it starts writeback.
const WRITE_BEHIND: u64 = 8 << 20;

/// Replaced files at least this big are closed in the background (see `release`).
const RELEASE_ASIDE: u64 = 64 << 20;

/// Start writeback of what has been written to `file` so far, every `WRITE_BEHIND` bytes.
/// Renaming over an existing file makes ext4 flush the new one first (`auto_da_alloc`), so
/// without this a big file's whole writeback happens inside the final rename; started as the
/// data arrives, it overlaps the transfer instead. Only a hint: failures are ignored.
fn write_behind(file: &File, flushed: &mut u64) {
    #[cfg(target_os = "linux")]
    {
        use std::io::Seek;
        use std::os::fd::AsRawFd;
        let Ok(end) = (&*file).stream_position() else {
            return;
        };
        if end < *flushed + WRITE_BEHIND {
            return;
        }
        // SAFETY: plain syscall on a descriptor we own; it only starts writeback.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                *flushed as i64,
                (end - *flushed) as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        *flushed = end;
    }
}

struct InFlight {
    rel: RelPath,
    /// The final name, in the directory `tmp` sits in.
    name: OsString,
    tmp: TempFile,
    /// Where writeback was last started (see `write_behind`).
    flushed: u64,
    body: Body,
    mode: u32,
    mtime: FileTime,
}

enum Body {
    /// The content itself, hashed as it is written.
    Whole(Box<blake3::Hasher>),
    /// A delta against the file at the target.
    Delta(delta::Rebuild),
}

/// Why a file was not written. `retry`: sending it whole can fix it (a delta that does not fit
/// the receiver's file or did not rebuild the sender's content).
struct Failed {
    retry: bool,
    why: anyhow::Error,
}

impl Failed {
    fn fatal(why: anyhow::Error) -> Failed {
        Failed { retry: false, why }
    }
    fn from_apply(e: delta::ApplyError) -> Failed {
        Failed {
            retry: matches!(e, delta::ApplyError::Invalid(_)),
            why: e.into(),
        }
    }
}

impl RecvReport {
    fn fail(&mut self, rel: RelPath, f: Failed) {
        if f.retry {
            tracing::debug!("{rel}: {:#}; will send it whole", f.why);
            self.mismatched.push(rel);
        } else {
            self.failed.push((rel, format!("{:#}", f.why)));
        }
    }
}

pub fn receive_all(root: &Path, mut input: mpsc::Receiver<Piece>) -> RecvReport {
    let root =
        Root::open(root).map_err(|e| format!("cannot open {}: {}", root.display(), io_text(&e)));
    let mut report = RecvReport::default();
    let mut cur: Option<InFlight> = None;
    // After a failure, the rest of that file's pieces are dropped.
    let mut skipping = false;
    while let Some(piece) = input.blocking_recv() {
        match piece {
            Piece::Start {
                path,
                delta,
                size,
                mode,
                mtime,
            } => {
                if let Some(old) = cur.take() {
                    report.failed.push((old.rel, "incomplete stream".into()));
                }
                skipping = false;
                let begun = match &root {
                    Ok(root) => begin(root, &path, delta, size, mode, mtime),
                    Err(e) => Err(Failed::fatal(anyhow!("{e}"))),
                };
                match begun {
                    Ok(f) => cur = Some(f),
                    Err(e) => {
                        report.fail(path, e);
                        skipping = true;
                    }
                }
            }
            Piece::Data(bytes) => {
                let Some(f) = cur.as_mut() else {
                    if !skipping {
                        report
                            .failed
                            .push((RelPath::root(), "data outside a file".into()));
                        skipping = true;
                    }
                    continue;
                };
                let r = match &mut f.body {
                    Body::Delta(d) => d.feed(&bytes, f.tmp.file()).map_err(Failed::from_apply),
                    Body::Whole(h) => {
                        h.update(&bytes);
                        f.tmp
                            .file()
                            .write_all(&bytes)
                            .context("cannot write")
                            .map_err(Failed::fatal)
                    }
                };
                if let Err(e) = r {
                    // Dropping the file removes its temporary file.
                    if let Some(f) = cur.take() {
                        report.fail(f.rel, e);
                    }
                    skipping = true;
                } else {
                    write_behind(f.tmp.file(), &mut f.flushed);
                }
            }
            Piece::End { hash } => {
                let Some(f) = cur.take() else { continue };
                let rel = f.rel.clone();
                match finish(f, &hash) {
                    Ok(n) => {
                        report.files += 1;
                        report.bytes += n;
                    }
                    Err(e) => report.fail(rel, e),
                }
            }
            Piece::Skip { path, reason } => {
                cur = None;
                report.failed.push((path, reason));
            }
        }
    }
    if let Some(f) = cur {
        report.failed.push((f.rel, "stream ended mid-file".into()));
    }
    report
}

fn begin(
    root: &Root,
    rel: &RelPath,
    delta: bool,
    size: u64,
    mode: u32,
    mtime: FileTime,
) -> std::result::Result<InFlight, Failed> {
    if rel.is_root() {
        return Err(Failed::fatal(anyhow!(
            "refusing to write a file over the root"
        )));
    }
    let (dir, name) = rel.open_parent(root).map_err(Failed::fatal)?;
    let body = if delta {
        // The old file is gone or no longer a regular file: its delta cannot apply.
        let rebuild = dir
            .open_file(name)
            .with_context(|| format!("cannot open {}", dir.show(name).display()))
            .and_then(|basis| delta::Rebuild::new(basis, size))
            .map_err(|why| Failed { retry: true, why })?;
        Body::Delta(rebuild)
    } else {
        Body::Whole(Box::default())
    };
    let shown = dir.show(name);
    let tmp = TempFile::create(dir, name)
        .with_context(|| format!("cannot create a temporary file for {}", shown.display()))
        .map_err(Failed::fatal)?;
    Ok(InFlight {
        rel: rel.clone(),
        name: name.to_os_string(),
        tmp,
        flushed: 0,
        body,
        mode,
        mtime,
    })
}

fn finish(f: InFlight, hash: &[u8; 32]) -> std::result::Result<u64, Failed> {
    let retry = matches!(f.body, Body::Delta(_));
    let (got, basis) = match f.body {
        Body::Delta(d) => {
            let (got, basis) = d.finish().map_err(Failed::from_apply)?;
            (got, Some(basis))
        }
        Body::Whole(h) => (*h.finalize().as_bytes(), None),
    };
    if got != *hash {
        return Err(Failed {
            retry,
            why: anyhow::anyhow!("content hash mismatch"),
        });
    }
    let size = f.tmp.file().metadata().map(|m| m.len()).unwrap_or(0);
    let shown = f.tmp.shown();
    f.tmp
        .commit(&f.name, f.mode, f.mtime)
        .with_context(|| format!("cannot rename {} into place", shown.display()))
        .map_err(Failed::fatal)?;
    if let Some(old) = basis {
        release(old);
    }
    Ok(size)
}

/// Close an old file that a rename has just replaced. Its last close frees its blocks and page
/// cache, which for a big file takes a while (seconds with online discard) and is nobody's to
/// wait for: big ones are closed on a thread of their own, so the rename, the report and the
/// next file do not wait for it (a process exiting still does).
fn release(old: File) {
    static CLOSER: OnceLock<Option<mpsc_std::Sender<File>>> = OnceLock::new();
    if old.metadata().map_or(true, |m| m.len() < RELEASE_ASIDE) {
        return;
    }
    let closer = CLOSER.get_or_init(|| {
        let (tx, rx) = mpsc_std::channel::<File>();
        std::thread::Builder::new()
            .name("vtun-close".into())
            .spawn(move || rx.into_iter().for_each(drop))
            .ok()
            .map(|_| tx)
    });
    if let Some(tx) = closer {
        // If the closer is gone, `old` comes back in the error and is closed here.
        let _ = tx.send(old);
    }
}

/// Apply `ops` in order beneath `root`; one error message (or none) per op.
pub fn apply_all(root: &Path, ops: &[Op]) -> Vec<Option<String>> {
    // Opened after an `MkRoot` has made it, and then once for every op.
    let mut opened: Option<Root> = None;
    ops.iter()
        .map(|op| {
            apply_op(root, &mut opened, op)
                .err()
                .map(|e| format!("{e:#}"))
        })
        .collect()
}

fn apply_op(path: &Path, opened: &mut Option<Root>, op: &Op) -> Result<()> {
    if let Op::MkRoot = op {
        return match std::fs::create_dir(path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                Err(e).with_context(|| format!("cannot create {}", path.display()))
            }
            _ => Ok(()),
        };
    }
    let root = match opened {
        Some(r) => r,
        None => opened.insert(
            Root::open(path)
                .map_err(|e| anyhow!("cannot open {}: {}", path.display(), io_text(&e)))?,
        ),
    };
    let ctx = |what: &str, dir: &Dir, name: &OsStr| format!("{what} {}", dir.show(name).display());
    match op {
        Op::MkRoot => Ok(()),
        Op::Mkdir { path, mode } if path.is_root() => root
            .dir()
            .set_own_mode(mode | 0o700)
            .with_context(|| format!("cannot chmod {}", root.path().display())),
        Op::Mkdir { path, mode } => {
            let (dir, name) = path.open_parent(root)?;
            if dir.lstat(name)?.map(|m| m.kind) != Some(Kind::Dir) {
                match dir.mkdir(name, 0o700) {
                    // Made meanwhile by another sync into the same directory: as `mkdir -p`.
                    Err(e)
                        if e.kind() == std::io::ErrorKind::AlreadyExists
                            && dir.lstat(name)?.map(|m| m.kind) == Some(Kind::Dir) => {}
                    r => r.with_context(|| ctx("cannot create directory", &dir, name))?,
                }
            }
            // Writable by us until the final metadata pass sets the real mode.
            dir.chmod(name, mode | 0o700)
                .with_context(|| ctx("cannot chmod", &dir, name))
        }
        Op::Symlink { path, target } => {
            let (dir, name) = path.open_parent(root)?;
            let tmp = temp::name(name, temp::Hold::Age);
            dir.symlink(OsStr::new(target), &tmp)
                .with_context(|| ctx("cannot create symlink", &dir, name))?;
            dir.rename(&tmp, name).map_err(|e| {
                let _ = dir.unlink(&tmp);
                anyhow::Error::from(e).context(ctx("cannot create symlink", &dir, name))
            })
        }
        Op::Delete { path, recursive } => {
            if path.is_root() {
                bail!("refusing to delete the root");
            }
            let (dir, name) = path.open_parent(root)?;
            let m = match dir.lstat(name) {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e).with_context(|| ctx("cannot stat", &dir, name)),
            };
            let r = if m.kind != Kind::Dir {
                dir.unlink(name)
            } else if *recursive {
                dir.remove_tree(name)
            } else {
                dir.rmdir(name)
            };
            match r {
                // It still holds excluded entries, which --delete keeps (as rsync does).
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) && !*recursive => {
                    tracing::info!("keeping non-empty directory {}", dir.show(name).display());
                    Ok(())
                }
                r => r.with_context(|| ctx("cannot delete", &dir, name)),
            }
        }
        Op::SetMeta { path, mode, mtime } => {
            if path.is_root() {
                let d = root.dir();
                if let Some(mode) = mode {
                    d.set_own_mode(mode & 0o7777)
                        .with_context(|| format!("cannot chmod {}", root.path().display()))?;
                }
                if let Some(t) = mtime {
                    d.set_own_times(None, *t).with_context(|| {
                        format!("cannot set mtime of {}", root.path().display())
                    })?;
                }
                return Ok(());
            }
            let (dir, name) = path.open_parent(root)?;
            if dir.lstat(name)?.is_none() {
                bail!(
                    "cannot stat {}: no such file or directory",
                    dir.show(name).display()
                );
            }
            if let Some(mode) = mode {
                dir.chmod(name, mode & 0o7777)
                    .with_context(|| ctx("cannot chmod", &dir, name))?;
            }
            if let Some(t) = mtime {
                dir.set_mtime(name, *t)
                    .with_context(|| ctx("cannot set mtime of", &dir, name))?;
            }
            Ok(())
        }
    }
}

// Tests only: unwrap on values the test itself built (in-memory data, temp files, local
// processes), where a failure is the test failing.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn writes_refuse_symlinked_parents() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("link")).unwrap();
        let rel = RelPath::parse("link/x").unwrap();
        let root = Root::open(d.path()).unwrap();
        assert!(rel.open_parent(&root).is_err());
        let ops = [
            Op::Mkdir {
                path: rel.clone(),
                mode: 0o755,
            },
            Op::Symlink {
                path: rel.clone(),
                target: "t".into(),
            },
            Op::SetMeta {
                path: rel.clone(),
                mode: Some(0o777),
                mtime: None,
            },
            Op::Delete {
                path: RelPath::parse("link/keep").unwrap(),
                recursive: true,
            },
        ];
        std::fs::write(outside.path().join("keep"), b"k").unwrap();
        let errs = apply_all(d.path(), &ops);
        assert!(errs.iter().all(|e| e.is_some()), "{errs:?}");
        std::fs::remove_file(outside.path().join("keep")).unwrap();
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Piece::Start {
            path: rel,
            delta: false,
            size: 1,
            mode: 0o644,
            mtime: FileTime::default(),
        })
        .unwrap();
        tx.try_send(Piece::Data(b"x".to_vec())).unwrap();
        tx.try_send(Piece::End {
            hash: *blake3::hash(b"x").as_bytes(),
        })
        .unwrap();
        drop(tx);
        let r = receive_all(d.path(), rx);
        assert_eq!(r.files, 0);
        assert_eq!(r.failed.len(), 1);
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }

    #[test]
    fn broken_stream_leaves_no_file() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"old").unwrap();
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Piece::Start {
            path: RelPath::parse("f").unwrap(),
            delta: false,
            size: 6,
            mode: 0o644,
            mtime: FileTime::default(),
        })
        .unwrap();
        tx.try_send(Piece::Data(b"new".to_vec())).unwrap();
        drop(tx);
        let r = receive_all(d.path(), rx);
        assert_eq!(r.failed.len(), 1);
        assert_eq!(std::fs::read(d.path().join("f")).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    /// The pieces of a delta sync of `new` over the file at `old`, with its signature taken now.
    fn delta_pieces(old: &Path, rel: &RelPath, new: &[u8]) -> Vec<Piece> {
        let sig = delta::signature(&File::open(old).unwrap()).unwrap();
        let mut pieces = vec![Piece::Start {
            path: rel.clone(),
            delta: true,
            size: new.len() as u64,
            mode: 0o644,
            mtime: FileTime::default(),
        }];
        let sig = delta::Signature::parse(&sig).unwrap();
        delta::diff(&sig, new, &mut |p| {
            pieces.push(Piece::Data(p));
            Ok(())
        })
        .unwrap();
        pieces.push(Piece::End {
            hash: *blake3::hash(new).as_bytes(),
        });
        pieces
    }

    fn receive(root: &Path, pieces: Vec<Piece>) -> RecvReport {
        let (tx, rx) = mpsc::channel(pieces.len());
        for p in pieces {
            tx.try_send(p).unwrap();
        }
        drop(tx);
        receive_all(root, rx)
    }

    #[test]
    fn delta_rebuilds_the_new_content() {
        let d = tempfile::tempdir().unwrap();
        let old: Vec<u8> = (0..5u32 << 20).map(|i| (i * 7 + i / 4099) as u8).collect();
        let mut new = old.clone();
        new[3 << 20..(3 << 20) + 5].copy_from_slice(b"fresh");
        new.splice(100..100, *b"inserted");
        std::fs::write(d.path().join("f"), &old).unwrap();
        let rel = RelPath::parse("f").unwrap();
        let r = receive(d.path(), delta_pieces(&d.path().join("f"), &rel, &new));
        assert_eq!((r.files, r.bytes), (1, new.len() as u64), "{r:?}");
        assert!(std::fs::read(d.path().join("f")).unwrap() == new);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn delta_against_a_changed_basis_is_mismatched_and_not_renamed() {
        for replace in [false, true] {
            let d = tempfile::tempdir().unwrap();
            let f = d.path().join("f");
            let old: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
            std::fs::write(&f, &old).unwrap();
            let rel = RelPath::parse("f").unwrap();
            let mut new = old.clone();
            new[50_000] ^= 1;
            let pieces = delta_pieces(&f, &rel, &new);
            let now = if replace {
                // Replaced after its signature was taken: same size, other content and inode.
                let changed = vec![3u8; old.len()];
                std::fs::write(d.path().join("g"), &changed).unwrap();
                std::fs::rename(d.path().join("g"), &f).unwrap();
                changed
            } else {
                // Only touched: the delta would even rebuild the right content, but the
                // receiver cannot know that before it has read the whole file.
                let t = std::time::SystemTime::now() - std::time::Duration::from_secs(100);
                File::options()
                    .write(true)
                    .open(&f)
                    .unwrap()
                    .set_modified(t)
                    .unwrap();
                old
            };
            let r = receive(d.path(), pieces);
            assert_eq!(r.mismatched, vec![rel], "replace {replace}: {r:?}");
            assert_eq!((r.files, r.failed.len()), (0, 0));
            assert!(std::fs::read(&f).unwrap() == now);
            assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        }
    }

    #[test]
    fn wrong_hash_is_not_renamed_into_place() {
        let d = tempfile::tempdir().unwrap();
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Piece::Start {
            path: RelPath::parse("f").unwrap(),
            delta: false,
            size: 3,
            mode: 0o644,
            mtime: FileTime::default(),
        })
        .unwrap();
        tx.try_send(Piece::Data(b"abc".to_vec())).unwrap();
        tx.try_send(Piece::End { hash: [0; 32] }).unwrap();
        drop(tx);
        let r = receive_all(d.path(), rx);
        assert_eq!(r.failed.len(), 1);
        assert!(!d.path().join("f").exists());
    }
}
