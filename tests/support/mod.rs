//! The test bed: real OpenSSH `sshd` (one per "VM", each with its own host key, in inetd mode
//! behind a loopback port the bed holds for its whole life), a `vtun gateway` routing `<name>.vm.test` to them with a throwaway CA,
//! a user key, and in-process fault relays (cut or stall a connection) for failure tests.
//!
//! Everything lives in one temp dir and every process is killed on drop, also when a test panics.
//! Commands built here run with a clean environment: HOME points into the temp dir and
//! SSH_AUTH_SOCK is removed, so nothing touches the user's real ~/.ssh or agent.

#![allow(dead_code)]

pub mod fault;
pub mod hostile_sftp;
pub mod vers_api;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use fault::{Fault, FaultRelay};

pub const DOMAIN: &str = "vm.test";

/// The vtun binary: `VTUN_BIN` if set, else the one cargo built for this test, else (benches,
/// where cargo does not say) `vtun` in the target directory the running executable lives in.
pub fn vtun_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VTUN_BIN") {
        return PathBuf::from(p);
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_vtun") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<bench> → target/<profile>/vtun
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.join("vtun")
}

/// Which sshd binary to run (absolute path, as sshd requires).
fn sshd_bin() -> PathBuf {
    for p in ["/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("sshd not found: run scripts/test.sh, which installs openssh-server");
}

fn user_name() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A loopback port held from the moment the bed is built: bound but not listening, so until the
/// VM "boots" connections to it are refused (as on a booting VM), and no other test can take it
/// meanwhile — a port picked, freed and re-bound later can be lost to a parallel test.
pub fn reserve_port() -> (OwnedFd, u16) {
    // SAFETY: plain socket calls on a descriptor this function creates and then owns; the address
    // structs are plain data, zeroed and sized as the kernel expects.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let sa = &mut addr as *mut libc::sockaddr_in as *mut libc::sockaddr;
        let rc = libc::bind(fd.as_raw_fd(), sa, len);
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let rc = libc::getsockname(fd.as_raw_fd(), sa, &mut len);
        assert_eq!(rc, 0, "getsockname: {}", std::io::Error::last_os_error());
        (fd, u16::from_be(addr.sin_port))
    }
}

/// Start listening on a socket from [`reserve_port`].
fn listen(fd: OwnedFd) -> TcpListener {
    // SAFETY: listen() on a bound socket this function owns; no memory is involved.
    let rc = unsafe { libc::listen(fd.as_raw_fd(), 128) };
    assert_eq!(rc, 0, "listen: {}", std::io::Error::last_os_error());
    TcpListener::from(fd)
}

pub fn keygen(path: &Path, kind: &str) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", kind, "-N", "", "-C", "vtun-test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .expect("ssh-keygen");
    assert!(st.success(), "ssh-keygen failed");
}

/// One "VM": OpenSSH's sshd with its own host key, run in inetd mode (`sshd -i`, one process per
/// connection) behind a listener the bed owns. The bed never lets go of the port, so tests
/// running in parallel cannot steal it between picking and binding, and a restart keeps it.
pub struct Vm {
    pub name: String,
    pub port: u16,
    pub dir: PathBuf,
    /// The reserved port until the VM first starts.
    reserved: Option<OwnedFd>,
    sshd: Arc<Sshd>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

/// What the accept loop shares with its [`Vm`].
struct Sshd {
    /// New connections get an sshd (true) or are closed at once (a VM that is down).
    running: AtomicBool,
    /// The bed is going away: the accept loop ends.
    closing: AtomicBool,
    sessions: Mutex<Vec<Child>>,
}

impl Sshd {
    fn kill_sessions(&self) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        for c in sessions.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        sessions.clear();
    }
}

impl Vm {
    pub fn fqdn(&self) -> String {
        format!("{}.{}", self.name, DOMAIN)
    }

