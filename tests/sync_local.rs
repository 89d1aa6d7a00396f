//! `vtun sync` end to end on one machine: the "remote" side is the real `vtun agent` binary run
//! as a local process through [`LocalConnector`]-style links, on local paths. Links here can
//! prefix the remote command (shell noise, a different PATH or HOME) or cut the stream, to
//! exercise discovery, upload and failure handling without a network.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use vtun::cli::{Cli, Command};
use vtun::link::{Connector, Link, RemoteIo, Subprocess};
use vtun::target::Host;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vtun"))
}

// Every test starts with `support::rerun_in_clean_env`, which runs it in a child process with a
// clean environment plus `VTUN_AGENT_BINARY` (a documented testing aid), so that uploads send
// the vtun binary, not this test executable.

/// A "remote" host that is this machine, with `prefix` run before every remote command.
struct Local {
    prefix: String,
    /// Cut the stream after this many bytes were written to the remote.
    cut_after: Option<usize>,
}

impl Local {
    /// `vtun` found on the remote PATH.
    fn on_path() -> Local {
        let dir = bin().parent().unwrap().to_path_buf();
        Local {
            prefix: format!("PATH='{}':\"$PATH\"; export PATH; ", dir.display()),
            cut_after: None,
        }
    }
}

struct LocalLink {
    inner: Subprocess,
    prefix: String,
    cut_after: Option<usize>,
}

impl Link for LocalLink {
    fn sftp(&self) -> BoxFuture<'_, anyhow::Result<Box<dyn RemoteIo>>> {
        self.inner.sftp()
    }
    fn exec(&self, command: &str) -> BoxFuture<'_, anyhow::Result<Box<dyn RemoteIo>>> {
        let cmd = format!("{}{command}", self.prefix);
        Box::pin(async move {
            let io = self.inner.exec(&cmd).await?;
            Ok(match self.cut_after {
                Some(n) => Box::new(Cut { io, left: n }) as Box<dyn RemoteIo>,
                None => io,
            })
        })
    }
    fn name(&self) -> &str {
        "local"
    }
}

impl Connector for Local {
    fn connect<'a>(&'a self, _host: &'a Host) -> BoxFuture<'a, anyhow::Result<Arc<dyn Link>>> {
        Box::pin(async move {
            let o: Arc<dyn Link> = Arc::new(LocalLink {
                inner: Subprocess::new()?,
                prefix: self.prefix.clone(),
                cut_after: self.cut_after,
            });
            Ok(o)
        })
    }
}

/// A stream that fails every write once `left` bytes have gone through: a dropped connection.
struct Cut {
    io: Box<dyn RemoteIo>,
    left: usize,
}

impl AsyncRead for Cut {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Cut {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.left == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()));
        }
        let n = buf.len().min(self.left);
        let r = Pin::new(&mut self.io).poll_write(cx, &buf[..n]);
        if let Poll::Ready(Ok(k)) = r {
            self.left -= k;
            if self.left == 0 {
                // Close our side, as a dead connection would.
                let _ = Pin::new(&mut self.io).poll_shutdown(cx);
            }
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Run `vtun sync ARGS…` in-process; returns stdout lines.
fn sync_with(conn: &dyn Connector, args: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut argv = vec!["vtun", "sync"];
    argv.extend_from_slice(args);
    let cli = <Cli as clap::Parser>::try_parse_from(&argv).unwrap();
    let Command::Sync(a) = cli.command else {
        panic!("not a sync command")
    };
    let settings = vtun::cmd::settings(&cli.global, &[]).unwrap();
    let a = vtun::cmd::sync::options(&a);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut out = Vec::new();
    rt.block_on(vtun::sync::run_sync(&settings, &a, conn, &mut out))?;
    Ok(String::from_utf8(out)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect())
}

fn sync(args: &[&str]) -> Vec<String> {
    sync_with(&Local::on_path(), args).unwrap()
}

fn remote(p: &Path) -> String {
    format!("vm:{}", p.display())
}

fn slash(p: &Path) -> String {
    format!("{}/", p.display())
}

/// Everything a sync preserves, by relative path: kind, mode, mtime, content hash or target.
fn digest(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut items: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        items.sort_by_key(|e| e.file_name());
        for e in items {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let what = if m.file_type().is_symlink() {
                format!(
                    "link {} {}.{}",
                    std::fs::read_link(&p).unwrap().display(),
                    m.mtime(),
                    m.mtime_nsec()
                )
            } else if m.is_dir() {
                walk(root, &p, out);
                format!(
                    "dir {:o} {}.{}",
                    m.permissions().mode() & 0o7777,
                    m.mtime(),
                    m.mtime_nsec()
                )
            } else {
                format!(
                    "file {:o} {}.{} {}",
                    m.permissions().mode() & 0o7777,
                    m.mtime(),
                    m.mtime_nsec(),
                    blake3::hash(&std::fs::read(&p).unwrap()).to_hex()
                )
            };
            out.insert(rel, what);
        }
    }
    walk(root, root, &mut out);
    out
}

