//! Connection reuse through the background master, against real sshd behind the gateway: the
//! second command makes no new connection, exec keeps its semantics, cp and sync are
//! byte-identical, masters go away when idle or stopped, and a dead, stale, hung or foreign
//! master never breaks a command.
#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

const LIMIT: Duration = Duration::from_secs(30);

/// A bed whose vtun commands use masters (sockets under their own XDG_RUNTIME_DIR), stopping
/// and killing every master they started when dropped.
struct Masters {
    bed: TestBed,
    runtime: PathBuf,
}

impl Masters {
    fn start(bed: TestBed) -> Masters {
        let runtime = bed.dir("runtime");
        Masters { bed, runtime }
    }

    fn vtun_persist(&self, persist: &str) -> Command {
        let mut cmd = self.bed.vtun();
        cmd.env("VTUN_PERSIST", persist)
            .env("XDG_RUNTIME_DIR", &self.runtime);
        cmd
    }

    fn vtun(&self) -> Command {
        self.vtun_persist("30")
    }

    fn exec_sh(&self, vm: &str, line: &str) -> Out {
        let mut cmd = self.vtun();
        cmd.args(["exec", vm, "--sh", "--", line]);
        run_with_timeout(&mut cmd, LIMIT)
    }

    fn socket_dir(&self) -> PathBuf {
        self.runtime.join("vtun")
    }