    /// $HOME of sessions on this VM (sshd `SetEnv HOME=`), so shell startup files and caches
    /// written by tests stay in the bed. sftp-server still starts in the account's real home:
    /// tests use absolute paths.
    pub fn home(&self) -> PathBuf {
        self.dir.join("home")
    }

    pub fn host_key_pub(&self) -> String {
        std::fs::read_to_string(self.dir.join("host_key.pub")).expect("host key")
    }

    fn start(&mut self) {
        self.sshd.running.store(true, Ordering::SeqCst);
        let Some(fd) = self.reserved.take() else {
            return; // already listening (a restart)
        };
        let listener = listen(fd);
        let sshd = self.sshd.clone();
        let config = self.dir.join("sshd_config");
        let log = self.dir.join("sshd.log");
        self.acceptor = Some(std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sshd.closing.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                if !sshd.running.load(Ordering::SeqCst) {
                    continue; // dropped: a VM that is down closes the connection
                }
                let child = spawn_sshd(&config, &log, conn);
                let mut sessions = sshd.sessions.lock().unwrap_or_else(|e| e.into_inner());
                sessions.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
                sessions.extend(child);
            }
        }));
    }

    /// A paused VM: its port accepts connections and closes them at once (as the edge does for a
    /// VM that is not running) until [`Power::on`].
    pub fn pause(&mut self) {
        self.start();
        self.stop();
    }

    /// A handle that starts this VM's sshd from another thread (a stand-in API's resume).
    pub fn power(&self) -> Power {
        Power(self.sshd.clone())
    }

    /// New connections are closed and open sessions killed, as when a VM goes down.
    fn stop(&mut self) {
        self.sshd.running.store(false, Ordering::SeqCst);
        self.sshd.kill_sessions();
    }

    /// Replace the host key (the "VM was rebuilt" case) and restart sshd.
    pub fn rotate_host_key(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(self.dir.join("host_key"));
        let _ = std::fs::remove_file(self.dir.join("host_key.pub"));
        keygen(&self.dir.join("host_key"), "ed25519");
        self.start();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.sshd.closing.store(true, Ordering::SeqCst);
        if let Some(t) = self.acceptor.take() {
            // Wake the blocked accept() so the loop sees `closing` and drops the listener.
            let _ = TcpStream::connect(("127.0.0.1", self.port));
            let _ = t.join();
        }
        self.stop();
    }
}

/// One inetd-mode sshd serving `conn` on its stdin and stdout.
fn spawn_sshd(config: &Path, log: &Path, conn: TcpStream) -> Option<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .ok()?;
    let input = conn.try_clone().ok()?;
    Command::new(sshd_bin())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args(["-i", "-e", "-f"])
        .arg(config)
        .stdin(OwnedFd::from(input))
        .stdout(OwnedFd::from(conn))
        .stderr(log)
        .spawn()
        .ok()
}

/// Turns a paused VM's sshd on (see [`Vm::pause`]).
#[derive(Clone)]
pub struct Power(Arc<Sshd>);

impl Power {
    pub fn on(&self) {
        self.0.running.store(true, Ordering::SeqCst);
    }
}

#[derive(Default)]
pub struct Builder {
    vms: Vec<(String, bool)>,
    delay_ms: u64,
    idle_timeout: Option<f64>,
    faults: Vec<String>,
    extra_routes: Vec<String>,
    /// Extra names (`NAME.vm.test`) routed to a VM's sshd: fleets for fan-out tests.
    extra_names: Vec<(String, String)>,
    max_sessions: Option<u32>,
}

impl Builder {
    /// sshd's MaxSessions (channels per connection) for every VM [default: 64].
    pub fn max_sessions(mut self, n: u32) -> Self {
        self.max_sessions = Some(n);
        self
    }

    /// Add a VM named `name` (reached as `name.vm.test`).
    pub fn vm(mut self, name: &str) -> Self {
        self.vms.push((name.to_string(), true));
        self
    }