fn write(p: &Path, data: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

fn set_mtime(p: &Path, secs: u64) {
    let f = std::fs::File::options().write(true).open(p).unwrap();
    f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::new(secs, 123_456_789))
        .unwrap();
}

/// A small tree with nested dirs, modes, old mtimes and symlinks.
fn fixture(root: &Path) {
    write(&root.join("a.txt"), b"alpha");
    write(&root.join("bin/run.sh"), b"#!/bin/sh\necho hi\n");
    std::fs::set_permissions(
        root.join("bin/run.sh"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    write(&root.join("deep/er/still/x.bin"), &vec![7u8; 100_000]);
    write(&root.join("empty"), b"");
    std::os::unix::fs::symlink("a.txt", root.join("link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/abs", root.join("dangling")).unwrap();
    set_mtime(&root.join("a.txt"), 1_000_000_000);
    set_mtime(&root.join("deep/er/still/x.bin"), 1_100_000_000);
}

#[test]
fn every_direction_preserves_metadata_and_reruns_are_no_ops() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fixture(&src);
    let want = digest(&src);
    let cases = [
        ("local→remote", slash(&src), remote(&t.path().join("d1"))),
        (
            "remote→local",
            format!("vm:{}/", t.path().join("d1").display()),
            t.path().join("d2").display().to_string(),
        ),
        (
            "remote→remote",
            format!("vm:{}/", t.path().join("d2").display()),
            remote(&t.path().join("d3")),
        ),
        (
            "local→local",
            slash(&t.path().join("d3")),
            t.path().join("d4").display().to_string(),
        ),
    ];
    for (i, (what, from, to)) in cases.iter().enumerate() {
        let lines = sync(&["-i", from, to]);
        assert!(
            lines.iter().any(|l| l == ">f+++++++++ a.txt"),
            "{what}: {lines:?}"
        );
        assert!(
            lines.iter().any(|l| l == "cL+++++++++ link -> a.txt"),
            "{what}: {lines:?}"
        );
        let dst = t.path().join(format!("d{}", i + 1));
        assert_eq!(digest(&dst), want, "{what}");
        assert_eq!(
            sync(&["-i", from, to]),
            Vec::<String>::new(),
            "{what} re-run"
        );
    }
}

#[test]
fn trailing_slash_decides_between_contents_and_the_directory() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fixture(&src);
    sync(&[&src.display().to_string(), &remote(&t.path().join("named"))]);
    assert_eq!(digest(&t.path().join("named/src")), digest(&src));
    assert!(!t.path().join("named/a.txt").exists());
    sync(&[&slash(&src), &remote(&t.path().join("contents"))]);
    assert_eq!(digest(&t.path().join("contents")), digest(&src));
    // A single file into a directory.
    sync(&[
        &src.join("a.txt").display().to_string(),
        &remote(&t.path().join("one")),
    ]);
    assert_eq!(std::fs::read(t.path().join("one/a.txt")).unwrap(), b"alpha");
}

#[test]
fn delete_respects_excludes_unless_delete_excluded() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("s"), t.path().join("d"));
    write(&src.join("keep"), b"k");
    write(&dst.join("stale/file"), b"s");
    write(&dst.join("log.tmp"), b"excluded");
    let (s, d) = (slash(&src), remote(&dst));
    sync(&[&s, &d]);
    assert!(
        dst.join("stale/file").exists(),
        "no --delete, nothing deleted"
    );
    let lines = sync(&["-i", "--delete", "--exclude", "*.tmp", &s, &d]);
    assert!(
        lines.contains(&"*deleting   stale/".to_string()),
        "{lines:?}"
    );
    assert!(!dst.join("stale").exists());
    assert!(dst.join("log.tmp").exists(), "excluded entries are kept");
    // A directory that only holds excluded entries is kept, as rsync does, without failing.
    write(&dst.join("old/x.tmp"), b"kept");
    write(&dst.join("old/y"), b"goes");
    sync(&["--delete", "--exclude", "*.tmp", &s, &d]);
    assert!(dst.join("old/x.tmp").exists());
    assert!(!dst.join("old/y").exists());
    sync(&["--delete-excluded", "--exclude", "*.tmp", &s, &d]);
    assert!(!dst.join("old").exists());
    assert!(!dst.join("log.tmp").exists());
    assert!(dst.join("keep").exists());
}

