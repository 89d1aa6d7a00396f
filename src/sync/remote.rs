//! The remote side of a sync: find (or upload) `vtun agent` on a host and talk to it.
//!
//! Discovery is one exec channel running one POSIX `sh` script, so it costs one round trip when
//! an agent is there. The script tries, in order: `$VTUN_AGENT_PATH` from *our* environment (a
//! testing aid), `vtun` on the remote PATH, and `~/.cache/vtun/agent-<version>`, each only if
//! `VTUN_AGENT_PROBE=1 <it> agent` reports our protocol version; the first that does is exec'd.
//! Otherwise it prints a marker with `uname -sm` and waits for a line from us: `upload SIZE
//! SHA256` followed by this binary (when the platforms match), which it checks, makes executable,
//! renames into the cache and execs; or `quit`. Everything the remote shell prints before the
//! agent's magic bytes (banners from `.bashrc`) is skipped.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::sync::mpsc;

use super::endpoint::{Endpoint, Op, Piece, RecvReport, SendReq};
use super::protocol::{
    expect_msg, hello, write_msg, Msg, MAGIC, MAX_ENTRIES, MAX_SIG, PROTO, REQUEST_ITEMS,
    REQUEST_PART,
};
use super::tree::{ListOpts, Listing, RelPath};
use crate::link::{Link as Opener, RemoteIo};

const NO_AGENT: &[u8] = b"\nVTUN-NO-AGENT ";
/// How much shell noise we read before giving up on finding the agent.
const MAX_NOISE: usize = 1 << 20;

type Reader = BufReader<ReadHalf<Box<dyn RemoteIo>>>;
type Writer = BufWriter<WriteHalf<Box<dyn RemoteIo>>>;

/// A sync root served by a remote agent.
pub struct AgentEndpoint {
    r: Reader,
    w: Writer,
    wire: u64,
    /// How to open another connection to the same root (for parallel transfers).
    again: Option<(Arc<dyn Opener>, String)>,
}

/// Quote for POSIX sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The discovery script (see the module docs).
pub fn discovery_script(override_path: Option<&str>) -> String {
    let version = env!("CARGO_PKG_VERSION");
    let probe = super::agent::probe_line();
    let first = override_path.map(sh_quote).unwrap_or_else(|| "''".into());
    let script = format!(
        r#"C="$HOME/.cache/vtun/agent-{version}"
for a in {first} "$(command -v vtun 2>/dev/null)" "$C"; do
  if [ -n "$a" ] && [ -x "$a" ] && VTUN_AGENT_PROBE=1 "$a" agent </dev/null 2>/dev/null | grep -qx '{probe}'; then exec "$a" agent; fi
done
printf '\nVTUN-NO-AGENT %s\n' "$(uname -sm)"
read -r cmd size sum || exit 1
[ "$cmd" = upload ] || exit 0
mkdir -p "$HOME/.cache/vtun" || exit 1
T="$C.tmp.$$"
head -c "$size" > "$T"
ok=1
[ "$(wc -c < "$T" | tr -d ' ')" = "$size" ] || ok=0
if command -v sha256sum >/dev/null 2>&1; then [ "$(sha256sum < "$T" | cut -d' ' -f1)" = "$sum" ] || ok=0; fi
if [ $ok = 1 ] && chmod 755 "$T" && mv -f "$T" "$C"; then exec "$C" agent; fi
rm -f "$T"
echo 'vtun: agent upload failed verification' >&2
exit 1
"#
    );
    format!("exec sh -c {}", sh_quote(&script))
}

/// This machine as `uname -sm` prints it.
pub fn local_uname() -> String {
    // SAFETY: utsname is plain data; uname fills it with NUL-terminated strings.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    let field = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).to_string()
    };
    format!("{} {}", field(&u.sysname), field(&u.machine))
}

enum Found {
    Agent,
    NoAgent { uname: String },
}