    /// `vtun master list --json` as (host, pid, channels, connections).
    fn list(&self) -> Vec<(String, u32, u64, u64)> {
        let mut cmd = self.vtun();
        let out = run_with_timeout(cmd.args(["master", "list", "--json"]), LIMIT);
        out.assert_ok();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["host"].as_str().unwrap().to_string(),
                    m["pid"].as_u64().unwrap() as u32,
                    m["channels"].as_u64().unwrap(),
                    m["connections"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    fn connections(&self) -> usize {
        self.bed
            .gateway_log()
            .lines()
            .filter(|l| l.contains(" connected "))
            .count()
    }
}

impl Drop for Masters {
    fn drop(&mut self) {
        let pids: Vec<u32> = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.list().into_iter().map(|m| m.1).collect()
        }))
        .unwrap_or_default();
        let _ = self.vtun().args(["master", "stop"]).output();
        for pid in pids.into_iter().chain(pids_in_logs(&self.socket_dir())) {
            // SAFETY: kill(2) on a pid we read; at worst it no longer exists.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// Pids the masters logged ("pid=N" on their first line), for the final sweep.
fn pids_in_logs(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().extension().is_some_and(|x| x == "log") {
            for w in read(&e.path()).split_whitespace() {
                if let Some(p) = w.strip_prefix("pid=").and_then(|p| p.parse().ok()) {
                    pids.push(p);
                }
            }
        }
    }
    pids
}

fn alive(pid: u32) -> bool {
    // A zombie has finished: it holds nothing.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty()
        && !stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
}

#[test]
fn the_second_exec_reuses_the_first_ones_connection() {
    let m = Masters::start(TestBed::builder().vm("a").start());
    let out = m.exec_sh("a", "echo first");
    out.assert_ok();
    assert_eq!(out.stdout_str(), "first\n");
    assert!(out.stderr.is_empty(), "quiet: {}", out.stderr);
    let after_first = m.connections();
    assert_eq!(after_first, 1, "{}", m.bed.gateway_log());

    let masters = m.list();
    assert_eq!(masters.len(), 1, "{masters:?}");
    assert_eq!(masters[0].0, m.bed.vm("a").fqdn());
    assert!(alive(masters[0].1));

    for i in 0..3 {
        let out = m.exec_sh("a", &format!("echo again {i}"));
        out.assert_ok();
        assert_eq!(out.stdout_str(), format!("again {i}\n"));
        assert!(out.stderr.is_empty(), "quiet: {}", out.stderr);
    }
    assert_eq!(
        m.connections(),
        after_first,
        "no new connection to the edge"
    );
    assert_eq!(m.list().len(), 1);

    // Persistence off: a direct connection, no master involved.
    let mut cmd = m.vtun_persist("0");
    let out = run_with_timeout(cmd.args(["exec", "a", "true"]), LIMIT);
    out.assert_ok();
    assert_eq!(m.connections(), after_first + 1);
}

#[test]
fn exec_through_the_master_keeps_status_streams_stdin_and_signals() {
    let m = Masters::start(TestBed::builder().vm("a").start());
    m.exec_sh("a", "true").assert_ok();
    let before = m.connections();

    assert_eq!(m.exec_sh("a", "exit 7").code(), 7);
    let out = m.exec_sh("a", "kill -TERM $$");
    assert_eq!(out.code(), 128 + 15, "stderr: {}", out.stderr);
    assert!(out.stderr.contains("signal TERM"), "{}", out.stderr);
    let out = m.exec_sh("a", "echo out; echo err >&2; echo out2");
    out.assert_ok();
    assert_eq!(out.stdout_str(), "out\nout2\n");
    assert_eq!(out.stderr, "err\n");

    // stdin is streamed and its end reaches the remote command.
    let input = m.bed.dir("in").join("data");
    let data = random_bytes(3 << 20, 7);
    std::fs::write(&input, &data).unwrap();
    let mut cmd = m.vtun();
    cmd.args(["exec", "a", "cat"])
        .stdin(std::fs::File::open(&input).unwrap());
    let out = run_with_timeout(&mut cmd, LIMIT);
    out.assert_ok();
    assert_eq!(hash(&out.stdout), hash(&data));

    // Ctrl-C closes the remote command and exits 130, as without a master.
    let marker = format!("vtun-master-ctrl-c-{}", std::process::id());
    let mut cmd = m.vtun();
    cmd.args(["exec", "a", "--sh", "--"])
        .arg(format!("while :; do echo {marker}; sleep 0.1; done"));
    let mut child = Spawned::start(&mut cmd);
    child.wait_for_stdout(&marker, LIMIT);
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    assert!(sent.unwrap().success());
    let out = child.wait(LIMIT);
    assert_eq!(out.code(), 130, "stderr: {}", out.stderr);
    wait_until(Duration::from_secs(5), "remote command ended", || {
        !Command::new("pgrep")
            .args(["-f", &marker])
            .output()
            .unwrap()
            .status
            .success()
    });

    // A PTY through the master: the remote side sees a terminal.
    let mut cmd = m.vtun();
    let out = run_with_timeout(cmd.args(["exec", "-t", "a", "--", "tty"]), LIMIT);
    out.assert_ok();
    assert!(
        out.stdout_str().starts_with("/dev/pts/"),
        "{}",
        out.stdout_str()
    );
    assert_eq!(m.connections(), before, "all through the master");
}

#[test]
fn cp_and_sync_through_the_master_are_identical() {
    let m = Masters::start(TestBed::builder().vm("a").start());
    m.exec_sh("a", "true").assert_ok();
    let before = m.connections();

    let src = m.bed.dir("src");
    std::fs::write(src.join("big"), random_bytes(24 << 20, 1)).unwrap();
    std::fs::create_dir(src.join("sub")).unwrap();
    for i in 0..20 {
        std::fs::write(
            src.join("sub").join(format!("f{i}")),
            random_bytes(1000 + i, i as u64),
        )
        .unwrap();
    }
    let remote = m.bed.vm("a").home().join("up");
    let mut cmd = m.vtun();
    let out = run_with_timeout(
        cmd.args(["cp", "-r"])
            .arg(&src)
            .arg(format!("a:{}", remote.display())),
        LIMIT,
    );
    out.assert_ok();
    assert_eq!(hash_file(&remote.join("big")), hash_file(&src.join("big")));
    assert_eq!(
        hash_file(&remote.join("sub/f19")),
        hash_file(&src.join("sub/f19"))
    );

    let down = m.bed.dir("down");
    let mut cmd = m.vtun();
    let out = run_with_timeout(
        cmd.arg("cp")
            .arg(format!("a:{}", remote.join("big").display()))
            .arg(&down),
        LIMIT,
    );
    out.assert_ok();
    assert_eq!(hash_file(&down.join("big")), hash_file(&src.join("big")));

    // sync, with the agent (exec channels through the master) and a delta on the second run.
    let synced = m.bed.vm("a").home().join("synced");
    let sync = |m: &Masters| {
        let mut cmd = m.vtun();
        let out = run_with_timeout(
            cmd.arg("sync")
                .arg(format!("{}/", src.display()))
                .arg(format!("a:{}/", synced.display())),
            Duration::from_secs(120),
        );
        out.assert_ok();
        assert!(!out.stderr.contains("no sync agent"), "{}", out.stderr);
    };
    sync(&m);
    let mut big = std::fs::read(src.join("big")).unwrap();
    big[5 << 20] ^= 0xff;
    std::fs::write(src.join("big"), &big).unwrap();
    sync(&m);
    assert_eq!(hash_file(&synced.join("big")), hash_file(&src.join("big")));
    assert_eq!(
        hash_file(&synced.join("sub/f3")),
        hash_file(&src.join("sub/f3"))
    );
    assert_eq!(m.connections(), before, "all through the master");
}

#[test]
fn an_idle_master_exits_after_persist_and_stop_ends_masters() {
    let m = Masters::start(TestBed::builder().vm("a").vm("b").start());
    let mut cmd = m.vtun_persist("2");
    run_with_timeout(cmd.args(["exec", "a", "true"]), LIMIT).assert_ok();
    let pid = m.list()[0].1;
    let start = Instant::now();
    wait_until(Duration::from_secs(10), "the idle master exits", || {
        !alive(pid)
    });
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert!(m.list().is_empty());
    let leftover: Vec<_> = std::fs::read_dir(m.socket_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "sock"))
        .collect();
    assert!(leftover.is_empty(), "socket removed: {leftover:?}");

