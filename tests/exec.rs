//! `vtun exec` and `vtun ssh` against real sshd behind the gateway: what a user sees (exit codes,
//! stderr lines, bytes) for commands, quoting, PTYs, host keys, auth, boot-wait and keepalive.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const LIMIT: Duration = Duration::from_secs(30);

fn exec(bed: &TestBed, vm: &str, args: &[&str]) -> Out {
    let mut cmd = bed.vtun();
    cmd.args(["exec", vm, "--"]).args(args);
    run_with_timeout(&mut cmd, LIMIT)
}

fn exec_sh(bed: &TestBed, vm: &str, line: &str) -> Out {
    let mut cmd = bed.vtun();
    cmd.args(["exec", vm, "--sh", "--", line]);
    run_with_timeout(&mut cmd, LIMIT)
}

#[test]
fn exit_codes_are_the_remote_ones() {
    let bed = TestBed::builder().vm("a").start();
    let out = exec(&bed, "a", &["true"]);
    out.assert_ok();
    assert!(out.stderr.is_empty(), "quiet on success: {}", out.stderr);
    assert_eq!(exec(&bed, "a", &["false"]).code(), 1);
    assert_eq!(exec(&bed, "a", &["sh", "-c", "exit 7"]).code(), 7);

    let out = exec_sh(&bed, "a", "kill -TERM $$");
    assert_eq!(out.code(), 128 + 15, "stderr: {}", out.stderr);
    assert!(out.stderr.contains("signal TERM"), "{}", out.stderr);
}

#[test]
fn stdout_and_stderr_stay_apart() {
    let bed = TestBed::builder().vm("a").start();
    let out = exec_sh(&bed, "a", "echo out; echo err >&2; echo out2");
    out.assert_ok();
    assert_eq!(out.stdout_str(), "out\nout2\n");
    assert_eq!(out.stderr, "err\n");
}

#[test]
fn arguments_are_quoted_for_the_remote_shell() {
    let bed = TestBed::builder().vm("a").start();
    let args = [
        "a b",
        "it's \"q\"",
        "$HOME",
        "a;b",
        "x\ny",
        "ünïcødé ✓",
        "*",
        "",
    ];
    let mut argv = vec!["printf", "[%s]\\n"];
    argv.extend(args);
    let out = exec(&bed, "a", &argv);
    out.assert_ok();
    let want: String = args.iter().map(|a| format!("[{a}]\n")).collect();
    assert_eq!(out.stdout_str(), want);

    // --sh runs one shell line; --cd and --env apply to it.
    let dir = bed.dir("cd here");
    let mut cmd = bed.vtun();
    cmd.args(["exec", "a", "--sh", "--env", "GREETING=hi there", "--cd"])
        .arg(&dir)
        .args(["--", "echo \"$GREETING\" $(pwd) | tr a-z A-Z"]);
    let out = run_with_timeout(&mut cmd, LIMIT);
    out.assert_ok();
    let want = format!("HI THERE {}\n", dir.display().to_string().to_uppercase());
    assert_eq!(out.stdout_str(), want);
}

/// `vtun exec VM CMD…` as ssh and docker exec take it: the first operand after VM starts the
/// command, and everything after it is the command's, even what looks like vtun's own flags.
#[test]
fn exec_takes_the_command_without_double_dash() {
    let bed = TestBed::builder().vm("a").start();
    let run = |args: &[&str]| {
        let mut cmd = bed.vtun();
        cmd.arg("exec").args(args);
        run_with_timeout(&mut cmd, LIMIT)
    };
    let out = run(&["a", "true"]);
    out.assert_ok();
    assert_eq!(run(&["a", "false"]).code(), 1);

    let out = run(&[
        "a", "printf", "[%s]", "-la", "--sh", "--env", "X=1", "--", "-t",
    ]);
    out.assert_ok();
    assert_eq!(out.stdout_str(), "[-la][--sh][--env][X=1][--][-t]");

    // Options for vtun still go between VM and the command; `--` still works.
    let out = run(&["a", "--env", "K=v w", "--sh", "echo \"$K\""]);
    out.assert_ok();
    assert_eq!(out.stdout_str(), "v w\n");
    let out = run(&["a", "--", "printf", "%s", "-n"]);
    out.assert_ok();
    assert_eq!(out.stdout_str(), "-n");

    // A VM without a command is still refused, with clap's usage error.
    let out = run(&["a"]);
    assert_eq!(out.code(), 2, "stderr: {}", out.stderr);
    assert!(out.stderr.contains("<CMD>"), "{}", out.stderr);
}