#[test]
fn each_pattern_rule_applies_end_to_end() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("s");
    for f in [
        "top.txt",
        "sub/top.txt",
        "a.o",
        "sub/b.o",
        "cache/x",
        "sub/cache",
        "logs/a/b.log",
        "keep/logs.txt",
        "file1",
        "file22",
        "node_modules/m/i.js",
    ] {
        write(&src.join(f), b"x");
    }
    let from = t.path().join("excl");
    std::fs::write(&from, "# comment\nnode_modules\n- file?\n").unwrap();
    let dst = t.path().join("d");
    sync(&[
        "--exclude",
        "/top.txt",
        "--exclude",
        "*.o",
        "--exclude",
        "cache/",
        "--exclude",
        "logs/**",
        "--exclude-from",
        &from.display().to_string(),
        &slash(&src),
        &remote(&dst),
    ]);
    let got: Vec<String> = digest(&dst)
        .into_iter()
        .filter(|(_, v)| v.starts_with("file"))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        got,
        ["file22", "keep/logs.txt", "sub/cache", "sub/top.txt"],
        "anchored /top.txt, *.o at any depth, cache/ dirs only, logs/** contents, exclude-from"
    );
}

#[test]
fn dry_run_changes_nothing() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("s"), t.path().join("d"));
    fixture(&src);
    write(&dst.join("extra"), b"e");
    write(&dst.join("a.txt"), b"old");
    let before = digest(&dst);
    let lines = sync(&["-n", "--delete", &slash(&src), &remote(&dst)]);
    assert!(
        lines.contains(&"*deleting   extra".to_string()),
        "{lines:?}"
    );
    assert!(
        lines.contains(&">f.st...... a.txt".to_string()),
        "{lines:?}"
    );
    assert_eq!(digest(&dst), before);
}

#[test]
fn small_change_in_a_large_file_goes_as_a_delta() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("s"), t.path().join("d"));
    let mut data: Vec<u8> = (0..4_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    write(&src.join("big"), &data);
    sync(&[&slash(&src), &remote(&dst)]);
    data[2_000_000..2_000_008].copy_from_slice(b"CHANGED!");
    data.splice(10..10, *b"inserted at the start");
    data.extend_from_slice(b"and at the end");
    write(&src.join("big"), &data);
    let lines = sync(&["-i", "--json", &slash(&src), &remote(&dst)]);
    assert_eq!(std::fs::read(dst.join("big")).unwrap(), data);
    let j: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(j["files"], 1);
    let wire = j["bytes_on_wire"].as_u64().unwrap();
    assert!(
        wire < 200_000,
        "sent {wire} bytes for a 4 MB file with 3 small edits"
    );
    assert_eq!(digest(&dst), digest(&src));
}

#[test]
fn shell_noise_before_the_agent_is_skipped() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("s"), t.path().join("d"));
    fixture(&src);
    let mut conn = Local::on_path();
    conn.prefix = format!(
        "printf 'Welcome!\\n\\000vtun-agent garbage \\033[1m\\n'; echo motd >&2; {}",
        conn.prefix
    );
    sync_with(&conn, &[&slash(&src), &remote(&dst)]).unwrap();
    assert_eq!(digest(&dst), digest(&src));
}

#[test]
fn agent_is_uploaded_when_missing_then_reused() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let (src, dst) = (t.path().join("s"), t.path().join("d"));
    fixture(&src);
    let conn = Local {
        prefix: format!(
            "HOME='{}'; PATH=/usr/bin:/bin; export HOME PATH; ",
            home.display()
        ),
        cut_after: None,
    };
    sync_with(&conn, &[&slash(&src), &remote(&dst)]).unwrap();
    let cached = home.join(format!(".cache/vtun/agent-{}", env!("CARGO_PKG_VERSION")));
    assert_eq!(
        std::fs::read(&cached).unwrap(),
        std::fs::read(bin()).unwrap()
    );
    assert_eq!(digest(&dst), digest(&src));
    // Second time the cached agent is used (a changed file proves it still works).
    write(&src.join("a.txt"), b"changed");
    let lines = sync_with(&conn, &["-i", &slash(&src), &remote(&dst)]).unwrap();
    assert_eq!(lines, [">f.st...... a.txt"]);
    assert_eq!(digest(&dst), digest(&src));
}