    // stop VM ends that one; stop ends all.
    m.exec_sh("a", "true").assert_ok();
    m.exec_sh("b", "true").assert_ok();
    let both = m.list();
    assert_eq!(both.len(), 2, "{both:?}");
    let mut cmd = m.vtun();
    run_with_timeout(cmd.args(["master", "stop", "a"]), LIMIT).assert_ok();
    let left = m.list();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].0, m.bed.vm("b").fqdn());
    let mut cmd = m.vtun();
    run_with_timeout(cmd.args(["master", "stop"]), LIMIT).assert_ok();
    assert!(m.list().is_empty());
    for (_, pid, _, _) in both {
        wait_until(Duration::from_secs(5), "stopped master exits", || {
            !alive(pid)
        });
    }
}

#[test]
fn a_killed_or_hung_master_never_breaks_a_command() {
    let m = Masters::start(TestBed::builder().vm("a").start());
    m.exec_sh("a", "true").assert_ok();
    let pid = m.list()[0].1;

    // Killed: its socket stays behind, stale. The next command connects, cleanly.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_until(LIMIT, "master gone", || !alive(pid));
    let out = m.exec_sh("a", "echo ok");
    out.assert_ok();
    assert_eq!(out.stdout_str(), "ok\n");
    assert!(out.stderr.is_empty(), "quiet: {}", out.stderr);
    let again = m.list();
    let logs: Vec<String> = std::fs::read_dir(m.socket_dir())
        .unwrap()
        .flatten()
        .map(|e| format!("{}: {}", e.path().display(), read(&e.path())))
        .collect();
    assert_eq!(
        again.len(),
        1,
        "a new master took over: {again:?} {logs:#?}"
    );
    assert_ne!(again[0].1, pid);

    // Hung: accepts nothing. The command gives up on it within the probe time and connects.
    let hung = again[0].1;
    unsafe { libc::kill(hung as i32, libc::SIGSTOP) };
    let start = Instant::now();
    let out = m.exec_sh("a", "echo direct");
    let took = start.elapsed();
    out.assert_ok();
    assert_eq!(out.stdout_str(), "direct\n");
    assert!(out.stderr.is_empty(), "quiet: {}", out.stderr);
    assert!(took < Duration::from_secs(8), "{took:?}");
    assert!(alive(hung), "one silence is not enough to replace a master");

    // Still silent a grace period later: the next command replaces it with a new master.
    std::thread::sleep(Duration::from_secs(5));
    let start = Instant::now();
    let out = m.exec_sh("a", "echo replaced");
    let took = start.elapsed();
    out.assert_ok();
    assert_eq!(out.stdout_str(), "replaced\n");
    assert!(out.stderr.is_empty(), "quiet: {}", out.stderr);
    assert!(took < Duration::from_secs(12), "{took:?}");
    wait_until(LIMIT, "the hung master is gone", || !alive(hung));
    let now = m.list();
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now[0].1, hung);
    let before = m.connections();
    m.exec_sh("a", "true").assert_ok();
    assert_eq!(m.connections(), before, "the new master is reused");
}

