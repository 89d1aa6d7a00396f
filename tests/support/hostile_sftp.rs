//! A hostile SFTP server for tests: russh's server side with russh-sftp's server half, serving a
//! made-up tree under `/d` that no honest server would send (names that climb out, names with
//! `/`, a symlink and a directory under one name, directories without end, 1-byte reads).
//!
//! It is real SSH on a loopback port, so the test bed's gateway routes to it like to a VM and the
//! vtun binary under test speaks to it exactly as to sshd. Nothing it serves touches a real
//! filesystem; every tree is computed from the path asked for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use russh::keys::PrivateKey;
use russh::server::{Auth, Msg, Server as _, Session};
use russh::{Channel, ChannelId};
use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Status, StatusCode, Version,
};

/// What the server lies about. Every scenario serves directory `/d`.
#[derive(Debug, Clone)]
pub enum Scenario {
    /// `/d` lists `.`, `..` and `..` again as a regular file, plus an honest `ok.txt`.
    DotDot,
    /// `/d` lists `/abs/pwned`, an absolute name.
    Absolute,
    /// `/d` lists `sub/pwned`, a name with a `/` in it.
    Slash,
    /// `/d` lists `x` as a symlink to `target`, then `x` again as a directory holding `pwned`.
    LinkThenFile { target: String },
    /// Every READDIR of `/d` brings another batch of new names; it never says end-of-file.
    EndlessEntries,
    /// Every READDIR of `/d` is an empty NAME reply; it never says end-of-file.
    EndlessEmpty,
    /// Every directory holds one more directory `d`: `/d/d/d/...` without end.
    EndlessDepth,
    /// `/d` holds `big` (256 KiB), every READ of which returns 1 byte, and an honest `ok.txt`.
    OneByteReads,
}

/// Contents of every honest file the server serves.
pub const CONTENT: &[u8] = b"hello from the hostile server\n";
/// Size of `big` in [`Scenario::OneByteReads`].
pub const BIG: u64 = 256 * 1024;
/// New names per READDIR reply in [`Scenario::EndlessEntries`].
const BATCH: usize = 2000;

/// A running server; stopped when dropped.
pub struct HostileSftp {
    port: u16,
    runtime: Option<tokio::runtime::Runtime>,
}