    /// A VM whose sshd is not started yet (see [`TestBed::start_vm`]): the boot race.
    pub fn deferred_vm(mut self, name: &str) -> Self {
        self.vms.push((name.to_string(), false));
        self
    }

    /// Route `<vm>-fault.vm.test` to VM `vm` through an in-process fault relay.
    pub fn fault(mut self, vm: &str) -> Self {
        self.faults.push(vm.to_string());
        self
    }

    pub fn delay_ms(mut self, ms: u64) -> Self {
        self.delay_ms = ms;
        self
    }

    pub fn idle_timeout(mut self, secs: f64) -> Self {
        self.idle_timeout = Some(secs);
        self
    }

    /// Route `NAME.vm.test` to VM `vm`'s sshd too, for each NAME: many VM names on few sshd.
    pub fn names<S: AsRef<str>>(mut self, names: impl IntoIterator<Item = S>, vm: &str) -> Self {
        for n in names {
            self.extra_names
                .push((n.as_ref().to_string(), vm.to_string()));
        }
        self
    }

    /// An extra `PATTERN=BACKEND` route (checked before the VM routes).
    pub fn route(mut self, route: &str) -> Self {
        self.extra_routes.push(route.to_string());
        self
    }

    pub fn start(self) -> TestBed {
        let tmp = tempfile::Builder::new()
            .prefix("vtun-bed-")
            .tempdir()
            .expect("tempdir");
        let root = tmp.path().to_path_buf();
        let home = root.join("home");
        std::fs::create_dir_all(home.join(".ssh")).expect("home");
        let user_key = root.join("id_ed25519");
        keygen(&user_key, "ed25519");
        let authorized = std::fs::read_to_string(root.join("id_ed25519.pub")).expect("pub");
        if is_root() {
            let _ = std::fs::create_dir_all("/run/sshd");
        }
        let user = user_name();

        let mut vms = Vec::new();
        for (name, started) in &self.vms {
            let dir = root.join("vms").join(name);
            std::fs::create_dir_all(&dir).expect("vm dir");
            keygen(&dir.join("host_key"), "ed25519");
            std::fs::create_dir_all(dir.join("home")).expect("vm home");
            std::fs::write(dir.join("authorized_keys"), &authorized).expect("authorized_keys");
            let (reserved, port) = reserve_port();
            std::fs::write(
                dir.join("sshd_config"),
                sshd_config(&dir, &user, self.max_sessions.unwrap_or(64)),
            )
            .expect("sshd_config");
            let mut vm = Vm {
                name: name.clone(),
                port,
                dir,
                reserved: Some(reserved),
                sshd: Arc::new(Sshd {
                    running: AtomicBool::new(false),
                    closing: AtomicBool::new(false),
                    sessions: Mutex::new(Vec::new()),
                }),
                acceptor: None,
            };
            if *started {
                vm.start();
            }
            vms.push(vm);
        }

        let mut faults = Vec::new();
        let mut routes: Vec<String> = self.extra_routes.clone();
        for f in &self.faults {
            let vm = vms
                .iter()
                .find(|v| &v.name == f)
                .expect("fault for unknown vm");
            let relay = FaultRelay::start(("127.0.0.1", vm.port));
            routes.push(format!("{f}-fault.{DOMAIN}=127.0.0.1:{}", relay.port()));
            faults.push((f.clone(), relay));
        }
        for vm in &vms {
            routes.push(format!(
                "{}={}",
                vm.fqdn(),
                format_args!("127.0.0.1:{}", vm.port)
            ));
        }
        for (name, on) in &self.extra_names {
            let vm = vms
                .iter()
                .find(|v| &v.name == on)
                .expect("name for unknown vm");
            routes.push(format!("{name}.{DOMAIN}=127.0.0.1:{}", vm.port));
        }

        let ca_dir = root.join("ca");
        let mut args: Vec<String> = Vec::new();
        for r in &routes {
            args.push("--route".into());
            args.push(r.clone());
        }
        // A catch-all last (first match wins): it makes the certificate cover every name under
        // the domain, and names that are not VMs behave like a VM that is not running.
        let mut ordered: Vec<String> = vec![
            "gateway".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--print-addr".into(),
            "--self-signed".into(),
            ca_dir.display().to_string(),
        ];
        ordered.extend(args);
        ordered.push("--route".into());
        ordered.push(format!("*.{DOMAIN}=127.0.0.1:9"));
        if self.delay_ms > 0 {
            ordered.push("--delay-ms".into());
            ordered.push(self.delay_ms.to_string());
        }
        if let Some(t) = self.idle_timeout {
            ordered.push("--idle-timeout".into());
            ordered.push(t.to_string());
        }
        let gateway_log = root.join("gateway.log");
        let mut child = Command::new(vtun_bin())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "vtun=info")
            .args(&ordered)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&gateway_log).expect("log"))
            .spawn()
            .expect("start gateway");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        let watchdog = Watchdog::new(&child, Duration::from_secs(30));
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("gateway address");
        drop(watchdog);
        let gateway_addr: SocketAddr = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("gateway did not start: {}", read(&gateway_log)));

        TestBed {
            ca_file: ca_dir.join("ca.pem"),
            gateway_addr,
            gateway: Some(child),
            gateway_log,
            known_hosts: home.join("vtun_known_hosts"),
            ssh_known_hosts: home.join(".ssh").join("known_hosts"),
            home,
            user_key,
            user,
            vms,
            faults,
            root,
            _tmp: tmp,
        }
    }
}

