//! The test bed: real OpenSSH `sshd` processes (one per "VM", each with its own host key) on
//! ephemeral loopback ports, a `vtun gateway` routing `<name>.vm.test` to them with a throwaway CA,
//! a user key, and in-process fault relays (cut or stall a connection) for failure tests.
//!
//! Everything lives in one temp dir and every process is killed on drop, also when a test panics.
//! Commands built here run with a clean environment: HOME points into the temp dir and
//! SSH_AUTH_SOCK is removed, so nothing touches the user's real ~/.ssh or agent.

#![allow(dead_code)]

pub mod fault;
pub mod hostile_sftp;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn wait_for_port(port: u16, timeout: Duration) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on 127.0.0.1:{port} after {timeout:?}");
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

/// One "VM": an sshd with its own host key.
pub struct Vm {
    pub name: String,
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
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
        let log = std::fs::File::create(self.dir.join("sshd.log")).expect("log");
        let child = Command::new(sshd_bin())
            .args(["-D", "-e", "-f"])
            .arg(self.dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sshd");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10));
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
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

#[derive(Default)]
pub struct Builder {
    vms: Vec<(String, bool)>,
    delay_ms: u64,
    idle_timeout: Option<f64>,
    faults: Vec<String>,
    extra_routes: Vec<String>,
}

impl Builder {
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
        if unsafe_is_root() {
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
            let port = free_port();
            std::fs::write(dir.join("sshd_config"), sshd_config(&dir, port, &user))
                .expect("sshd_config");
            let mut vm = Vm {
                name: name.clone(),
                port,
                dir,
                child: None,
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
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("gateway address");
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

fn unsafe_is_root() -> bool {
    user_name() == "root"
}

fn sshd_config(dir: &Path, port: u16, user: &str) -> String {
    format!(
        "Port {port}\n\
         ListenAddress 127.0.0.1\n\
         HostKey {dir}/host_key\n\
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
         MaxStartups 200:30:400\n\
         MaxSessions 64\n\
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

    /// Start a deferred VM's sshd now.
    pub fn start_vm(&mut self, name: &str) {
        self.vm_mut(name).start();
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
            .env("VTUN_USER", &self.user);
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
    /// Waits briefly: the gateway logs a connection when both directions have closed.
    pub fn wire_bytes_since(&self, mark: usize) -> (u64, u64) {
        std::thread::sleep(Duration::from_millis(300));
        let log = self.gateway_log();
        let (mut up, mut down) = (0, 0);
        for line in log[mark.min(log.len())..]
            .lines()
            .filter(|l| l.contains("closed"))
        {
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
        for vm in &mut self.vms {
            vm.stop();
        }
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

/// Run to completion (stdin as configured), capturing output, failing the test after `limit`.
pub fn run_with_timeout(cmd: &mut Command, limit: Duration) -> Out {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("command timed out after {limit:?}: {cmd:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Out {
        status,
        stdout: t1.join().expect("join"),
        stderr: String::from_utf8_lossy(&t2.join().expect("join")).into_owned(),
    }
}

pub fn run(cmd: &mut Command) -> Out {
    run_with_timeout(cmd, Duration::from_secs(120))
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
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("gateway address");
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