/// Reads exactly `n` bytes from `from` on a thread, failing the test if they do not arrive in
/// time (the old blocking writes deadlocked here instead of failing).
fn read_within(mut from: impl std::io::Read + Send + 'static, n: usize) -> Vec<u8> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; n];
        let r = from.read_exact(&mut buf).map(|()| buf);
        let _ = tx.send(r);
    });
    match rx.recv_timeout(LIMIT) {
        Ok(r) => r.expect("read"),
        Err(_) => panic!("{n} bytes did not arrive within {LIMIT:?}"),
    }
}

/// stdout and stderr are written by separate async tasks: while nobody reads vtun's stderr (a
/// full pipe), the remote's stdout still arrives. Writing stderr with a blocking write in the
/// channel's loop held stdout (and Ctrl-C, and a runtime worker) until stderr was read.
#[test]
fn a_stalled_stderr_reader_does_not_hold_up_stdout() {
    let bed = TestBed::builder().vm("a").start();
    let mut cmd = bed.vtun();
    cmd.args(["exec", "a", "--sh", "--"])
        .arg("head -c 1000000 /dev/zero >&2; echo done")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let got = read_within(stdout, 5);
    assert_eq!(got, b"done\n", "stdout arrived while stderr was stalled");
    let mut err = Vec::new();
    std::io::Read::read_to_end(child.stderr.as_mut().expect("stderr"), &mut err).expect("read");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
    assert_eq!(err.len(), 1_000_000, "all of stderr, after the stall");
    assert!(err.iter().all(|&b| b == 0));
}

/// Bytes waiting in a pipe, and its capacity.
fn pipe_fill(fd: i32) -> (i32, i32) {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int; F_GETPIPE_SZ only reads the descriptor's state.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut queued) };
    assert_eq!(r, 0, "FIONREAD");
    let size = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) };
    assert!(size > 0, "F_GETPIPE_SZ");
    (queued, size)
}