/// Whether the tests run as root (as CI does): root ignores permission bits, so a test of a
/// refused write needs a file system that refuses it (see [`Tmpfs`]).
pub fn is_root() -> bool {
    // SAFETY: geteuid() cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// A tmpfs mounted at a directory for one test (`size=1m` for a full disk, `ro` for a read-only
/// one), unmounted on drop. Needs root.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    #[track_caller]
    pub fn mount(dir: &Path, options: &str) -> Tmpfs {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs -o {options} {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn sshd_config(dir: &Path, user: &str, max_sessions: u32) -> String {
    format!(
        "HostKey {dir}/host_key\n\
         PidFile none\n\
         AuthorizedKeysFile {dir}/authorized_keys\n\
         StrictModes no\n\
         UsePAM no\n\
         PermitRootLogin yes\n\
         AllowUsers {user}\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         Subsystem sftp internal-sftp\n\
         LogLevel ERROR\n\
         MaxSessions {max_sessions}\n\
         AcceptEnv VTUN_TEST_*\n\
         SetEnv HOME={dir}/home\n\
         PrintMotd no\n\
         UseDNS no\n",
        dir = dir.display()
    )
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

pub struct TestBed {
    pub root: PathBuf,
    pub home: PathBuf,
    pub user: String,
    pub user_key: PathBuf,
    pub ca_file: PathBuf,
    /// vtun's own pinning file for this test.
    pub known_hosts: PathBuf,
    /// The OpenSSH client's known_hosts for this test.
    pub ssh_known_hosts: PathBuf,
    pub gateway_addr: SocketAddr,
    pub gateway_log: PathBuf,
    gateway: Option<Child>,
    pub vms: Vec<Vm>,
    faults: Vec<(String, FaultRelay)>,
    _tmp: tempfile::TempDir,
}

impl TestBed {
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// VMs `a` and `b`.
    pub fn start() -> TestBed {
        Builder::default().vm("a").vm("b").start()
    }

    pub fn vm(&self, name: &str) -> &Vm {
        self.vms
            .iter()
            .find(|v| v.name == name)
            .expect("no such vm")
    }

    pub fn vm_mut(&mut self, name: &str) -> &mut Vm {
        self.vms
            .iter_mut()
            .find(|v| v.name == name)
            .expect("no such vm")
    }

    /// Start a deferred VM's sshd now (or a stopped one again).
    pub fn start_vm(&mut self, name: &str) {
        self.vm_mut(name).start();
    }

    /// Take a VM down: its sessions are killed and new connections closed at once (as while
    /// it boots) until [`TestBed::start_vm`].
    pub fn stop_vm(&mut self, name: &str) {
        self.vm_mut(name).stop();
    }

    pub fn fault(&self, vm: &str) -> &FaultRelay {
        &self
            .faults
            .iter()
            .find(|(n, _)| n == vm)
            .expect("no fault relay")
            .1
    }

    /// A fresh directory under the bed's root.
    pub fn dir(&self, name: &str) -> PathBuf {
        let d = self.root.join("work").join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    /// Environment every client process gets.
    fn base_env(&self, cmd: &mut Command) {
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.home)
            .env("USER", &self.user)
            .env("TMPDIR", self.root.join("tmp"))
            .env("VTUN_CONNECT", self.gateway_addr.to_string())
            .env("VTUN_CA_FILE", &self.ca_file)
            .env("VTUN_DOMAIN", DOMAIN)
            .env("VTUN_KNOWN_HOSTS", &self.known_hosts)
            .env("VTUN_USER", &self.user)
            // No connection masters unless a test asks for them (tests/master.rs): nothing is
            // left running behind a test, and each command's connection is its own.
            .env("VTUN_PERSIST", "0");
        let _ = std::fs::create_dir_all(self.root.join("tmp"));
    }

    /// `vtun` with the bed's env and the user key (`VTUN_IDENTITY`).
    pub fn vtun(&self) -> Command {
        let mut cmd = Command::new(vtun_bin());
        self.base_env(&mut cmd);
        cmd.env("VTUN_IDENTITY", &self.user_key);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Any program with the bed's clean environment (HOME, TMPDIR, VTUN_*), no identity.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        self.base_env(&mut cmd);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// `vtun` with the bed's env but no identity configured.
    pub fn vtun_bare(&self) -> Command {
        let mut cmd = Command::new(vtun_bin());
        self.base_env(&mut cmd);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// ProxyCommand text for OpenSSH clients.
    pub fn proxy_command(&self) -> String {
        format!("{} proxy %h", vtun_bin().display())
    }

    /// What users run today: `openssl s_client` as the ProxyCommand (pointed at the gateway).
    pub fn openssl_proxy_command(&self) -> String {
        format!(
            "openssl s_client -connect {} -servername %h -quiet -CAfile {}",
            self.gateway_addr,
            self.ca_file.display()
        )
    }

    /// Options that make the OpenSSH clients use this bed and nothing of the user's.
    pub fn ssh_options(&self) -> Vec<String> {
        self.ssh_options_with(&self.proxy_command())
    }

    /// [`TestBed::ssh_options`] with another ProxyCommand.
    pub fn ssh_options_with(&self, proxy_command: &str) -> Vec<String> {
        vec![
            "-F".into(),
            "/dev/null".into(),
            "-o".into(),
            format!("ProxyCommand={proxy_command}"),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.ssh_known_hosts.display()),
            "-o".into(),
            "StrictHostKeyChecking=accept-new".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
            "-i".into(),
            self.user_key.display().to_string(),
            "-l".into(),
            self.user.clone(),
        ]
    }

    /// The real `ssh` client through `vtun proxy`.
    pub fn ssh(&self) -> Command {
        let mut cmd = Command::new("ssh");
        self.base_env(&mut cmd);
        cmd.args(self.ssh_options());
        cmd
    }

    /// The real `scp` client through `vtun proxy`.
    pub fn scp(&self) -> Command {
        let mut cmd = Command::new("scp");
        self.base_env(&mut cmd);
        let mut opts = self.ssh_options();
        opts.truncate(opts.len() - 2); // scp has no -l: the user goes into the operand
        cmd.args(opts);
        cmd
    }

    /// `-e` value for rsync: ssh through `vtun proxy`.
    pub fn rsync_rsh(&self) -> String {
        let mut parts = vec!["ssh".to_string()];
        for o in self.ssh_options() {
            // rsync splits -e on spaces; quote options containing spaces.
            if o.contains(' ') {
                parts.push(format!("'{o}'"));
            } else {
                parts.push(o);
            }
        }
        parts.join(" ")
    }

    pub fn rsync(&self) -> Command {
        let mut cmd = Command::new("rsync");
        self.base_env(&mut cmd);
        cmd.arg("-e").arg(self.rsync_rsh());
        cmd
    }

    pub fn gateway_log(&self) -> String {
        read(&self.gateway_log)
    }

    /// A mark in the gateway log, for [`TestBed::wire_bytes_since`].
    pub fn log_mark(&self) -> usize {
        self.gateway_log().len()
    }

    /// SSH stream bytes (up, down) the gateway carried on connections that closed since `mark`.
    /// The gateway logs a connection's bytes once both directions have closed, which can be a
    /// moment after the client exits: this waits until every connection opened since `mark` has
    /// its `closed` line.
    pub fn wire_bytes_since(&self, mark: usize) -> (u64, u64) {
        let since = |log: &str| log[mark.min(log.len())..].to_string();
        let count = |log: &str, what: &str| log.lines().filter(|l| l.contains(what)).count();
        wait_until(
            Duration::from_secs(20),
            "gateway logs every connection closed",
            || {
                let log = since(&self.gateway_log());
                count(&log, " closed up=") >= count(&log, " connected ").max(1)
            },
        );
        let log = since(&self.gateway_log());
        let (mut up, mut down) = (0, 0);
        for line in log.lines().filter(|l| l.contains(" closed up=")) {
            for field in line.split_whitespace() {
                let num = |v: &str| v.trim_end_matches(',').parse::<u64>().unwrap_or(0);
                if let Some(v) = field.strip_prefix("up=") {
                    up += num(v);
                } else if let Some(v) = field.strip_prefix("down=") {
                    down += num(v);
                }
            }
        }
        (up, down)
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        if let Some(mut g) = self.gateway.take() {
            let _ = g.kill();
            let _ = g.wait();
        }
        // Each Vm stops its sshd sessions and listener as it drops.
    }
}

/// Output of a finished command, with helpers for assertions.
pub struct Out {
    pub status: std::process::ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Out {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    #[track_caller]
    pub fn assert_ok(&self) -> &Self {
        assert!(
            self.status.success(),
            "expected success, got {:?}\nstderr: {}\nstdout: {}",
            self.status,
            self.stderr,
            self.stdout_str()
        );
        self
    }
}

/// Poll `done` until it holds, failing the test with `what` after `limit`: the way to wait for
/// something observable instead of sleeping and hoping.
#[track_caller]
pub fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not after {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running child whose stdout and stderr are collected as they arrive, so a test can wait for
/// a line to appear and every wait has a deadline (a hung child fails the test, with the output
/// it had printed, instead of hanging CI).
pub struct Spawned {
    child: Child,
    what: String,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

fn collect(
    mut from: impl Read + Send + 'static,
    into: Arc<Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            into.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(&buf[..n]);
        }
    })
}

impl Spawned {
    /// Spawn `cmd` (stdin as configured) with stdout and stderr piped to the collectors.
    pub fn start(cmd: &mut Command) -> Spawned {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        if let Some(o) = child.stdout.take() {
            readers.push(collect(o, stdout.clone()));
        }
        if let Some(e) = child.stderr.take() {
            readers.push(collect(e, stderr.clone()));
        }
        Spawned {
            child,
            what: format!("{cmd:?}"),
            stdout,
            stderr,
            readers,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The child's stdin (spawned with `Stdio::piped()`); dropping it sends EOF.
    pub fn take_stdin(&mut self) -> std::process::ChildStdin {
        self.child.stdin.take().expect("stdin was not piped")
    }

    pub fn stdout_so_far(&self) -> Vec<u8> {
        self.stdout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Wait until stdout contains `text`, failing the test after `limit`.
    #[track_caller]
    pub fn wait_for_stdout(&mut self, text: &str, limit: Duration) {
        self.wait_for(limit, text, |s| {
            String::from_utf8_lossy(&s.stdout_so_far()).contains(text)
        });
    }

    /// Wait until stderr contains `text`, failing the test after `limit`.
    #[track_caller]
    pub fn wait_for_stderr(&mut self, text: &str, limit: Duration) {
        self.wait_for(limit, text, |s| s.stderr_so_far().contains(text));
    }

    #[track_caller]
    fn wait_for(&mut self, limit: Duration, text: &str, seen: impl Fn(&Self) -> bool) {
        let start = Instant::now();
        while !seen(self) {
            if let Ok(Some(st)) = self.child.try_wait() {
                // One last look: the text may have arrived with the exit.
                std::thread::sleep(Duration::from_millis(50));
                if seen(self) {
                    return;
                }
                panic!(
                    "{} exited ({st:?}) without printing {text:?}\n{}",
                    self.what,
                    self.so_far()
                );
            }
            if start.elapsed() > limit {
                self.kill();
                panic!(
                    "{} did not print {text:?} within {limit:?}\n{}",
                    self.what,
                    self.so_far()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn so_far(&self) -> String {
        format!(
            "stdout so far: {}\nstderr so far: {}",
            String::from_utf8_lossy(&self.stdout_so_far()),
            self.stderr_so_far()
        )
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Wait for the exit; after `limit` kill the child and fail the test with its output so far.
    #[track_caller]
    pub fn wait(mut self, limit: Duration) -> Out {
        let start = Instant::now();
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) => {}
                Err(e) => panic!("wait for {}: {e}", self.what),
            }
            if start.elapsed() > limit {
                self.kill();
                panic!("{} timed out after {limit:?}\n{}", self.what, self.so_far());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // The pipes close when the last writer goes; a grandchild that keeps one open fails
        // the wait in the same time budget instead of hanging it.
        for r in std::mem::take(&mut self.readers) {
            while !r.is_finished() {
                if start.elapsed() > limit {
                    panic!(
                        "{} exited ({status:?}) but its output stayed open after {limit:?}\n{}",
                        self.what,
                        self.so_far()
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = r.join();
        }
        Out {
            status,
            stdout: self.stdout_so_far(),
            stderr: self.stderr_so_far(),
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// Kills `pid` with SIGKILL if it still runs after `limit`, so a blocking read or write on a
/// child's pipe ends (and the test fails) instead of hanging. Disarmed on drop.
pub struct Watchdog {
    cancel: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub fn new(child: &Child, limit: Duration) -> Watchdog {
        let pid = child.id() as libc::pid_t;
        let (cancel, cancelled) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = cancelled.recv_timeout(limit) {
                eprintln!("watchdog: killing pid {pid} after {limit:?}");
                // SAFETY: kill() takes no memory. The pid is still this child's: a watchdog is
                // armed only around reads and writes, and dropped before the child is waited for.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        });
        Watchdog {
            cancel: Some(cancel),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.cancel.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Run to completion (stdin as configured), capturing output, failing the test after `limit`.
pub fn run_with_timeout(cmd: &mut Command, limit: Duration) -> Out {
    Spawned::start(cmd).wait(limit)
}

pub fn run(cmd: &mut Command) -> Out {
    run_with_timeout(cmd, Duration::from_secs(120))
}

/// Child processes of this process that are still running (zombies have finished: they no
/// longer touch anything). In a test run by [`rerun_in_clean_env`] these are the test's own.
pub fn live_children() -> Vec<u32> {
    let me = std::process::id();
    let mut live = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let stat = read(&e.path().join("stat"));
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after
        // the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let (state, ppid) = (fields.next(), fields.next());
        if ppid == Some(me.to_string().as_str()) && state != Some("Z") {
            live.push(pid);
        }
    }
    live
}

/// Set in the child that [`rerun_in_clean_env`] starts: the test name it runs.
const CLEAN_CHILD: &str = "VTUN_TEST_CLEAN_CHILD";

/// The first line of an in-process test (`if rerun_in_clean_env(&[]) { return; }`): runs this
/// test again in a child process of the test binary whose environment holds only PATH, a fresh
/// empty HOME and TMPDIR, and `env`. Returns true in the parent once the child passed (the test
/// is done), false in the child (run the body).
///
/// Code under test in-process reads the process environment (clap's `VTUN_*` defaults,
/// SSH_AUTH_SOCK, HOME, the agent's overrides): whatever the developer or CI has set would leak
/// in, and `set_var` to clear it is unsound while the harness runs tests on other threads.
pub fn rerun_in_clean_env(env: &[(&str, &std::ffi::OsStr)]) -> bool {
    let name = std::thread::current()
        .name()
        .expect("libtest names each test's thread after the test")
        .to_string();
    if std::env::var_os(CLEAN_CHILD).is_some_and(|n| n == name.as_str()) {
        return false;
    }
    let dir = tempfile::Builder::new()
        .prefix("vtun-clean-env-")
        .tempdir()
        .expect("tempdir");
    for d in ["home", "tmp"] {
        std::fs::create_dir(dir.path().join(d)).expect("mkdir");
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut cmd = Command::new(exe);
    cmd.args([&name, "--exact", "--nocapture", "--test-threads=1"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir.path().join("home"))
        .env("TMPDIR", dir.path().join("tmp"))
        .env(CLEAN_CHILD, &name)
        .env("VTUN_PERSIST", "0")
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    let out = run_with_timeout(&mut cmd, Duration::from_secs(300));
    let report = format!(
        "{name} in a clean environment: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        out.stdout_str(),
        out.stderr
    );
    assert!(out.status.success(), "{report}");
    // A name that matched no test would "pass" having run nothing.
    assert!(out.stdout_str().contains("1 passed"), "{report}");
    true
}

/// Write all dirty data back to disk (`sync`) before a timed benchmark cell, so no cell pays for
/// the previous one's writeback.
#[allow(dead_code)]
pub fn settle() {
    let _ = Command::new("sync").status();
}

/// Deterministic pseudo-random bytes (xorshift), fast enough for hundreds of MiB.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn hash(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

pub fn hash_file(path: &Path) -> String {
    hash(&std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())))
}

/// An extra `vtun gateway` process with explicit arguments (for certificate tests).
pub struct GatewayProc {
    pub addr: SocketAddr,
    child: Child,
}

impl GatewayProc {
    pub fn start(args: &[String]) -> GatewayProc {
        let mut child = Command::new(vtun_bin())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .args(["gateway", "--listen", "127.0.0.1:0", "--print-addr"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start gateway");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        let watchdog = Watchdog::new(&child, Duration::from_secs(30));
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("gateway address");
        drop(watchdog);
        let addr = line.trim().parse().expect("gateway did not start");
        GatewayProc { addr, child }
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real `ssh-agent` on a socket in the bed, killed when dropped.
pub struct Agent {
    child: Child,
    pub sock: PathBuf,
}

impl Agent {
    pub fn start(bed: &TestBed) -> Agent {
        let sock = bed.root.join("agent.sock");
        let child = bed
            .command("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ssh-agent");
        let agent = Agent { child, sock };
        wait_until(Duration::from_secs(5), "the agent's socket", || {
            agent.sock.exists()
        });
        agent
    }

    /// `ssh-add ARGS…` against this agent (a key file, or `-D` to remove every key).
    pub fn ssh_add(&self, bed: &TestBed, arg: impl AsRef<std::ffi::OsStr>) {
        let st = bed
            .command("ssh-add")
            .arg(arg)
            .env("SSH_AUTH_SOCK", &self.sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("ssh-add");
        assert!(st.success(), "ssh-add failed");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