#[test]
fn cut_connection_leaves_no_truncated_file_and_rerun_completes() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("s"), t.path().join("d"));
    for i in 0..6 {
        write(&src.join(format!("f{i}")), &vec![i as u8; 700_000]);
    }
    write(&dst.join("f3"), b"old content");
    let mut conn = Local::on_path();
    conn.cut_after = Some(2_500_000);
    assert!(sync_with(&conn, &[&slash(&src), &remote(&dst)]).is_err());
    // The agent is killed with its connection; wait until it is gone (it can no longer write
    // anything), then look. This process runs only this test (rerun_in_clean_env).
    support::wait_until(
        std::time::Duration::from_secs(20),
        "the agent exits after the cut",
        || support::live_children().is_empty(),
    );
    for i in 0..6 {
        let name = format!("f{i}");
        if let Ok(got) = std::fs::read(dst.join(&name)) {
            let whole = std::fs::read(src.join(&name)).unwrap();
            assert!(
                got == whole || (name == "f3" && got == b"old content"),
                "{name} truncated"
            );
        }
    }
    sync(&[&slash(&src), &remote(&dst)]);
    assert_eq!(digest(&dst), digest(&src));
}

#[test]
fn crafted_listing_with_dotdot_is_refused() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    use vtun::agent::protocol::{hello, Msg};
    use vtun::sync::listing::{Entry, EntryKind, RelPath};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        // A fake agent that answers any listing with an entry named "..".
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            theirs.write_all(b"noise\n").await.unwrap();
            theirs.write_all(&hello()).await.unwrap();
            let mut h = [0u8; 16];
            theirs.read_exact(&mut h).await.unwrap();
            let entry = Entry {
                path: RelPath::parse("ab").unwrap(),
                kind: EntryKind::File { size: 1 },
                mode: 0o644,
                mtime: vtun::fs::FileTime::default(),
                hash: None,
            };
            let (tag, mut body) = Msg::ListingPart(vec![entry]).encode();
            let at = body.windows(2).position(|w| w == b"ab").unwrap();
            body[at..at + 2].copy_from_slice(b"..");
            loop {
                let Ok(m) = vtun::agent::protocol::read_msg(&mut theirs).await else {
                    return;
                };
                match m {
                    Some((Msg::List(_), _)) => {
                        theirs
                            .write_all(&(body.len() as u32 + 1).to_le_bytes())
                            .await
                            .unwrap();
                        theirs.write_all(&[tag]).await.unwrap();
                        theirs.write_all(&body).await.unwrap();
                    }
                    Some(_) => {}
                    None => return,
                }
            }
        });
        let mut ep = vtun::agent::AgentEndpoint::over(Box::new(ours), "/tmp")
            .await
            .unwrap();
        use vtun::sync::endpoint::Endpoint;
        let err = ep.list(Default::default()).await.unwrap_err();
        assert!(format!("{err:#}").contains("unsafe path"), "{err:#}");
    });
}

#[test]
fn checksum_catches_same_size_same_mtime_changes() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("s"), t.path().join("d"));
    write(&src.join("f"), b"aaaa");
    set_mtime(&src.join("f"), 1_200_000_000);
    let (s, d) = (slash(&src), remote(&dst));
    sync(&[&s, &d]);
    // Same size, same mtime, different content: the quick check cannot see it.
    write(&dst.join("f"), b"bbbb");
    set_mtime(&dst.join("f"), 1_200_000_000);
    assert_eq!(sync(&["-i", &s, &d]), Vec::<String>::new());
    assert_eq!(sync(&["-i", "--size-only", &s, &d]), Vec::<String>::new());
    assert_eq!(sync(&["-i", "-c", &s, &d]), [">fc........ f"]);
    assert_eq!(std::fs::read(dst.join("f")).unwrap(), b"aaaa");
}

#[test]
fn symlinks_in_the_destination_are_replaced_not_followed() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (src, dst, outside) = (t.path().join("s"), t.path().join("d"), t.path().join("out"));
    write(&src.join("sub/file"), b"data");
    write(&src.join("plain"), b"p");
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, dst.join("sub")).unwrap();
    std::os::unix::fs::symlink(outside.join("victim"), dst.join("plain")).unwrap();
    sync(&[&slash(&src), &remote(&dst)]);
    assert!(
        std::fs::read_dir(&outside).unwrap().next().is_none(),
        "wrote through a link"
    );
    assert_eq!(digest(&dst), digest(&src));
}

#[test]
fn big_sync_spreads_over_parallel_agents() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("s");
    for i in 0..12u32 {
        let data: Vec<u8> = (0..1_000_000u32)
            .map(|j| (j ^ i).wrapping_mul(31) as u8)
            .collect();
        write(&src.join(format!("dir{}/f{i}", i % 3)), &data);
    }
    let (d1, d2) = (t.path().join("d1"), t.path().join("d2"));
    let lines = sync(&["--json", &slash(&src), &remote(&d1)]);
    let j: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(j["files"], 12);
    assert_eq!(digest(&d1), digest(&src));
    sync(&[&format!("vm:{}/", d1.display()), &remote(&d2)]);
    assert_eq!(digest(&d2), digest(&src));
}