/// `vtun exec vm yes | less`, then Ctrl-C: with its stdout full, vtun still ends the remote
/// command and exits 130 instead of hanging in a write.
#[test]
fn ctrl_c_ends_exec_while_stdout_is_stalled() {
    use std::os::fd::AsRawFd;
    let bed = TestBed::builder().vm("a").start();
    let mut cmd = bed.vtun();
    cmd.args(["exec", "a", "--", "yes"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let fd = child.stdout.as_ref().expect("stdout").as_raw_fd();
    let start = Instant::now();
    loop {
        let (queued, size) = pipe_fill(fd);
        if queued >= size {
            break;
        }
        assert!(start.elapsed() < LIMIT, "stdout pipe never filled");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = child.id().to_string();
    let sent = Command::new("kill").args(["-INT", &pid]).status();
    assert!(sent.expect("kill").success());
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vtun did not exit after Ctrl-C with its stdout stalled");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130));
}

#[test]
fn stdin_at_dev_null_is_eof_at_once() {
    let bed = TestBed::builder().vm("a").start();
    let start = Instant::now();
    let out = exec(&bed, "a", &["wc", "-c"]);
    out.assert_ok();
    assert_eq!(out.stdout_str().trim(), "0");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_reader_that_goes_away_ends_exec_quietly() {
    // `vtun exec vm yes | head -1`: the pipe closing is the reader's choice, not a failure.
    let bed = TestBed::builder().vm("a").start();
    let mut cmd = bed.vtun();
    cmd.args(["exec", "a", "--", "yes"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut first = [0u8; 2];
    let watchdog = Watchdog::new(&child, LIMIT);
    std::io::Read::read_exact(child.stdout.as_mut().expect("stdout"), &mut first).expect("read");
    drop(watchdog);
    assert_eq!(&first, b"y\n");
    drop(child.stdout.take());
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vtun kept running after its reader left");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().expect("stderr"), &mut err).expect("read");
    assert_eq!(status.code(), Some(0), "stderr: {err}");
    assert_eq!(err, "", "nothing to report");
}

#[test]
fn sixty_four_mib_through_cat_is_byte_identical() {
    let bed = TestBed::builder().vm("a").start();
    let data = random_bytes(64 << 20, 3);
    let input = bed.dir("big").join("in");
    std::fs::write(&input, &data).expect("write");
    let mut cmd = bed.vtun();
    cmd.args(["exec", "a", "--", "cat"])
        .stdin(std::fs::File::open(&input).expect("open"));
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60));
    out.assert_ok();
    assert_eq!(out.stdout.len(), data.len());
    assert_eq!(hash(&out.stdout), hash(&data));
}

#[test]
fn ssh_dash_t_allocates_a_pty() {
    let bed = TestBed::builder().vm("a").start();
    let mut cmd = bed.vtun();
    cmd.args(["ssh", "-t", "a", "tty"]);
    let out = run_with_timeout(&mut cmd, LIMIT);
    out.assert_ok();
    assert!(
        out.stdout_str().contains("/dev/pts/"),
        "{}",
        out.stdout_str()
    );

    // Without -t (and stdin not a terminal) there is no PTY, as with ssh.
    let mut cmd = bed.vtun();
    cmd.args(["ssh", "a", "tty"]);
    let out = run_with_timeout(&mut cmd, LIMIT);
    assert!(
        out.stdout_str().contains("not a tty"),
        "{}",
        out.stdout_str()
    );
}

/// A tmux session playing the user at a terminal: `vtun ssh a`, type, resize, exit.
struct Tmux {
    sock: std::path::PathBuf,
}

impl Tmux {
    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&self.sock).arg("-f").arg("/dev/null");
        c
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().expect("tmux");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Wait until the pane shows `text`.
    fn wait_for(&self, text: &str) -> String {
        self.shows_within(text, Duration::from_secs(15))
            .unwrap_or_else(|screen| panic!("pane never showed {text:?}:\n{screen}"))
    }

    /// The screen once it shows `text`, or the last screen seen after `limit`.
    fn shows_within(&self, text: &str, limit: Duration) -> Result<String, String> {
        let start = Instant::now();
        loop {
            let screen = self.run(&["capture-pane", "-p", "-t", "t"]);
            if screen.contains(text) {
                return Ok(screen);
            }
            if start.elapsed() > limit {
                return Err(screen);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").output();
    }
}

#[test]
fn interactive_shell_in_tmux_follows_resizes_and_restores_the_terminal() {
    let bed = TestBed::builder().vm("a").start();
    let dir = bed.dir("tmux");
    let stty_after = dir.join("stty-after");
    let script = dir.join("run.sh");
    std::fs::write(
        &script,
        format!(
            "{vtun} ssh a\nstty -a > {after}\necho VTUN-EXITED\nsleep 60\n",
            vtun = vtun_bin().display(),
            after = stty_after.display()
        ),
    )
    .expect("script");
    let tmux = Tmux {
        sock: dir.join("sock"),
    };
    let mut start = bed.command("tmux");
    start
        .arg("-S")
        .arg(&tmux.sock)
        .args(["-f", "/dev/null", "new-session", "-d", "-s", "t"])
        .args(["-x", "100", "-y", "30"])
        .arg(format!("sh {}", script.display()))
        .env("TERM", "xterm-256color")
        .env("VTUN_IDENTITY", &bed.user_key);
    assert!(start.status().expect("tmux").success());

    tmux.run(&["send-keys", "-t", "t", "echo RESULT-$((6*7))", "Enter"]);
    tmux.wait_for("RESULT-42");
    tmux.run(&["send-keys", "-t", "t", "stty size; echo SIZE-DONE", "Enter"]);
    tmux.wait_for("30 100");
    tmux.run(&["resize-window", "-t", "t", "-x", "120", "-y", "40"]);
    // The new size reaches the remote PTY asynchronously (SIGWINCH → window-change request):
    // ask again until the remote terminal reports it.
    let start = Instant::now();
    loop {
        tmux.run(&["send-keys", "-t", "t", "stty size", "Enter"]);
        match tmux.shows_within("40 120", Duration::from_secs(1)) {
            Ok(_) => break,
            Err(screen) => assert!(
                start.elapsed() < Duration::from_secs(15),
                "the remote never saw the resize:\n{screen}"
            ),
        }
    }
    tmux.run(&["send-keys", "-t", "t", "exit", "Enter"]);
    tmux.wait_for("VTUN-EXITED");
    let after = read(&stty_after);
    assert!(
        after.contains(" icanon") && after.contains(" echo "),
        "terminal left in raw mode: {after}"
    );
}

#[test]
fn host_key_is_pinned_then_a_changed_key_is_refused() {
    let mut bed = TestBed::builder().vm("a").start();
    exec(&bed, "a", &["true"]).assert_ok();
    let pinned = read(&bed.known_hosts);
    assert!(
        pinned.starts_with("[a.vm.test]:443 ssh-ed25519 "),
        "{pinned}"
    );
    exec(&bed, "a", &["true"]).assert_ok();

    bed.vm_mut("a").rotate_host_key();
    let out = exec(&bed, "a", &["echo", "should-not-run"]);
    assert_eq!(out.code(), 255, "stderr: {}", out.stderr);
    assert!(out.stdout.is_empty());
    let err = out.stderr.trim();
    assert!(
        err.starts_with("vtun: host key for [a.vm.test]:443 has changed"),
        "{err}"
    );
    assert_eq!(err.matches("SHA256:").count(), 2, "{err}");
    assert!(
        err.contains(&format!("line 1 of {}", bed.known_hosts.display())),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // --host-key-check yes refuses hosts it does not know.
    let mut cmd = bed.vtun();
    cmd.args(["--host-key-check", "yes", "--known-hosts"])
        .arg(bed.root.join("empty_known_hosts"))
        .args(["exec", "a", "--", "true"]);
    let out = run_with_timeout(&mut cmd, LIMIT);
    assert_eq!(out.code(), 255);
    assert!(out.stderr.contains("not in"), "{}", out.stderr);
}

#[test]
fn agent_keys_authenticate() {
    let bed = TestBed::builder().vm("a").start();
    let agent = Agent::start(&bed);
    agent.ssh_add(&bed, &bed.user_key);

    let mut cmd = bed.vtun_bare();
    cmd.args(["exec", "a", "--", "echo", "via-agent"])
        .env("SSH_AUTH_SOCK", &agent.sock);
    let out = run_with_timeout(&mut cmd, LIMIT);
    drop(agent);
    out.assert_ok();
    assert_eq!(out.stdout_str(), "via-agent\n");
}

#[test]
fn a_wrong_or_locked_key_gives_one_clear_auth_error() {
    let bed = TestBed::builder().vm("a").start();
    let wrong = bed.root.join("wrong_key");
    keygen(&wrong, "ed25519");
    let locked = bed.root.join("locked_key");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "secret phrase", "-f"])
        .arg(&locked)
        .status()
        .expect("ssh-keygen");
    assert!(st.success());

    // setsid: no controlling terminal, so the passphrase cannot be asked for.
    let mut cmd = bed.command("setsid");
    cmd.arg(vtun_bin()).args(["exec", "a", "--", "true"]).env(
        "VTUN_IDENTITY",
        format!("{}:{}", wrong.display(), locked.display()),
    );
    let out = run_with_timeout(&mut cmd, LIMIT);
    assert_eq!(out.code(), 255, "stderr: {}", out.stderr);
    let err = out.stderr.trim();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("vtun: permission denied for "), "{err}");
    assert!(
        err.contains(&format!("{} (refused)", wrong.display())),
        "{err}"
    );
    assert!(err.contains("encrypted"), "{err}");
}

#[test]
fn boot_wait_retries_until_sshd_is_up_and_gives_up_after_wait() {
    let mut bed = TestBed::builder()
        .deferred_vm("late")
        .deferred_vm("never")
        .start();

    let mut cmd = bed.vtun();
    cmd.args(["--wait", "2", "exec", "never", "--", "true"]);
    let start = Instant::now();
    let out = run_with_timeout(&mut cmd, LIMIT);
    let took = start.elapsed();
    assert_eq!(out.code(), 255, "stderr: {}", out.stderr);
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(6),
        "{took:?}"
    );
    assert!(
        out.stderr.contains("waiting for never.vm.test"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("gave up after waiting"),
        "{}",
        out.stderr
    );

    let mut cmd = bed.vtun();
    cmd.args(["--wait", "20", "exec", "late", "--", "echo", "booted"]);
    let mut child = Spawned::start(&mut cmd);
    // The VM boots while vtun is retrying, not before it started to.
    child.wait_for_stderr("waiting for late.vm.test", LIMIT);
    bed.start_vm("late");
    let out = child.wait(LIMIT);
    let stderr = &out.stderr;
    assert!(out.status.success(), "stderr: {stderr}");
    assert_eq!(out.stdout_str(), "booted\n");
    assert_eq!(
        stderr.matches("waiting for late.vm.test").count(),
        1,
        "announced once: {stderr}"
    );
}

#[test]
fn keepalive_survives_an_idle_cut_and_notices_a_stalled_link() {
    let bed = TestBed::builder()
        .vm("a")
        .fault("a")
        .idle_timeout(1.5)
        .start();

    // Quiet for 3 s behind an edge that cuts after 1.5 s idle: keepalives keep it open.
    let mut cmd = bed.vtun();
    cmd.env("VTUN_KEEPALIVE_SECS", "0.5")
        .args(["exec", "a", "--sh", "--", "sleep 3; echo alive"]);
    let out = run_with_timeout(&mut cmd, LIMIT);
    out.assert_ok();
    assert_eq!(out.stdout_str(), "alive\n");
    // Without them the same command is cut: exit 255, never 0.
    let mut cmd = bed.vtun();
    cmd.env("VTUN_KEEPALIVE_SECS", "30")
        .args(["exec", "a", "--sh", "--", "sleep 3; echo alive"]);
    let out = run_with_timeout(&mut cmd, LIMIT);
    assert_eq!(out.code(), 255, "stderr: {}", out.stderr);
    assert!(out.stderr.contains("connection lost"), "{}", out.stderr);
    eprintln!("idle cut: {}", out.stderr);

    // The link stalls (no bytes either way, socket open): noticed after 6 missed keepalives.
    let mut cmd = bed.vtun();
    cmd.env("VTUN_KEEPALIVE_SECS", "0.3").args([
        "exec",
        "a-fault",
        "--sh",
        "--",
        "echo started; sleep 30",
    ]);
    let mut child = Spawned::start(&mut cmd);
    child.wait_for_stdout("started\n", LIMIT);
    bed.fault("a").arm(Fault::StallAfter(0));
    let start = Instant::now();
    let out = child.wait(LIMIT);
    bed.fault("a").release();
    let stderr = &out.stderr;
    assert_eq!(out.code(), 255, "stderr: {stderr}");
    assert!(stderr.contains("connection lost"), "{stderr}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

/// sshd refuses the "signal" request for root logins (no privilege separation), which is what
/// the bed and Vers VMs use; closing the channel is what ends a command that writes output.
#[test]
fn ctrl_c_ends_the_remote_command_and_exits_130() {
    let bed = TestBed::builder().vm("a").start();
    let marker = format!("vtun-ctrl-c-{}", std::process::id());
    let mut cmd = bed.vtun();
    cmd.args(["exec", "a", "--sh", "--"])
        .arg(format!("while :; do echo {marker}; sleep 0.1; done"));
    let mut child = Spawned::start(&mut cmd);
    child.wait_for_stdout(&marker, LIMIT);
    let pid = child.id().to_string();
    let sent = Command::new("kill").args(["-INT", &pid]).status();
    assert!(sent.expect("kill").success());
    let out = child.wait(LIMIT);
    assert_eq!(out.code(), 130, "stderr: {}", out.stderr);
    let start = Instant::now();
    loop {
        let alive = Command::new("pgrep").args(["-f", &marker]).output();
        if !alive.expect("pgrep").status.success() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "remote command still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What cp and sync rely on: one session, many channels moving data at the same time.
#[test]
fn one_session_carries_many_channels_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use vtun::link::Connector;

    // In-process: the library reads SSH_AUTH_SOCK, HOME and clap's VTUN_* defaults.
    if rerun_in_clean_env(&[]) {
        return;
    }
    let bed = TestBed::builder().vm("a").start();
    let (settings, host) = settings_for(&bed);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let connector = vtun::ssh::SshConnector::new(settings);
        let (one, two) = tokio::join!(connector.session(&host), connector.session(&host));
        assert!(
            std::sync::Arc::ptr_eq(&one.expect("one"), &two.expect("two")),
            "one shared session per host"
        );
        let opener = connector.connect(&host).await.expect("connect");
        let streams = (0..6u64).map(|i| {
            let opener = opener.clone();
            async move {
                let io = opener.exec("cat").await.expect("exec");
                let data = random_bytes(8 << 20, i);
                let (mut r, mut w) = tokio::io::split(io);
                let send = async {
                    w.write_all(&data).await.expect("write");
                    w.shutdown().await.expect("eof");
                };
                let recv = async {
                    let mut got = Vec::new();
                    r.read_to_end(&mut got).await.expect("read");
                    got
                };
                let ((), got) = tokio::join!(send, recv);
                assert_eq!(hash(&got), hash(&data), "channel {i}");
            }
        });
        futures::future::join_all(streams).await;

        // The SFTP subsystem answers SSH_FXP_INIT with SSH_FXP_VERSION.
        let mut sftp = opener.sftp().await.expect("sftp");
        sftp.write_all(&[0, 0, 0, 5, 1, 0, 0, 0, 3])
            .await
            .expect("init");
        let mut head = [0u8; 5];
        sftp.read_exact(&mut head).await.expect("version");
        assert_eq!(head[4], 2, "SSH_FXP_VERSION");
    });
}

/// Settings and the host `a` for in-process use of the library against the bed.
fn settings_for(bed: &TestBed) -> (vtun::settings::Settings, vtun::target::Host) {
    use clap::Parser;
    let gateway = bed.gateway_addr.to_string();
    let cli = vtun::cli::Cli::try_parse_from([
        "vtun",
        "--connect",
        &gateway,
        "--ca-file",
        &bed.ca_file.display().to_string(),
        "--domain",
        DOMAIN,
        "--known-hosts",
        &bed.known_hosts.display().to_string(),
        "-l",
        &bed.user,
        "proxy",
        "unused",
    ])
    .expect("cli");
    let settings =
        vtun::cmd::settings(&cli.global, std::slice::from_ref(&bed.user_key)).expect("settings");
    let host = settings.host("a").expect("host");
    (settings, host)
}

/// The rest of the seam on a real session: exec channels (env, separate streams, exit code and
/// signal, stdin EOF, resize, close) and direct-tcpip streams.
#[test]
fn a_session_link_opens_exec_channels_and_tcp_streams() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use vtun::link::{Connector, ExecRequest, ExitStatus, Pty, Start};

    let bed = TestBed::builder().vm("a").start();
    let (settings, host) = settings_for(&bed);
    let sshd_port = bed.vm("a").port;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let link = vtun::ssh::SshConnector::new(settings)
            .connect(&host)
            .await
            .expect("connect");
        let req = |line: &str| ExecRequest {
            start: Start::Command(line.into()),
            pty: None,
            env: vec![("VTUN_TEST_GREETING".into(), "hi there".into())],
        };
        let mut ch = link
            .open_exec(req("cat; echo \"$VTUN_TEST_GREETING\" >&2; exit 3"))
            .await
            .expect("exec");
        ch.stdin.write_all(b"to stdin").await.expect("write");
        ch.stdin.shutdown().await.expect("eof");
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (o, e) = tokio::join!(
            ch.stdout.read_to_end(&mut out),
            ch.stderr.read_to_end(&mut err)
        );
        o.expect("stdout");
        e.expect("stderr");
        assert_eq!(out, b"to stdin");
        assert_eq!(err, b"hi there\n");
        assert_eq!(ch.status.await.expect("status"), ExitStatus::Code(3));

        let ch = link.open_exec(req("kill -USR1 $$")).await.expect("exec");
        let want = ExitStatus::Signal {
            name: "USR1".into(),
            core_dumped: false,
        };
        assert_eq!(ch.status.await.expect("status"), want);

        // A PTY of the asked size, resized while it runs; closing ends the command.
        let mut ch = link
            .open_exec(ExecRequest {
                start: Start::Command("stty size; read x; stty size; sleep 60".into()),
                pty: Some(Pty {
                    term: "xterm".into(),
                    cols: 91,
                    rows: 27,
                    modes: Vec::new(),
                }),
                env: Vec::new(),
            })
            .await
            .expect("pty exec");
        let mut screen = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&screen).contains("27 91") {
            let n = ch.stdout.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "pty closed early: {:?}",
                String::from_utf8_lossy(&screen)
            );
            screen.extend_from_slice(&buf[..n]);
        }
        ch.control.resize(120, 40).await;
        ch.stdin.write_all(b"\n").await.expect("write");
        while !String::from_utf8_lossy(&screen).contains("40 120") {
            let n = ch.stdout.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "pty closed early: {:?}",
                String::from_utf8_lossy(&screen)
            );
            screen.extend_from_slice(&buf[..n]);
        }
        let closed = tokio::time::timeout(LIMIT, ch.control.close()).await;
        assert!(closed.is_ok(), "close was never confirmed");

        // direct-tcpip to the VM's own sshd: its banner comes back through the channel.
        let mut tcp = link
            .direct_tcpip("127.0.0.1", sshd_port)
            .await
            .expect("direct-tcpip");
        let mut banner = [0u8; 8];
        tcp.read_exact(&mut banner).await.expect("banner");
        assert_eq!(&banner, b"SSH-2.0-");
    });
}

