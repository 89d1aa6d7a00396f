//! Finding (or uploading) `vtun agent` on a host and starting it: what the agent client runs
//! before its first message.
//!
//! Discovery is one exec channel running one POSIX `sh` script, so it costs one round trip when
//! an agent is there. The script tries, in order: `$VTUN_AGENT_PATH` from *our* environment (a
//! testing aid), `vtun` on the remote PATH, and `~/.cache/vtun/agent-<version>`, each only if
//! `VTUN_AGENT_PROBE=1 <it> agent` reports our protocol version; the first that does is exec'd.
//! Otherwise it prints a marker with `uname -sm` and waits for a line from us: `upload SIZE
//! SHA256` followed by this binary (when the platforms match), which it checks, makes executable,
//! renames into the cache and execs; or `quit`. Everything the remote shell prints before the
//! agent's magic bytes (banners from `.bashrc`) is skipped.

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};

use super::protocol::{MAGIC, PROTO};
use crate::link::{Link, RemoteIo};

const NO_AGENT: &[u8] = b"\nVTUN-NO-AGENT ";
/// How much shell noise we read before giving up on finding the agent.
const MAX_NOISE: usize = 1 << 20;

pub(super) type FromAgent = BufReader<ReadHalf<Box<dyn RemoteIo>>>;
pub(super) type ToAgent = BufWriter<WriteHalf<Box<dyn RemoteIo>>>;

/// Buffers around an agent stream: large enough that a frame rarely costs two syscalls.
fn buffered(io: Box<dyn RemoteIo>) -> (FromAgent, ToAgent) {
    let (r, w) = tokio::io::split(io);
    (
        BufReader::with_capacity(256 * 1024, r),
        BufWriter::with_capacity(256 * 1024, w),
    )
}

/// Start (or upload and start) the agent on `link`'s host: returns its stream once the agent
/// has said who it is.
pub(super) async fn launch(link: &dyn Link) -> Result<(FromAgent, ToAgent)> {
    let override_path = std::env::var("VTUN_AGENT_PATH").ok();
    let io = link
        .exec(&discovery_script(override_path.as_deref()))
        .await
        .with_context(|| format!("cannot start the agent on {}", link.name()))?;
    let (mut r, mut w) = buffered(io);
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
            link.name(),
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
    Ok((r, w))
}

/// An agent already started on `io` (tests, or a stream set up elsewhere).
pub(super) async fn attach(io: Box<dyn RemoteIo>) -> Result<(FromAgent, ToAgent)> {
    let (mut r, w) = buffered(io);
    match scan(&mut r).await? {
        Found::Agent => Ok((r, w)),
        Found::NoAgent { .. } => bail!("no agent on this stream"),
    }
}

/// Quote for POSIX sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The discovery script (see the module docs).
pub fn discovery_script(override_path: Option<&str>) -> String {
    let version = env!("CARGO_PKG_VERSION");
    let probe = super::serve::probe_line();
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
async fn scan(r: &mut FromAgent) -> Result<Found> {
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