/// What a sync over plain SFTP can preserve: as [`digest`], but mtimes in whole seconds (SFTP v3
/// carries no more) and no symlink mtimes (SFTP cannot set them without following the link).
fn digest_seconds(root: &Path) -> BTreeMap<String, String> {
    digest(root)
        .into_iter()
        .map(|(path, what)| {
            // "file MODE S.NS HASH", "dir MODE S.NS" or "link TARGET S.NS": the time is third.
            let mut words: Vec<String> = what.split(' ').map(str::to_string).collect();
            if words[0] == "link" {
                words.truncate(2);
            } else {
                words[2] = words[2].split('.').next().unwrap().to_string();
            }
            (path, words.join(" "))
        })
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn no_agent_matches_the_agent_in_every_direction_and_reruns_are_no_ops() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fixture(&src);
    let want = digest_seconds(&src);
    let with_agent = sync(&["-i", &slash(&src), &remote(&t.path().join("agent"))]);
    assert_eq!(digest_seconds(&t.path().join("agent")), want);
    let cases = [
        ("local→remote", slash(&src), remote(&t.path().join("n1"))),
        (
            "remote→local",
            format!("vm:{}/", t.path().join("n1").display()),
            t.path().join("n2").display().to_string(),
        ),
        (
            "remote→remote",
            format!("vm:{}/", t.path().join("n2").display()),
            remote(&t.path().join("n3")),
        ),
    ];
    for (i, (what, from, to)) in cases.iter().enumerate() {
        let lines = sync(&["-i", "--no-agent", from, to]);
        assert_eq!(sorted(lines), sorted(with_agent.clone()), "{what}");
        let dst = t.path().join(format!("n{}", i + 1));
        assert_eq!(digest_seconds(&dst), want, "{what}");
        assert_eq!(
            sync(&["-i", "--no-agent", from, to]),
            Vec::<String>::new(),
            "{what} re-run"
        );
        // SFTP cannot set a link's own mtime, so a link made by it has the time it was made;
        // the agent then sets it, as rsync -a would, and only that.
        let fixed = sync(&["-i", from, to]);
        assert!(
            fixed.iter().all(|l| l.starts_with(".L..t...... ")),
            "{what} re-run through the agent: {fixed:?}"
        );
        assert_eq!(
            sync(&["-i", from, to]),
            Vec::<String>::new(),
            "{what} second re-run through the agent"
        );
    }
    // A change after a whole-second sync is still seen.
    write(&src.join("a.txt"), b"changed");
    let n1 = remote(&t.path().join("n1"));
    assert_eq!(
        sync(&["-i", "--no-agent", &slash(&src), &n1]),
        [">f.st...... a.txt"]
    );
    assert_eq!(digest_seconds(&t.path().join("n1")), digest_seconds(&src));
}

#[test]
fn no_agent_delete_respects_excludes_unless_delete_excluded() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("s"), t.path().join("d"));
    write(&src.join("keep"), b"k");
    write(&src.join("skip.tmp"), b"not copied");
    write(&dst.join("stale/deeper/file"), b"s");
    write(&dst.join("log.tmp"), b"excluded");
    write(&dst.join("old/x.tmp"), b"kept");
    write(&dst.join("old/y"), b"goes");
    let (s, d) = (slash(&src), remote(&dst));
    let lines = sync(&["-i", "--no-agent", "--delete", "--exclude", "*.tmp", &s, &d]);
    assert!(
        lines.contains(&"*deleting   stale/".to_string()),
        "{lines:?}"
    );
    assert!(!dst.join("stale").exists());
    assert!(
        !dst.join("skip.tmp").exists(),
        "excluded source entry copied"
    );
    assert!(dst.join("log.tmp").exists(), "excluded entries are kept");
    assert!(dst.join("old/x.tmp").exists());
    assert!(!dst.join("old/y").exists());
    assert_eq!(std::fs::read(dst.join("keep")).unwrap(), b"k");
    sync(&[
        "--no-agent",
        "--delete-excluded",
        "--exclude",
        "*.tmp",
        &s,
        &d,
    ]);
    assert!(!dst.join("old").exists());
    assert!(!dst.join("log.tmp").exists());
    assert!(dst.join("keep").exists());
}

#[test]
fn checksum_without_an_agent_is_refused_clearly() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("s");
    write(&src.join("f"), b"x");
    let err = sync_with(
        &Local::on_path(),
        &[
            "-c",
            "--no-agent",
            &slash(&src),
            &remote(&t.path().join("d")),
        ],
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("--checksum needs the sync agent"), "{msg}");
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert!(!t.path().join("d").exists());
}