impl HostileSftp {
    /// Start serving `scenario` on a loopback port, with the host key at `host_key` (an OpenSSH
    /// private key file, e.g. from `support::keygen`).
    pub fn start(scenario: Scenario, host_key: &std::path::Path) -> HostileSftp {
        let key = russh::keys::load_secret_key(host_key, None).expect("host key");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let port = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let port = listener.local_addr().expect("addr").port();
            let config = Arc::new(config(key));
            let mut server = Server { scenario };
            tokio::spawn(async move {
                let _ = server.run_on_socket(config, &listener).await;
            });
            port
        });
        HostileSftp {
            port,
            runtime: Some(runtime),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for HostileSftp {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn config(key: PrivateKey) -> russh::server::Config {
    russh::server::Config {
        keys: vec![key],
        auth_rejection_time: std::time::Duration::from_millis(0),
        auth_rejection_time_initial: Some(std::time::Duration::from_millis(0)),
        inactivity_timeout: Some(std::time::Duration::from_secs(120)),
        // Without it, Nagle and delayed ACKs make every round trip cost ~40 ms.
        nodelay: true,
        ..Default::default()
    }
}

struct Server {
    scenario: Scenario,
}

impl russh::server::Server for Server {
    type Handler = SshSession;

    fn new_client(&mut self, _: Option<std::net::SocketAddr>) -> SshSession {
        SshSession {
            scenario: self.scenario.clone(),
            channels: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

struct SshSession {
    scenario: Scenario,
    channels: Arc<Mutex<HashMap<ChannelId, Channel<Msg>>>>,
}

impl russh::server::Handler for SshSession {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _user: &str,
        _key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Ok(mut c) = self.channels.lock() {
            c.insert(channel.id(), channel);
        }
        reply.accept().await;
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        id: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.close(id)
    }

    async fn subsystem_request(
        &mut self,
        id: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let channel = self.channels.lock().ok().and_then(|mut c| c.remove(&id));
        match (name, channel) {
            ("sftp", Some(channel)) => {
                session.channel_success(id)?;
                let handler = Sftp {
                    scenario: self.scenario.clone(),
                    replies: HashMap::new(),
                };
                russh_sftp::server::run(channel.into_stream(), handler).await;
            }
            _ => session.channel_failure(id)?,
        }
        Ok(())
    }
}

/// What a path is, in the made-up tree.
enum Node {
    Dir,
    File(u64),
    Link(String),
}

struct Sftp {
    scenario: Scenario,
    /// READDIR replies sent so far, per directory handle.
    replies: HashMap<String, usize>,
}

fn attrs(node: &Node) -> FileAttributes {
    let (perm, size) = match node {
        Node::Dir => (0o040755, 4096),
        Node::File(n) => (0o100644, *n),
        Node::Link(t) => (0o120777, t.len() as u64),
    };
    FileAttributes {
        size: Some(size),
        permissions: Some(perm),
        atime: Some(1_600_000_000),
        mtime: Some(1_600_000_000),
        ..Default::default()
    }
}

fn file(name: impl Into<String>, node: &Node) -> File {
    File {
        filename: name.into(),
        longname: String::new(),
        attrs: attrs(node),
    }
}

fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Ok".into(),
        language_tag: "en-US".into(),
    }
}

impl Sftp {
    fn lookup(&self, path: &str) -> Option<Node> {
        let path = path.trim_end_matches('/');
        if path == "/d" {
            return Some(Node::Dir);
        }
        let rest = path.strip_prefix("/d/")?;
        match &self.scenario {
            Scenario::EndlessDepth => rest.split('/').all(|c| c == "d").then_some(Node::Dir),
            Scenario::OneByteReads if rest == "big" => Some(Node::File(BIG)),
            Scenario::LinkThenFile { target } if rest == "x" => Some(Node::Link(target.clone())),
            Scenario::LinkThenFile { .. } if rest == "x/pwned" => {
                Some(Node::File(CONTENT.len() as u64))
            }
            _ => Some(Node::File(CONTENT.len() as u64)),
        }
    }

    /// The `n`th READDIR reply for directory `dir`; `None` is end-of-file.
    fn listing(&self, dir: &str, n: usize) -> Option<Vec<File>> {
        let file_node = Node::File(CONTENT.len() as u64);
        let dir = dir.trim_end_matches('/');
        match &self.scenario {
            Scenario::EndlessEntries if dir == "/d" => Some(
                (0..BATCH)
                    .map(|i| file(format!("f{:09}", n * BATCH + i), &file_node))
                    .collect(),
            ),
            Scenario::EndlessEmpty if dir == "/d" => Some(Vec::new()),
            _ if n > 0 => None,
            Scenario::EndlessDepth => Some(vec![file("d", &Node::Dir)]),
            Scenario::DotDot if dir == "/d" => Some(vec![
                file(".", &Node::Dir),
                file("..", &Node::Dir),
                file("..", &file_node),
                file("ok.txt", &file_node),
            ]),
            Scenario::Absolute if dir == "/d" => Some(vec![
                file("ok.txt", &file_node),
                file("/abs/pwned", &file_node),
            ]),
            Scenario::Slash if dir == "/d" => Some(vec![
                file("ok.txt", &file_node),
                file("sub/pwned", &file_node),
            ]),
            Scenario::LinkThenFile { target } if dir == "/d" => Some(vec![
                file("x", &Node::Link(target.clone())),
                file("x", &Node::Dir),
            ]),
            Scenario::LinkThenFile { .. } if dir == "/d/x" => Some(vec![file("pwned", &file_node)]),
            Scenario::OneByteReads if dir == "/d" => Some(vec![
                file("big", &Node::File(BIG)),
                file("ok.txt", &file_node),
            ]),
            _ => None,
        }
    }
}

impl russh_sftp::server::Handler for Sftp {
    type Error = StatusCode;

    fn unimplemented(&self) -> StatusCode {
        StatusCode::OpUnsupported
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, StatusCode> {
        Ok(Version::new())
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, StatusCode> {
        let path = if path == "." || path.is_empty() {
            "/".to_string()
        } else {
            path
        };
        Ok(Name {
            id,
            files: vec![File::dummy(path)],
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, StatusCode> {
        let node = self.lookup(&path).ok_or(StatusCode::NoSuchFile)?;
        Ok(Attrs {
            id,
            attrs: attrs(&node),
        })
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, StatusCode> {
        self.stat(id, path).await
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, StatusCode> {
        match self.lookup(&path) {
            Some(Node::Link(t)) => Ok(Name {
                id,
                files: vec![File::dummy(t)],
            }),
            _ => Err(StatusCode::Failure),
        }
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, StatusCode> {
        match self.lookup(&path) {
            Some(Node::Dir) => {
                self.replies.insert(path.clone(), 0);
                Ok(Handle { id, handle: path })
            }
            _ => Err(StatusCode::NoSuchFile),
        }
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, StatusCode> {
        let n = self.replies.get(&handle).copied().unwrap_or(0);
        self.replies.insert(handle.clone(), n + 1);
        let files = self.listing(&handle, n).ok_or(StatusCode::Eof)?;
        Ok(Name { id, files })
    }

    async fn open(
        &mut self,
        id: u32,
        path: String,
        flags: OpenFlags,
        _attrs: FileAttributes,
    ) -> Result<Handle, StatusCode> {
        if flags.contains(OpenFlags::WRITE) {
            return Err(StatusCode::PermissionDenied);
        }
        match self.lookup(&path) {
            Some(Node::File(_)) => Ok(Handle { id, handle: path }),
            _ => Err(StatusCode::NoSuchFile),
        }
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, StatusCode> {
        self.stat(id, handle).await
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, StatusCode> {
        let size = match self.lookup(&handle) {
            Some(Node::File(n)) => n,
            _ => return Err(StatusCode::Failure),
        };
        if offset >= size {
            return Err(StatusCode::Eof);
        }
        let mut n = (size - offset).min(len as u64) as usize;
        if matches!(self.scenario, Scenario::OneByteReads) && handle.ends_with("/big") {
            n = n.min(1);
        }
        let data = (0..n)
            .map(|i| CONTENT[(offset as usize + i) % CONTENT.len()])
            .collect();
        Ok(Data { id, data })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, StatusCode> {
        self.replies.remove(&handle);
        Ok(ok(id))
    }
}