#[test]
fn a_client_of_another_uid_is_refused() {
    if !is_root() {
        eprintln!("skipped: needs root to run a client as nobody");
        return;
    }
    // A runtime dir nobody can reach (the bed's root is private to us).
    let base = tempfile::Builder::new()
        .prefix("vtun-uid-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut m = Masters::start(TestBed::builder().vm("a").start());
    m.runtime = base.path().to_path_buf();
    m.exec_sh("a", "true").assert_ok();
    let dir = m.socket_dir();
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let sock = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "sock"))
        .unwrap();
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Open the permissions as a careless user might: the uid check still refuses.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let script = r#"
import socket, sys, json
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
body = json.dumps("hello").encode()
s.settimeout(5)
try:
    s.sendall(bytes([1]) + len(body).to_bytes(4, "big") + body)
    print("got", len(s.recv(100)))
except (BrokenPipeError, ConnectionResetError):
    print("got 0")
"#;
    let out = run_with_timeout(
        Command::new("runuser")
            .args(["-u", "nobody", "--", "/usr/bin/python3", "-c", script])
            .arg(&sock),
        LIMIT,
    );
    assert_eq!(out.stdout_str().trim(), "got 0", "stderr: {}", out.stderr);
    let log = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "log"))
        .unwrap();
    assert!(
        read(&log).contains("refused a client with uid"),
        "{}",
        read(&log)
    );
    // Our own commands still work, and put the directory back to 0700.
    m.exec_sh("a", "true").assert_ok();
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
}

#[test]
fn fifty_concurrent_commands_share_one_master() {
    let m = Masters::start(TestBed::builder().vm("a").start());
    m.exec_sh("a", "true").assert_ok();
    let before = m.connections();
    let children: Vec<_> = (0..50)
        .map(|i| {
            let mut cmd = m.vtun();
            cmd.args(["exec", "a", "--sh", "--"])
                .arg(format!("sleep 0.5; echo n{i}; exit {}", i % 3));
            (i, Spawned::start(&mut cmd))
        })
        .collect();
    for (i, c) in children {
        let out = c.wait(Duration::from_secs(60));
        assert_eq!(out.code(), i % 3, "command {i}: {}", out.stderr);
        assert_eq!(out.stdout_str(), format!("n{i}\n"));
        assert!(out.stderr.is_empty(), "command {i}: {}", out.stderr);
    }
    assert_eq!(
        m.connections(),
        before,
        "one master connection carried them all"
    );
    assert_eq!(m.list().len(), 1);
}

#[test]
fn a_master_whose_connection_drops_fails_the_command_with_255_then_recovers() {
    let m = Masters::start(TestBed::builder().vm("a").fault("a").start());
    let mut cmd = m.vtun();
    cmd.args(["exec", "a-fault", "--sh", "--", "echo started; sleep 30"]);
    let mut child = Spawned::start(&mut cmd);
    child.wait_for_stdout("started\n", LIMIT);
    let pid = m.list()[0].1;
    m.bed.fault("a").cut_now();
    let start = Instant::now();
    let out = child.wait(LIMIT);
    assert_eq!(out.code(), 255, "stderr: {}", out.stderr);
    assert!(out.stderr.contains("connection"), "{}", out.stderr);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    wait_until(
        Duration::from_secs(10),
        "the master exits with its connection",
        || !alive(pid),
    );

    let out = m.exec_sh("a-fault", "echo back");
    out.assert_ok();
    assert_eq!(out.stdout_str(), "back\n");
    assert!(out.stderr.is_empty(), "quiet: {}", out.stderr);
}