#[test]
fn no_agent_never_writes_through_symlinks_in_the_destination() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (src, dst, outside) = (t.path().join("s"), t.path().join("d"), t.path().join("out"));
    write(&src.join("sub/file"), b"data");
    write(&src.join("plain"), b"p");
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, dst.join("sub")).unwrap();
    std::os::unix::fs::symlink(outside.join("victim"), dst.join("plain")).unwrap();
    sync(&["--no-agent", &slash(&src), &remote(&dst)]);
    assert!(
        std::fs::read_dir(&outside).unwrap().next().is_none(),
        "wrote through a link"
    );
    assert_eq!(digest_seconds(&dst), digest_seconds(&src));
}

#[test]
fn host_that_cannot_run_the_agent_falls_back_to_sftp() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (home, fake) = (t.path().join("home"), t.path().join("fakebin"));
    std::fs::create_dir(&home).unwrap();
    write(&fake.join("uname"), b"#!/bin/sh\necho Plan9 mips\n");
    std::fs::set_permissions(fake.join("uname"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let conn = Local {
        prefix: format!(
            "HOME='{}'; PATH='{}':/usr/bin:/bin; export HOME PATH; ",
            home.display(),
            fake.display()
        ),
        cut_after: None,
    };
    let (src, dst) = (t.path().join("s"), t.path().join("d"));
    fixture(&src);
    sync_with(&conn, &[&slash(&src), &remote(&dst)]).unwrap();
    assert_eq!(digest_seconds(&dst), digest_seconds(&src));
    assert!(!home.join(".cache").exists(), "nothing uploaded");
    let again = sync_with(&conn, &["-i", &slash(&src), &remote(&dst)]).unwrap();
    assert_eq!(again, Vec::<String>::new());
}

/// A frame as a peer writes it: length, tag, body.
fn raw_frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32 + 1).to_le_bytes().to_vec();
    f.push(tag);
    f.extend_from_slice(body);
    f
}

#[test]
fn hostile_client_frames_with_huge_counts_or_sizes_are_refused_by_the_agent() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use vtun::agent::protocol::{hello, Msg};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t = tempfile::tempdir().unwrap();
    let root = t.path().to_str().unwrap().to_string();
    // Send (4) with four billion requests in 9 bytes; Apply (7) declaring 512 MiB of ops.
    let mut send = u32::MAX.to_le_bytes().to_vec();
    send.extend_from_slice(&[0; 9]);
    let huge_apply = {
        let mut f = (512u32 << 20).to_le_bytes().to_vec();
        f.push(7);
        f
    };
    for (attack, want) in [
        (raw_frame(4, &send), "exceeds message size"),
        (huge_apply, "exceeds its limit"),
    ] {
        let root = root.clone();
        let err = rt.block_on(async move {
            let (ours, theirs) = tokio::io::duplex(1 << 16);
            let (tr, tw) = tokio::io::split(theirs);
            let agent = tokio::spawn(vtun::agent::serve::serve(tr, tw));
            let (mut r, mut w) = tokio::io::split(ours);
            let mut h = [0u8; 16];
            r.read_exact(&mut h).await.unwrap();
            assert_eq!(h, hello());
            w.write_all(&hello()).await.unwrap();
            let (tag, body) = Msg::Root(root).encode();
            w.write_all(&raw_frame(tag, &body)).await.unwrap();
            w.write_all(&attack).await.unwrap();
            w.flush().await.unwrap();
            agent.await.unwrap().unwrap_err()
        });
        assert!(format!("{err:#}").contains(want), "{err:#}");
    }
}

#[test]
fn hostile_agent_reply_with_a_huge_signature_count_is_a_clean_error() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    use vtun::agent::protocol::{hello, Msg};
    use vtun::sync::endpoint::Endpoint;
    use vtun::sync::listing::RelPath;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            theirs.write_all(&hello()).await.unwrap();
            let mut h = [0u8; 16];
            theirs.read_exact(&mut h).await.unwrap();
            while let Ok(Some((m, _))) = vtun::agent::protocol::read_msg(&mut theirs).await {
                if let Msg::Signatures(_) = m {
                    // Sigs claiming four billion entries, in five bytes.
                    let mut body = u32::MAX.to_le_bytes().to_vec();
                    body.push(0);
                    theirs.write_all(&raw_frame(102, &body)).await.unwrap();
                }
            }
        });
        let mut ep = vtun::agent::AgentEndpoint::over(Box::new(ours), "/tmp")
            .await
            .unwrap();
        let err = ep
            .signatures(vec![RelPath::parse("f").unwrap()])
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("exceeds message size"),
            "{err:#}"
        );
    });
}

