//! scp's placement rules: each source goes inside the destination when that is an existing
//! directory, else becomes it (one source only); plain files are copied concurrently, then trees
//! one after another (each parallel inside). Built on `file` and `tree`.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use futures::stream::{self, StreamExt};

use super::file::Engine;
use super::fs::Fs;
use super::tree;
use crate::fs::{Kind, Meta};

/// Sources stat'ed at once.
const RESOLVE_CONCURRENCY: usize = 32;

impl Engine {
    /// scp semantics: each source goes inside `dst` when it is an existing directory, else
    /// becomes `dst` (one source only). Returns every failure; what completed stays.
    pub async fn copy_many(
        &self,
        sources: &[(Fs, PathBuf)],
        dst: &Fs,
        dst_path: &Path,
    ) -> Vec<anyhow::Error> {
        let dst_meta = match dst.stat(dst_path).await {
            Ok(m) => m,
            Err(e) => return vec![e],
        };
        let dst_is_dir = dst_meta.is_some_and(|m| m.kind == Kind::Dir);
        if !dst_is_dir && dst_path.as_os_str().as_bytes().ends_with(b"/") {
            return vec![anyhow!("{}: no such directory", dst.show(dst_path))];
        }
        if sources.len() > 1 && !dst_is_dir {
            return vec![anyhow!(
                "{}: not a directory (several sources need an existing directory as destination)",
                dst.show(dst_path)
            )];
        }
        // Resolve every source first (concurrently: each is a round trip), then copy plain
        // files concurrently, then trees one after another (each is parallel inside).
        let resolved: Vec<Result<(&Fs, &Path, Meta, PathBuf)>> = stream::iter(sources)
            .map(|(src, path)| async move {
                let meta = src
                    .stat(path)
                    .await?
                    .ok_or_else(|| anyhow!("{}: no such file or directory", src.show(path)))?;
                let target = if dst_is_dir {
                    dst_path.join(base_name(src, path).await?)
                } else {
                    dst_path.to_path_buf()
                };
                Ok((src, path.as_path(), meta, target))
            })
            .buffered(RESOLVE_CONCURRENCY)
            .collect()
            .await;
        let mut errors = Vec::new();
        let mut files = Vec::new();
        let mut trees = Vec::new();
        for r in resolved {
            match r {
                Ok((src, path, meta, target)) => match meta.kind {
                    Kind::File => {
                        self.progress.add_total(1, meta.size);
                        files.push((src, path, meta, target));
                    }
                    Kind::Dir if self.opts.recursive => trees.push((src, path, meta, target)),
                    Kind::Dir => {
                        errors.push(anyhow!("{}: is a directory (use -r)", src.show(path)))
                    }
                    _ => errors.push(anyhow!("{}: not a regular file", src.show(path))),
                },
                Err(e) => errors.push(e),
            }
        }
        let concurrency = self.opts.parallel.max(1) * tree::FILES_PER_STREAM;
        let copied: Vec<Result<()>> = stream::iter(files.iter().enumerate())
            .map(|(i, (src, path, meta, target))| self.copy_file(src, path, meta, dst, target, i))
            .buffer_unordered(concurrency)
            .collect()
            .await;
        errors.extend(copied.into_iter().filter_map(Result::err));
        for (src, path, meta, target) in &trees {
            errors.extend(tree::copy_tree(self, src, path, meta, dst, target).await);
        }
        errors
    }
}

/// The last component of a source path, as scp names the copy (`.`/`..`/`/` resolved first).
async fn base_name(fs: &Fs, path: &Path) -> Result<OsString> {
    let named = match path.file_name() {
        Some(n) if !path.as_os_str().as_bytes().ends_with(b"/..") => Some(n.to_os_string()),
        _ => None,
    };
    match named {
        Some(n) => Ok(n),
        None => fs
            .canonical(path)
            .await?
            .file_name()
            .map(|n| n.to_os_string())
            .ok_or_else(|| {
                anyhow!(
                    "{}: cannot copy a root directory into a directory",
                    fs.show(path)
                )
            }),
    }
}