#[test]
fn vers_cached_key_and_default_ssh_keys_authenticate() {
    let bed = TestBed::builder().vm("a").start();
    let cache = bed.root.join("tmp").join("vers-ssh-keys");
    std::fs::create_dir_all(&cache).expect("mkdir");
    let cached = cache.join("a.key");
    std::fs::copy(&bed.user_key, &cached).expect("copy");
    let mut cmd = bed.vtun_bare();
    cmd.args(["exec", "a", "--", "echo", "cached"]);
    let out = run_with_timeout(&mut cmd, LIMIT);
    out.assert_ok();
    assert_eq!(out.stdout_str(), "cached\n");

    std::fs::remove_file(&cached).expect("rm");
    std::fs::copy(&bed.user_key, bed.home.join(".ssh").join("id_ed25519")).expect("copy");
    let mut cmd = bed.vtun_bare();
    cmd.args(["exec", "a", "--", "echo", "home"]);
    let out = run_with_timeout(&mut cmd, LIMIT);
    out.assert_ok();
    assert_eq!(out.stdout_str(), "home\n");
}

#[test]
fn an_encrypted_key_asks_for_its_passphrase_on_the_terminal() {
    let bed = TestBed::builder().vm("a").start();
    let dir = bed.dir("locked");
    let locked = dir.join("locked_key");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "open sesame", "-f"])
        .arg(&locked)
        .status()
        .expect("ssh-keygen");
    assert!(st.success());
    let public = std::fs::read_to_string(dir.join("locked_key.pub")).expect("pub");
    let authorized = bed.vm("a").dir.join("authorized_keys");
    let mut keys = read(&authorized);
    keys.push_str(&public);
    std::fs::write(&authorized, keys).expect("authorized_keys");

    let script = dir.join("run.sh");
    std::fs::write(
        &script,
        format!(
            "{} exec a -- echo UNLOCKED-$((6*7)); echo STATUS-$?; sleep 60\n",
            vtun_bin().display()
        ),
    )
    .expect("script");
    let tmux = Tmux {
        sock: dir.join("sock"),
    };
    let mut start = bed.command("tmux");
    start
        .arg("-S")
        .arg(&tmux.sock)
        .args(["-f", "/dev/null", "new-session", "-d", "-s", "t"])
        .arg(format!("sh {}", script.display()))
        .env("TERM", "xterm-256color")
        .env("VTUN_IDENTITY", &locked);
    assert!(start.status().expect("tmux").success());
    tmux.wait_for("Enter passphrase for key");
    tmux.run(&["send-keys", "-t", "t", "open sesame", "Enter"]);
    let screen = tmux.wait_for("STATUS-");
    assert!(screen.contains("UNLOCKED-42"), "{screen}");
    assert!(screen.contains("STATUS-0"), "{screen}");
    assert!(
        !screen.contains("open sesame"),
        "passphrase echoed: {screen}"
    );
}

#[test]
fn certificate_errors_are_not_retried() {
    let bed = TestBed::builder().vm("a").start();
    let dir = bed.dir("other-ca");
    let st = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args([
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=other",
            "-days",
            "1",
        ])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("ca.pem"))
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(st.success());
    let mut cmd = bed.vtun();
    cmd.env("VTUN_CA_FILE", dir.join("ca.pem"))
        .args(["--wait", "20", "exec", "a", "--", "true"]);
    let start = Instant::now();
    let out = run_with_timeout(&mut cmd, LIMIT);
    assert_eq!(out.code(), 255, "stderr: {}", out.stderr);
    assert!(out.stderr.contains("certificate"), "{}", out.stderr);
    assert!(!out.stderr.contains("waiting"), "{}", out.stderr);
    assert!(start.elapsed() < Duration::from_secs(5));
}