#[test]
fn when_sshd_refuses_more_channels_the_master_opens_another_connection() {
    let m = Masters::start(TestBed::builder().vm("a").max_sessions(2).start());
    m.exec_sh("a", "true").assert_ok();
    let children: Vec<_> = (0..5)
        .map(|i| {
            let mut cmd = m.vtun();
            cmd.args(["exec", "a", "--sh", "--"])
                .arg(format!("sleep 1; echo n{i}"));
            (i, Spawned::start(&mut cmd))
        })
        .collect();
    for (i, c) in children {
        let out = c.wait(LIMIT);
        out.assert_ok();
        assert_eq!(out.stdout_str(), format!("n{i}\n"));
    }
    let masters = m.list();
    assert_eq!(masters.len(), 1, "{masters:?}");
    assert!(
        masters[0].3 >= 3,
        "5 channels at 2 per connection: {masters:?}"
    );

    // cp's 8 parallel channels get all of them too, and the bytes arrive intact.
    let src = m.bed.dir("src").join("big");
    std::fs::write(&src, random_bytes(16 << 20, 3)).unwrap();
    let remote = m.bed.vm("a").home().join("big");
    let mut cmd = m.vtun();
    let out = run_with_timeout(
        cmd.arg("cp")
            .arg(&src)
            .arg(format!("a:{}", remote.display())),
        LIMIT,
    );
    out.assert_ok();
    assert!(out.stderr.is_empty(), "quiet: {}", out.stderr);
    assert_eq!(hash_file(&remote), hash_file(&src));

    // Once no channel has been open for a while, only the first connection is kept.
    let start = Instant::now();
    wait_until(Duration::from_secs(25), "extra connections closed", || {
        m.list().first().is_some_and(|x| x.3 == 1)
    });
    assert!(
        start.elapsed() >= Duration::from_secs(5),
        "not at once: {:?}",
        start.elapsed()
    );
    let before = m.connections();
    let out = m.exec_sh("a", "echo still");
    out.assert_ok();
    assert_eq!(out.stdout_str(), "still\n");
    assert_eq!(m.connections(), before, "the kept connection serves it");
}

#[test]
fn an_auth_failure_through_a_master_is_one_clear_error() {
    let m = Masters::start(TestBed::builder().vm("a").start());
    let key = m.bed.dir("keys").join("stranger");
    keygen(&key, "ed25519");
    let mut cmd = m.vtun();
    cmd.env("VTUN_IDENTITY", &key).args(["exec", "a", "true"]);
    let out = run_with_timeout(&mut cmd, LIMIT);
    assert_eq!(out.code(), 255, "{}", out.stderr);
    assert!(out.stderr.contains("permission denied"), "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    wait_until(LIMIT, "the failed master exits", || m.list().is_empty());
}

#[test]
fn the_masters_keepalives_hold_it_through_an_idle_cut_and_notice_a_stalled_link() {
    // Quiet for 3 s between two commands, behind an edge that cuts after 1.5 s idle: the
    // master's keepalives keep its connection, and the second command reuses it.
    let m = Masters::start(TestBed::builder().vm("a").idle_timeout(1.5).start());
    let exec = |vm: &str, secs: &str, line: &str| {
        let mut cmd = m.vtun();
        cmd.env("VTUN_KEEPALIVE_SECS", secs)
            .args(["exec", vm, "--sh", "--", line]);
        run_with_timeout(&mut cmd, LIMIT)
    };
    exec("a", "0.5", "true").assert_ok();
    let pid = m.list()[0].1;
    std::thread::sleep(Duration::from_secs(3));
    let out = exec("a", "0.5", "echo held");
    out.assert_ok();
    assert_eq!(out.stdout_str(), "held\n");
    assert_eq!(m.connections(), 1, "{}", m.bed.gateway_log());
    assert_eq!(m.list()[0].1, pid);
    drop(m);

    // The link stalls (no bytes either way, sockets open, no edge timeout): the master
    // notices after its missed keepalives and exits; the next command works.
    let m = Masters::start(TestBed::builder().vm("a").fault("a").start());
    let exec = |line: &str| {
        let mut cmd = m.vtun();
        cmd.env("VTUN_KEEPALIVE_SECS", "0.3")
            .args(["exec", "a-fault", "--sh", "--", line]);
        run_with_timeout(&mut cmd, LIMIT)
    };
    exec("true").assert_ok();
    let pid = m.list()[0].1;
    m.bed.fault("a").arm(Fault::StallAfter(0));
    let start = Instant::now();
    wait_until(Duration::from_secs(15), "the stalled master exits", || {
        !alive(pid)
    });
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "not before keepalives were missed: {:?}",
        start.elapsed()
    );
    m.bed.fault("a").release();
    let out = exec("echo again");
    out.assert_ok();
    assert_eq!(out.stdout_str(), "again\n");
    let now = m.list();
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now[0].1, pid);
}