/// Skip shell noise until the agent's magic or the script's no-agent marker.
async fn scan(r: &mut Reader) -> Result<Found> {
    let mut tail: Vec<u8> = Vec::new();
    let mut seen = 0usize;
    loop {
        let b = match r.read_u8().await {
            Ok(b) => b,
            Err(_) => {
                let noise = String::from_utf8_lossy(&tail);
                let noise = noise.trim();
                if noise.is_empty() {
                    bail!("the remote agent did not start");
                }
                bail!("the remote agent did not start; the remote printed: {noise:?}");
            }
        };
        seen += 1;
        tail.push(b);
        if tail.ends_with(MAGIC) {
            let mut v = [0u8; 4];
            r.read_exact(&mut v)
                .await
                .context("agent handshake cut short")?;
            let v = u32::from_le_bytes(v);
            if v != PROTO {
                bail!("remote agent speaks protocol {v}, we speak {PROTO}");
            }
            return Ok(Found::Agent);
        }
        if tail.ends_with(NO_AGENT) {
            let mut line = Vec::new();
            loop {
                let c = r.read_u8().await.context("discovery cut short")?;
                if c == b'\n' || line.len() > 200 {
                    break;
                }
                line.push(c);
            }
            return Ok(Found::NoAgent {
                uname: String::from_utf8_lossy(&line).trim().to_string(),
            });
        }
        if seen > MAX_NOISE {
            bail!("no agent handshake in the first {MAX_NOISE} bytes from the remote");
        }
        if tail.len() > 4096 {
            tail.drain(..2048);
        }
    }
}

/// The binary to upload: `VTUN_AGENT_BINARY` (testing aid) or this executable.
fn upload_source() -> Result<std::path::PathBuf> {
    match std::env::var_os("VTUN_AGENT_BINARY") {
        Some(p) => Ok(p.into()),
        None => std::env::current_exe().context("cannot locate this executable to upload"),
    }
}

impl AgentEndpoint {
    /// Start (or upload and start) the agent on `opener`'s host and open `root` there.
    pub async fn start(opener: &Arc<dyn Opener>, root: &str) -> Result<AgentEndpoint> {
        let override_path = std::env::var("VTUN_AGENT_PATH").ok();
        let io = opener
            .exec(&discovery_script(override_path.as_deref()))
            .await
            .with_context(|| format!("cannot start the agent on {}", opener.name()))?;
        let (r, w) = tokio::io::split(io);
        let mut r = BufReader::with_capacity(256 * 1024, r);
        let mut w = BufWriter::with_capacity(256 * 1024, w);
        if let Found::NoAgent { uname } = scan(&mut r).await? {
            let ours = local_uname();
            if uname != ours {
                let _ = w.write_all(b"quit\n").await;
                let _ = w.flush().await;
                bail!("it cannot run this binary: it is {uname}, we are {ours}");
            }
            let path = upload_source()?;
            let bin = tokio::fs::read(&path)
                .await
                .with_context(|| format!("cannot read {}", path.display()))?;
            let sum: String = {
                use sha2::Digest;
                sha2::Sha256::digest(&bin)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect()
            };
            eprintln!(
                "vtun: installing the sync agent on {} ({} KiB)",
                opener.name(),
                bin.len() / 1024
            );
            w.write_all(format!("upload {} {sum}\n", bin.len()).as_bytes())
                .await?;
            w.write_all(&bin).await?;
            w.flush().await.context("agent upload failed")?;
            match scan(&mut r).await? {
                Found::Agent => {}
                Found::NoAgent { .. } => bail!("agent upload went wrong"),
            }
        }
        w.write_all(&hello()).await?;
        let mut ep = AgentEndpoint {
            r,
            w,
            wire: 0,
            again: Some((opener.clone(), root.to_string())),
        };
        ep.put(&Msg::Root(root.to_string())).await?;
        Ok(ep)
    }