/// A file truncated by another process while it is being sent, whole or as a delta: the
/// sender (which used to map it, and die of SIGBUS) abandons it with a `Skip` saying it
/// changed, after its `Start`, so the receiver drops what it has of it.
#[test]
fn file_truncated_while_sent_is_skipped_as_changed_not_sigbus() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    use vtun::sync::endpoint::{Endpoint, Piece, SendReq};
    use vtun::sync::listing::RelPath;
    use vtun::sync::local::LocalEndpoint;
    let t = tempfile::tempdir().unwrap();
    // Random past its first MiB, so a delta against that MiB is literals, sent as it is read.
    let mut x = 88172645463325252u64;
    let data: Vec<u8> = (0..24u32 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let old = t.path().join("old");
    write(&old, &data[..1 << 20]);
    let sig = vtun::delta::signature(&std::fs::File::open(&old).unwrap()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for signature in [None, Some(sig)] {
        let path = t.path().join("f");
        write(&path, &data);
        let mut ep = LocalEndpoint::new(t.path());
        let req = SendReq {
            path: RelPath::parse("f").unwrap(),
            signature: signature.clone(),
        };
        let pieces = rt.block_on(async {
            // One piece in flight: the sender is at most a piece or two ahead of us.
            let (tx, mut rx) = tokio::sync::mpsc::channel(1);
            let send = tokio::spawn(async move { ep.send(vec![req], tx).await });
            let mut got = Vec::new();
            while let Some(p) = rx.recv().await {
                if matches!(p, Piece::Data(_)) && got.len() == 1 {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .unwrap()
                        .set_len(1000)
                        .unwrap();
                }
                got.push(p);
            }
            send.await.unwrap().unwrap();
            got
        });
        let delta = signature.is_some();
        assert!(matches!(pieces[0], Piece::Start { .. }), "delta {delta}");
        match pieces.last() {
            Some(Piece::Skip { path, reason }) => {
                assert_eq!(path.as_str(), "f");
                assert_eq!(reason, "changed while being read", "delta {delta}");
            }
            other => panic!("delta {delta}: ended with {other:?}"),
        }
    }
}

/// More requests than one frame carries (`REQUEST_ITEMS`): 5,000 files sent by the agent
/// (their `Send` requests in two frames) and 5,000 mode changes applied by it (`Apply` in two
/// pipelined frames) arrive complete and in order.
#[test]
fn requests_split_over_frames_arrive_complete() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    const { assert!(vtun::agent::protocol::REQUEST_ITEMS < 5000) };
    let t = tempfile::tempdir().unwrap();
    let (src, back, there) = (t.path().join("s"), t.path().join("b"), t.path().join("t"));
    for i in 0..5000 {
        write(
            &src.join(format!("d{}/f{i}", i % 7)),
            format!("{i}").as_bytes(),
        );
    }
    sync(&[&format!("vm:{}/", src.display()), &slash(&back)]);
    assert_eq!(digest(&back), digest(&src));
    sync(&[&slash(&src), &remote(&there)]);
    for i in 0..5000 {
        let p = src.join(format!("d{}/f{i}", i % 7));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let lines = sync(&["-i", &slash(&src), &remote(&there)]);
    assert_eq!(lines.len(), 5000, "one mode change per file");
    assert_eq!(digest(&there), digest(&src));
}

/// `--exclude '**/x.txt'` once kept a top-level `x.txt`; rsync excludes it (a pattern starting
/// with `**` also matches at the top), and `dir/***` never excludes a file named `dir`.
#[test]
fn exclude_double_star_slash_also_matches_at_the_top() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("s");
    for f in [
        "x.txt",
        "a/x.txt",
        "a/b/x.txt",
        "ax.txt",
        "dir/in",
        "sub/dir",
    ] {
        write(&src.join(f), b"x");
    }
    let dst = t.path().join("d");
    sync(&[
        "--exclude",
        "**/x.txt",
        "--exclude",
        "dir/***",
        &slash(&src),
        &remote(&dst),
    ]);
    let got: Vec<String> = digest(&dst)
        .into_iter()
        .filter(|(_, v)| v.starts_with("file"))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(got, ["ax.txt", "sub/dir"]);
}

/// A file `--size-only` (or `-c`) skips once kept its old mtime and mode; `rsync -a` sets both and
/// itemizes `.f..t......` / `.f...p.....`.
#[test]
fn size_only_and_checksum_skips_still_set_mtime_and_mode() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("s"), t.path().join("d"));
    write(&src.join("f"), b"aaaa");
    write(&src.join("g"), b"cccc");
    set_mtime(&src.join("f"), 1_200_000_000);
    set_mtime(&src.join("g"), 1_200_000_000);
    let (s, d) = (slash(&src), remote(&dst));
    sync(&[&s, &d]);
    write(&dst.join("f"), b"bbbb");
    set_mtime(&dst.join("f"), 1_300_000_000);
    std::fs::set_permissions(dst.join("g"), std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        sync(&["-i", "--size-only", &s, &d]),
        [".f..t...... f", ".f...p..... g"]
    );
    assert_eq!(
        std::fs::read(dst.join("f")).unwrap(),
        b"bbbb",
        "content kept"
    );
    let mut want = digest(&src);
    let mut got = digest(&dst);
    want.remove("f");
    got.remove("f");
    assert_eq!(got, want);
    let m = std::fs::metadata(dst.join("f")).unwrap();
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_200_000_000, 123_456_789));
    // -c: same content, other mtime: only the time is set.
    write(&dst.join("g"), b"cccc");
    set_mtime(&dst.join("g"), 1_300_000_000);
    std::fs::set_permissions(dst.join("g"), std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(
        sync(&["-i", "-c", &s, &d]),
        [">fc........ f", ".f..t...... g"]
    );
    assert_eq!(digest(&dst), digest(&src));
}