#[test]
fn an_encrypted_key_without_an_agent_is_asked_for_and_starts_no_master_again() {
    let m = Masters::start(TestBed::builder().vm("a").start());
    let dir = m.bed.dir("locked");
    let locked = dir.join("locked_key");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "open sesame", "-f"])
        .arg(&locked)
        .status()
        .unwrap();
    assert!(st.success());
    let public = read(&dir.join("locked_key.pub"));
    let authorized = m.bed.vm("a").dir.join("authorized_keys");
    let keys = read(&authorized) + &public;
    std::fs::write(&authorized, keys).unwrap();

    // Two commands at a terminal, no agent: a master cannot ask for the passphrase, so each
    // command asks and connects itself; only the first tries a master.
    let script = dir.join("run.sh");
    let vtun = vtun_bin();
    std::fs::write(
        &script,
        format!(
            "{v} exec a -- echo ONE-$((6*7)); {v} exec a -- echo TWO-$((6*7)); echo STATUS-$?; sleep 60\n",
            v = vtun.display()
        ),
    )
    .unwrap();
    let tmux = Tmux {
        sock: dir.join("sock"),
    };
    let mut start = m.bed.command("tmux");
    start
        .arg("-S")
        .arg(&tmux.sock)
        .args(["-f", "/dev/null", "new-session", "-d", "-s", "t"])
        .arg(format!("sh {}", script.display()))
        .env("TERM", "xterm-256color")
        .env("VTUN_IDENTITY", &locked)
        .env("VTUN_PERSIST", "30")
        .env("XDG_RUNTIME_DIR", &m.runtime);
    assert!(start.status().unwrap().success());
    tmux.wait_for("Enter passphrase for key");
    tmux.run(&["send-keys", "-t", "t", "open sesame", "Enter"]);
    tmux.wait_for("ONE-42");
    wait_until(LIMIT, "the second command asks too", || {
        let screen = tmux.run(&["capture-pane", "-p", "-t", "t"]);
        screen.matches("Enter passphrase").count() == 2
    });
    tmux.run(&["send-keys", "-t", "t", "open sesame", "Enter"]);
    let screen = tmux.wait_for("STATUS-");
    assert!(screen.contains("TWO-42"), "{screen}");
    assert!(screen.contains("STATUS-0"), "{screen}");

    let logs: String = std::fs::read_dir(m.socket_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .map(|e| read(&e.path()))
        .collect();
    assert_eq!(
        logs.matches("master listening").count(),
        1,
        "one master tried, not one per command: {logs}"
    );
    // The master's failed attempt, then one direct connection per command.
    assert_eq!(m.connections(), 3, "{}", m.bed.gateway_log());
    assert!(m.list().is_empty());
}