    /// An endpoint over an already started agent stream (tests, or a stream set up elsewhere).
    pub async fn over(io: Box<dyn RemoteIo>, root: &str) -> Result<AgentEndpoint> {
        let (r, w) = tokio::io::split(io);
        let mut r = BufReader::with_capacity(256 * 1024, r);
        let w = BufWriter::with_capacity(256 * 1024, w);
        match scan(&mut r).await? {
            Found::Agent => {}
            Found::NoAgent { .. } => bail!("no agent on this stream"),
        }
        let mut ep = AgentEndpoint {
            r,
            w,
            wire: 0,
            again: None,
        };
        ep.w.write_all(&hello()).await?;
        ep.put(&Msg::Root(root.to_string())).await?;
        Ok(ep)
    }

    async fn put(&mut self, m: &Msg) -> Result<u64> {
        let n = write_msg(&mut self.w, m).await?;
        self.wire += n;
        Ok(n)
    }

    /// Send one request, read its one reply.
    async fn call(&mut self, m: &Msg) -> Result<Msg> {
        self.put(m).await?;
        self.w
            .flush()
            .await
            .context("connection to the agent failed")?;
        self.reply().await
    }

    async fn reply(&mut self) -> Result<Msg> {
        let (m, n) = expect_msg(&mut self.r).await?;
        self.wire += n;
        match m {
            Msg::Error(e) => bail!("agent: {e}"),
            m => Ok(m),
        }
    }
}