/// A file that replaces a directory once took the directory's excluded entries with it, and
/// without `--delete` replaced a non-empty directory outright; rsync does neither (it needs
/// `--delete` to empty it, keeps what is excluded, and reports that it could not make way).
#[test]
fn type_change_keeps_excluded_entries_and_needs_delete_to_empty_a_directory() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("s"), t.path().join("d"));
    write(&src.join("x"), b"now a file");
    write(&src.join("other"), b"o");
    write(&dst.join("x/keep.tmp"), b"excluded, so kept");
    write(&dst.join("x/inner"), b"listed, so deleted");
    let (s, d) = (slash(&src), remote(&dst));
    let err = sync_with(&Local::on_path(), &[&s, &d]).unwrap_err();
    assert!(
        format!("{err:#}").contains("could not be synced"),
        "{err:#}"
    );
    assert!(
        dst.join("x/inner").exists(),
        "nothing inside goes without --delete"
    );
    assert_eq!(
        std::fs::read(dst.join("other")).unwrap(),
        b"o",
        "the rest is synced"
    );

    let args = ["-i", "--delete", "--exclude", "*.tmp", &s, &d];
    assert!(sync_with(&Local::on_path(), &args).is_err());
    assert!(!dst.join("x/inner").exists());
    assert!(dst.join("x/keep.tmp").exists());

    std::fs::remove_file(dst.join("x/keep.tmp")).unwrap();
    assert_eq!(
        sync_with(&Local::on_path(), &args).unwrap(),
        [">f+++++++++ x"],
        "rsync itemizes the new file, not the directory it replaced"
    );
    assert_eq!(std::fs::read(dst.join("x")).unwrap(), b"now a file");
}

/// `-i` once printed a name with a newline as two lines; rsync escapes it as `\#012`.
#[test]
fn itemized_names_escape_control_characters_like_rsync() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("s"), t.path().join("d"));
    write(&src.join("a\nb"), b"x");
    std::os::unix::fs::symlink("t\rx", src.join("l")).unwrap();
    let mut got = sync(&["-i", &slash(&src), &remote(&dst)]);
    got.sort();
    assert_eq!(
        got,
        [
            ">f+++++++++ a\\#012b",
            "cL+++++++++ l -> t\\#015x",
            "cd+++++++++ ./"
        ]
    );
}

/// A source file over a destination directory that only a directory rule (`--exclude 'x/'`)
/// excludes: the directory makes way for the file, as in rsync (empty: always; with contents:
/// with --delete, which removes them first). Both the agent and the local writer.
#[test]
fn file_replaces_a_directory_that_only_a_dir_rule_excludes() {
    if support::rerun_in_clean_env(&[("VTUN_AGENT_BINARY", bin().as_os_str())]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("s");
    write(&src.join("x"), b"file");
    for (n, remote_dst) in [true, false].into_iter().enumerate() {
        let dst = t.path().join(format!("d{n}"));
        let (s, d) = if remote_dst {
            (slash(&src), remote(&dst))
        } else {
            (remote(&src) + "/", dst.display().to_string())
        };
        std::fs::create_dir_all(dst.join("x")).unwrap();
        sync(&["--exclude", "x/", &s, &d]);
        assert_eq!(std::fs::read(dst.join("x")).unwrap(), b"file");

        std::fs::remove_file(dst.join("x")).unwrap();
        write(&dst.join("x/inner"), b"old");
        let err = sync_with(&Local::on_path(), &["--exclude", "x/", &s, &d]).unwrap_err();
        assert!(format!("{err:#}").contains("x"), "{err:#}");
        assert_eq!(std::fs::read(dst.join("x/inner")).unwrap(), b"old");
        let lines = sync(&["-i", "--delete", "--exclude", "x/", &s, &d]);
        assert!(
            lines.contains(&"*deleting   x/inner".to_string()),
            "{lines:?}"
        );
        assert_eq!(std::fs::read(dst.join("x")).unwrap(), b"file");
    }
}