/// A tmux session playing the user at a terminal.
struct Tmux {
    sock: PathBuf,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.sock)
            .args(["-f", "/dev/null"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

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

    fn wait_for(&self, text: &str) -> String {
        self.shows_within(text, Duration::from_secs(15))
            .unwrap_or_else(|screen| panic!("pane never showed {text:?}:\n{screen}"))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

#[test]
fn ssh_and_bench_go_through_the_master_and_a_shell_follows_resizes() {
    let m = Masters::start(TestBed::builder().vm("a").start());
    m.exec_sh("a", "true").assert_ok();
    let before = m.connections();

    let mut cmd = m.vtun();
    let out = run_with_timeout(cmd.args(["ssh", "a", "echo", "via", "ssh"]), LIMIT);
    out.assert_ok();
    assert_eq!(out.stdout_str(), "via ssh\n");
    let mut cmd = m.vtun();
    let out = run_with_timeout(cmd.args(["bench", "--size", "4M", "--json", "a"]), LIMIT);
    out.assert_ok();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report.is_object(), "{}", out.stdout_str());

    // An interactive shell: PTY, typing, a resize that reaches the remote terminal, exit.
    let dir = m.bed.dir("tmux");
    let script = dir.join("run.sh");
    std::fs::write(
        &script,
        format!(
            "{} ssh a\necho VTUN-EXITED-$?\nsleep 60\n",
            vtun_bin().display()
        ),
    )
    .unwrap();
    let tmux = Tmux {
        sock: dir.join("sock"),
    };
    let mut start = m.bed.command("tmux");
    start
        .arg("-S")
        .arg(&tmux.sock)
        .args(["-f", "/dev/null", "new-session", "-d", "-s", "t"])
        .args(["-x", "100", "-y", "30"])
        .arg(format!("sh {}", script.display()))
        .env("TERM", "xterm-256color")
        .env("VTUN_IDENTITY", &m.bed.user_key)
        .env("VTUN_PERSIST", "30")
        .env("XDG_RUNTIME_DIR", &m.runtime);
    assert!(start.status().unwrap().success());
    tmux.run(&["send-keys", "-t", "t", "echo RESULT-$((6*7))", "Enter"]);
    tmux.wait_for("RESULT-42");
    tmux.run(&["send-keys", "-t", "t", "stty size", "Enter"]);
    tmux.wait_for("30 100");
    tmux.run(&["resize-window", "-t", "t", "-x", "120", "-y", "40"]);
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
    tmux.run(&["send-keys", "-t", "t", "exit 3", "Enter"]);
    tmux.wait_for("VTUN-EXITED-3");
    assert_eq!(m.connections(), before, "all through the master");
}

/// The rest of the seam through a master, in-process: a TCP stream (direct-tcpip, for port
/// forwarding) and SFTP, on the master a vtun command started.
#[test]
fn tcp_streams_and_sftp_open_through_a_master_link() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use vtun::link::Link;

    // In-process: nothing of the developer's environment may leak into the library.
    if rerun_in_clean_env(&[]) {
        return;
    }
    let m = Masters::start(TestBed::builder().vm("a").start());
    m.exec_sh("a", "true").assert_ok();
    let path = std::fs::read_dir(m.socket_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "sock"))
        .unwrap();
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = echo.accept() {
            let mut r = s.try_clone().unwrap();
            let _ = std::io::copy(&mut r, &mut s);
        }
    });
    let before = m.connections();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let link = vtun::mux::client::MasterLink {
            path,
            name: m.bed.vm("a").fqdn(),
            open_timeout: Duration::from_secs(30),
        };
        let mut tcp = link.direct_tcpip("127.0.0.1", port).await.unwrap();
        tcp.write_all(b"ping through the master").await.unwrap();
        let mut got = [0u8; 23];
        tcp.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping through the master");

        // The SFTP subsystem answers SSH_FXP_INIT with SSH_FXP_VERSION.
        let mut sftp = link.sftp().await.unwrap();
        sftp.write_all(&[0, 0, 0, 5, 1, 0, 0, 0, 3]).await.unwrap();
        let mut head = [0u8; 5];
        sftp.read_exact(&mut head).await.unwrap();
        assert_eq!(head[4], 2, "SSH_FXP_VERSION");

        // A refused stream is an error, not a hang.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = closed.local_addr().unwrap().port();
        drop(closed);
        let r = tokio::time::timeout(LIMIT, link.direct_tcpip("127.0.0.1", dead)).await;
        assert!(r.unwrap().is_err());
    });
    assert_eq!(m.connections(), before);
}