/// Split `items` into runs of at most [`REQUEST_ITEMS`] items and about [`REQUEST_PART`]
/// bytes (by `size`), each one request frame.
fn parts<T>(items: Vec<T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut bytes = 0;
    for it in items {
        if !cur.is_empty() && (cur.len() >= REQUEST_ITEMS || bytes >= REQUEST_PART) {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += size(&it);
        cur.push(it);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn op_size(op: &Op) -> usize {
    match op {
        Op::MkRoot => 1,
        Op::Mkdir { path, .. } | Op::Delete { path, .. } | Op::SetMeta { path, .. } => {
            path.as_str().len() + 32
        }
        Op::Symlink { path, target } => path.as_str().len() + target.len() + 32,
    }
}

fn unexpected<T>(m: Msg) -> Result<T> {
    bail!("unexpected reply from agent: {}", short(&m))
}

fn short(m: &Msg) -> String {
    let s = format!("{m:?}");
    s.chars().take(80).collect()
}

impl Endpoint for AgentEndpoint {
    fn list(&mut self, opts: ListOpts) -> BoxFuture<'_, Result<Listing>> {
        Box::pin(async move {
            self.put(&Msg::List(opts)).await?;
            self.w
                .flush()
                .await
                .context("connection to the agent failed")?;
            let mut entries = Vec::new();
            loop {
                match self.reply().await? {
                    Msg::ListingPart(part) => {
                        if entries.len() + part.len() > MAX_ENTRIES {
                            bail!("the agent's listing has more than {MAX_ENTRIES} entries");
                        }
                        entries.extend(part);
                    }
                    Msg::ListingEnd { root_exists } => {
                        return Ok(Listing {
                            root_exists,
                            entries,
                            mtime_seconds: false,
                        })
                    }
                    m => return unexpected(m),
                }
            }
        })
    }

    fn signatures(&mut self, paths: Vec<RelPath>) -> BoxFuture<'_, Result<Vec<Option<Vec<u8>>>>> {
        Box::pin(async move {
            let n = paths.len();
            match self.call(&Msg::Signatures(paths)).await? {
                Msg::Sigs(s) if s.len() == n => Ok(s),
                m => unexpected(m),
            }
        })
    }

    fn send(&mut self, reqs: Vec<SendReq>, out: mpsc::Sender<Piece>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            // A signature too big for a frame only costs sending that file whole.
            let reqs = reqs
                .into_iter()
                .map(|mut r| {
                    if r.signature.as_ref().is_some_and(|s| s.len() > MAX_SIG) {
                        r.signature = None;
                    }
                    r
                })
                .collect();
            let frames = parts(reqs, |r: &SendReq| {
                r.path.as_str().len() + r.signature.as_ref().map_or(0, Vec::len) + 16
            });
            let n = frames.len();
            // Written while the replies are read: the agent answers each frame with a stream
            // of pieces, and neither side may wait for the other to stop.
            let (r, w) = (&mut self.r, &mut self.w);
            let write = async move {
                let mut wire = 0;
                for f in frames {
                    wire += write_msg(w, &Msg::Send(f)).await?;
                    w.flush().await.context("connection to the agent failed")?;
                }
                anyhow::Ok(wire)
            };
            let read = async move {
                let mut wire = 0;
                let mut done = 0;
                while done < n {
                    let (m, k) = expect_msg(r).await?;
                    wire += k;
                    match m {
                        Msg::Piece(p) => out.send(p).await.ok().context("receiver went away")?,
                        Msg::SendDone => done += 1,
                        Msg::Error(e) => bail!("agent: {e}"),
                        m => return unexpected(m),
                    }
                }
                anyhow::Ok(wire)
            };
            let (written, read) = tokio::join!(write, read);
            let (written, read) = (written?, read?);
            self.wire += written + read;
            Ok(())
        })
    }

    fn receive(&mut self, mut input: mpsc::Receiver<Piece>) -> BoxFuture<'_, Result<RecvReport>> {
        Box::pin(async move {
            self.put(&Msg::RecvBegin).await?;
            while let Some(p) = input.recv().await {
                self.put(&Msg::Piece(p)).await?;
            }
            match self.call(&Msg::RecvEnd).await? {
                Msg::RecvDone(r) => Ok(r),
                m => unexpected(m),
            }
        })
    }

    fn apply(&mut self, ops: Vec<Op>) -> BoxFuture<'_, Result<Vec<Option<String>>>> {
        Box::pin(async move {
            let frames = parts(ops, op_size);
            let sizes: Vec<usize> = frames.iter().map(Vec::len).collect();
            let (r, w) = (&mut self.r, &mut self.w);
            // Pipelined: all frames go out while the replies come back.
            let write = async move {
                let mut wire = 0;
                for f in frames {
                    wire += write_msg(w, &Msg::Apply(f)).await?;
                }
                w.flush().await.context("connection to the agent failed")?;
                anyhow::Ok(wire)
            };
            let read = async move {
                let mut wire = 0;
                let mut results = Vec::new();
                for n in sizes {
                    let (m, k) = expect_msg(r).await?;
                    wire += k;
                    match m {
                        Msg::Applied(part) if part.len() == n => results.extend(part),
                        Msg::Error(e) => bail!("agent: {e}"),
                        m => return unexpected(m),
                    }
                }
                anyhow::Ok((wire, results))
            };
            let (written, read) = tokio::join!(write, read);
            let (written, (read, results)) = (written?, read?);
            self.wire += written + read;
            Ok(results)
        })
    }

    fn fork(&self) -> BoxFuture<'_, Result<Option<Box<dyn Endpoint>>>> {
        // Clone first: the future must not hold `&self`, whose stream is not `Sync`.
        let again = self.again.clone();
        Box::pin(async move {
            let Some((opener, root)) = again else {
                return Ok(None);
            };
            let ep: Box<dyn Endpoint> = Box::new(AgentEndpoint::start(&opener, &root).await?);
            Ok(Some(ep))
        })
    }

    fn wire_bytes(&self) -> u64 {
        self.wire
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
        let s = discovery_script(Some("/x/it's/vtun"));
        assert!(s.starts_with("exec sh -c '"));
    }

    #[test]
    fn uname_looks_like_uname() {
        assert!(local_uname().contains(' '));
    }
}
