//! `vtun cp`: turn operands into file systems (one connection per distinct host), run the
//! engine, report. Every host is connected through the [`Connector`] once and shared by all
//! operands naming it, so `a:x a:y b:` opens two connections, not three.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use super::file::{Engine, Options};
use super::fs::{Fs, RemoteFs};
use crate::error::Failure;
use crate::link::Connector;
use crate::progress::Progress;
use crate::settings::Settings;
use crate::sftp;
use crate::target::{Host, Location};

/// A remote operand's path for SFTP, whose relative paths start in the login directory:
/// `~` and `~/x` (which scp users type) become `` and `x`.
fn remote_path(path: &str) -> PathBuf {
    match path.strip_prefix('~') {
        Some("") => PathBuf::new(),
        Some(rest) if rest.starts_with('/') => PathBuf::from(rest.trim_start_matches('/')),
        _ => PathBuf::from(path),
    }
}

/// What `vtun cp` was asked to do.
#[derive(Debug, Clone)]
pub struct CpOptions {
    /// Sources, then the destination, as the user wrote them (`VM:PATH` or local).
    pub paths: Vec<String>,
    pub recursive: bool,
    pub preserve: bool,
    pub resume: bool,
    /// SSH channels per host for large files and many small ones.
    pub parallel: usize,
    /// Write a JSON summary line to `out`.
    pub json: bool,
}

/// Run `vtun cp`; `Ok(0)` when every source was copied. The `--json` summary goes to `out`.
pub async fn cp(
    settings: &Settings,
    args: &CpOptions,
    connector: &dyn Connector,
    out: &mut (dyn Write + Send),
) -> Result<u8> {
    if args.paths.len() < 2 {
        bail!("cp needs at least one source and a destination");
    }
    if args.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    let locations = args
        .paths
        .iter()
        .map(|s| settings.location(s))
        .collect::<Result<Vec<_>>>()?;
    let mut hosts: Vec<(Host, Fs)> = Vec::new();
    let mut resolved = Vec::with_capacity(locations.len());
    for loc in &locations {
        resolved.push(match loc {
            Location::Local(p) => (Fs::Local, p.clone()),
            Location::Remote { host, path } => {
                let fs = match hosts.iter().find(|(h, _)| h == host) {
                    Some((_, fs)) => fs.clone(),
                    None => {
                        let opener = connector.connect(host).await?;
                        let fs = Fs::Remote(Arc::new(RemoteFs::new(opener, args.parallel)));
                        hosts.push((host.clone(), fs.clone()));
                        fs
                    }
                };
                (fs, remote_path(path))
            }
        });
    }
    let Some((dst, dst_path)) = resolved.pop() else {
        bail!("cp needs a destination");
    };
    let opts = Options {
        recursive: args.recursive,
        preserve: args.preserve,
        resume: args.resume,
        parallel: args.parallel,
    };
    let progress = Progress::new(settings.quiet, settings.verbose > 0);
    let engine = Engine::new(opts, progress);
    let mut errors = engine.copy_many(&resolved, &dst, &dst_path).await;
    let summary = engine.progress.finish();
    tracing::info!(
        files = summary.files,
        bytes = summary.bytes,
        seconds = summary.seconds,
        mb_per_s = summary.mb_per_s,
        "copy finished"
    );
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&summary)?)
            .and_then(|()| out.flush())
            .context("cannot write to stdout")?;
    }
    let Some(last) = errors.pop() else {
        return Ok(0);
    };
    for e in &errors {
        eprintln!("vtun: {e:#}");
    }
    if sftp::is_closed(&last) {
        return Err(Failure::connection(format!("{last:#}")));
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_relative_remote_paths() {
        assert_eq!(remote_path("~"), PathBuf::new());
        assert_eq!(remote_path("~/a/b"), PathBuf::from("a/b"));
        assert_eq!(remote_path("~user/x"), PathBuf::from("~user/x"));
        assert_eq!(remote_path("/abs"), PathBuf::from("/abs"));
        assert_eq!(remote_path(""), PathBuf::new());
    }
}