/// sync and cp ride on the master's channels: a connection cut under them is a lost
/// connection (255, named), never a clean end of a stream; the next run completes.
#[test]
fn a_cut_under_sync_and_cp_through_the_master_is_255_and_the_rerun_completes() {
    let m = Masters::start(TestBed::builder().vm("a").fault("a").start());
    let src = m.bed.dir("src");
    for i in 0..4 {
        std::fs::write(src.join(format!("f{i}")), random_bytes(4 << 20, i)).unwrap();
    }
    let dst = m.bed.dir("dst");
    let sync = |m: &Masters| {
        let mut cmd = m.vtun();
        run_with_timeout(
            cmd.arg("sync")
                .arg(format!("{}/", src.display()))
                .arg(format!("a-fault:{}/", dst.display())),
            Duration::from_secs(120),
        )
    };
    m.exec_sh("a-fault", "true").assert_ok();
    m.bed.fault("a").arm(Fault::CutAfter(6 << 20));
    let out = sync(&m);
    assert!(m.bed.fault("a").fired(), "the cut fired");
    assert_eq!(out.code(), 255, "a cut sync fails: {}", out.stderr);
    assert!(out.stderr.contains("a-fault.vm.test"), "{}", out.stderr);
    sync(&m).assert_ok();
    for i in 0..4 {
        let f = format!("f{i}");
        assert_eq!(hash_file(&dst.join(&f)), hash_file(&src.join(&f)));
    }

    let big = src.join("f0");
    let remote = m.bed.vm("a").home().join("copied");
    m.bed.fault("a").arm(Fault::CutAfter(2 << 20));
    let mut cmd = m.vtun();
    let out = run_with_timeout(
        cmd.arg("cp")
            .arg(&big)
            .arg(format!("a-fault:{}", remote.display())),
        LIMIT,
    );
    assert_eq!(out.code(), 255, "a cut cp fails: {}", out.stderr);
    let mut cmd = m.vtun();
    let out = run_with_timeout(
        cmd.arg("cp")
            .arg(&big)
            .arg(format!("a-fault:{}", remote.display())),
        LIMIT,
    );
    out.assert_ok();
    assert_eq!(hash_file(&remote), hash_file(&big));
}

/// Bytes from a client are hostile until parsed: oversized, unknown, truncated or out-of-order
/// frames end that one connection, never the master.
#[test]
fn garbage_from_a_client_ends_only_its_connection() {
    use std::io::{Read, Write};
    let m = Masters::start(TestBed::builder().vm("a").start());
    m.exec_sh("a", "true").assert_ok();
    let pid = m.list()[0].1;
    let sock = std::fs::read_dir(m.socket_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "sock"))
        .unwrap();
    let garbage: [&[u8]; 5] = [
        &[1, 0xff, 0xff, 0xff, 0xff],        // a request claiming 4 GiB
        &[99, 0, 0, 0, 0],                   // an unknown kind
        &[17, 0, 0, 0, 3, b'a', b'b', b'c'], // a master-to-client kind first
        &[1, 0, 0, 0, 9, b'{', b'"', b'x'],  // truncated JSON, then EOF
        b"{\"exec\":{\"command\":\"id\"}}",  // no framing at all
    ];
    for g in garbage {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = s.write_all(g);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        assert!(reply.is_empty(), "no answer to garbage: {reply:?}");
    }
    let out = m.exec_sh("a", "echo still here");
    out.assert_ok();
    assert_eq!(out.stdout_str(), "still here\n");
    assert_eq!(m.list()[0].1, pid, "the same master");
}

/// A fan-out uses a master that is up and starts none: a run over many VMs leaves no process per
/// VM behind.
#[test]
fn a_fan_out_uses_masters_that_are_up_and_starts_none() {
    let m = Masters::start(TestBed::builder().vm("a").vm("b").start());
    m.exec_sh("a", "true").assert_ok();
    assert_eq!(m.connections(), 1);
    let mut cmd = m.vtun();
    let out = run_with_timeout(cmd.args(["exec", "a,b", "--sh", "--", "echo hi"]), LIMIT);
    out.assert_ok();
    let mut lines: Vec<String> = out.stdout_str().lines().map(String::from).collect();
    lines.sort();
    assert_eq!(lines, ["a: hi", "b: hi"]);
    assert_eq!(m.connections(), 2, "a through its master, b directly");
    let hosts: Vec<String> = m.list().into_iter().map(|h| h.0).collect();
    assert_eq!(hosts, [m.bed.vm("a").fqdn()], "no master started for b");
}

/// The master connects for the first command; what it says while it waits for a booting VM
/// reaches that command's stderr, as with a direct connection.
#[test]
fn the_first_command_shows_the_masters_boot_wait() {
    let mut m = Masters::start(TestBed::builder().deferred_vm("late").start());
    let mut cmd = m.vtun();
    cmd.args(["--wait", "20", "exec", "late", "--sh", "--", "echo up"]);
    let mut child = Spawned::start(&mut cmd);
    child.wait_for_stderr("waiting for late.vm.test to accept connections", LIMIT);
    m.bed.start_vm("late");
    let out = child.wait(LIMIT);
    out.assert_ok();
    assert_eq!(out.stdout_str(), "up\n");
    assert_eq!(m.list().len(), 1, "it went through a master");
}
