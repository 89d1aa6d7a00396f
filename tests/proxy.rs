//! `vtun proxy` as the ProxyCommand of the real OpenSSH clients, through the real gateway.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn ssh_runs_commands_and_passes_exit_codes() {
    let bed = TestBed::start();
    let out = run(bed.ssh().args(["a.vm.test", "echo hello-from-$((6*7))"]));
    out.assert_ok();
    assert_eq!(out.stdout_str(), "hello-from-42\n");
    assert!(
        out.stderr.is_empty(),
        "proxy must be silent: {}",
        out.stderr
    );

    let out = run(bed.ssh().args(["b.vm.test", "exit 7"]));
    assert_eq!(out.code(), 7, "stderr: {}", out.stderr);
}

#[test]
fn thirty_two_mib_round_trip_through_ssh_cat_is_byte_identical() {
    let bed = TestBed::start();
    let data = random_bytes(32 << 20, 1);
    let input = bed.dir("in").join("data");
    std::fs::write(&input, &data).unwrap();
    let out = run(bed
        .ssh()
        .args(["a.vm.test", "cat"])
        .stdin(std::fs::File::open(&input).unwrap()));
    out.assert_ok();
    assert_eq!(out.stdout.len(), data.len());
    assert_eq!(hash(&out.stdout), hash(&data));
}

fn proxy_error(bed: &TestBed, cmd: &mut std::process::Command) -> String {
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert_eq!(out.code(), 255, "stderr: {}", out.stderr);
    assert!(out.stdout.is_empty());
    let lines: Vec<_> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {:?}", out.stderr);
    assert!(lines[0].starts_with("vtun: "), "{}", lines[0]);
    let _ = bed;
    out.stderr
}

#[test]
fn untrusted_certificate_is_refused() {
    let bed = TestBed::start();
    let err = proxy_error(
        &bed,
        bed.vtun()
            .env_remove("VTUN_CA_FILE")
            .args(["proxy", "a.vm.test"]),
    );
    assert!(err.contains("a.vm.test"), "{err}");
    assert!(err.contains("not trusted"), "{err}");
}

#[test]
fn wrong_name_and_expired_certificates_are_refused() {
    let bed = TestBed::start();
    let ca = vtun::gateway::certs::Ca::generate("test CA").unwrap();
    let dir = bed.dir("certs");
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
    let backend = format!("127.0.0.1:{}", bed.vm("a").port);
    let cases = [
        (
            "wrong",
            vec!["other.example".to_string()],
            false,
            "not valid for this name",
        ),
        ("expired", vec!["*.vm.test".to_string()], true, "expired"),
    ];
    for (name, names, expired, expect) in cases {
        let (cert, key) = ca.issue(&names, expired).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key).unwrap();
        let gw = GatewayProc::start(&[
            "--cert".into(),
            dir.join(format!("{name}.pem")).display().to_string(),
            "--key".into(),
            dir.join(format!("{name}.key")).display().to_string(),
            "--route".into(),
            format!("*.vm.test={backend}"),
        ]);
        let err = proxy_error(
            &bed,
            bed.vtun()
                .env("VTUN_CONNECT", gw.addr.to_string())
                .env("VTUN_CA_FILE", dir.join("ca.pem"))
                .args(["proxy", "a.vm.test"]),
        );
        assert!(err.contains(expect), "{name}: {err}");
    }
}

#[test]
fn unknown_server_name_is_refused() {
    let bed = TestBed::start();
    let err = proxy_error(&bed, bed.vtun().args(["proxy", "nope.example.org"]));
    assert!(err.contains("nope.example.org"), "{err}");
    assert!(err.contains("closed during the TLS handshake"), "{err}");
    assert!(bed.gateway_log().contains("unknown server name"));
}

#[test]
fn unreachable_edge_fails_fast_with_refused() {
    let bed = TestBed::start();
    // Bound and never listening: refused for sure, and no parallel test can take the port.
    let (_held, port) = reserve_port();
    let err = proxy_error(
        &bed,
        bed.vtun()
            .env("VTUN_CONNECT", format!("127.0.0.1:{port}"))
            .args(["proxy", "a.vm.test"]),
    );
    assert!(err.contains("connection refused"), "{err}");
}

/// A one-shot TCP backend: `serve` runs on the accepted connection.
fn backend(serve: impl FnOnce(std::net::TcpStream) + Send + 'static) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((s, _)) = l.accept() {
            serve(s);
        }
    });
    port
}

/// `vtun proxy HOST` with stdin, stdout and stderr all pipes held by the test.
fn spawn_piped(bed: &TestBed, host: &str) -> std::process::Child {
    bed.vtun()
        .args(["proxy", host])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn server_closing_first_ends_proxy_promptly_with_stdin_open() {
    let port = backend(|mut s| {
        s.write_all(b"bye\n").unwrap();
    });
    let bed = TestBed::builder()
        .vm("a")
        .route(&format!("bye.vm.test=127.0.0.1:{port}"))
        .start();
    let start = Instant::now();
    let mut child = spawn_piped(&bed, "bye.vm.test");
    let _stdin_kept_open = child.stdin.take();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        // A proxy that waits for stdin never ends (stdin stays open): the bound only has to
        // be far above scheduling noise on a loaded machine.
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "proxy still running 5 s after the server closed"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(out, "bye\n");
}

/// A backend that reads to EOF and only then replies with the byte count: a reply proves the
/// proxy kept its read side open after half-closing. The reply comes late on purpose, like
/// `sort`'s after its input ends: a correct proxy waits for it however long it takes, while one
/// that exits at stdin EOF is gone by then. The delay is the scenario, not synchronisation.
fn counting_backend() -> u16 {
    backend(|mut s| {
        let mut n = 0usize;
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        std::thread::sleep(Duration::from_millis(200)); // a slow answer (see above)
        s.write_all(format!("got {n}\n").as_bytes()).unwrap();
    })
}

/// Wait for `child`, failing the test after `limit`.
fn wait_within(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("proxy still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn stdin_eof_half_closes_and_the_reply_still_arrives() {
    let port = counting_backend();
    let bed = TestBed::builder()
        .vm("a")
        .route(&format!("count.vm.test=127.0.0.1:{port}"))
        .start();
    let input = bed.dir("in").join("one-mib");
    std::fs::write(&input, random_bytes(1 << 20, 2)).unwrap();
    let out = run_with_timeout(
        bed.vtun()
            .args(["proxy", "count.vm.test"])
            .stdin(std::fs::File::open(&input).unwrap()),
        Duration::from_secs(20),
    );
    out.assert_ok();
    assert_eq!(out.stdout_str(), "got 1048576\n");
}

#[test]
fn files_as_stdin_and_stdout_are_relayed_too() {
    // Regular files cannot be polled: both directions take the blocking-thread path.
    let port = counting_backend();
    let bed = TestBed::builder()
        .vm("a")
        .route(&format!("count.vm.test=127.0.0.1:{port}"))
        .start();
    let dir = bed.dir("io");
    std::fs::write(dir.join("in"), random_bytes(1 << 20, 5)).unwrap();
    let mut child = bed
        .vtun()
        .args(["proxy", "count.vm.test"])
        .stdin(std::fs::File::open(dir.join("in")).unwrap())
        .stdout(std::fs::File::create(dir.join("out")).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_within(&mut child, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    assert_eq!(read(&dir.join("out")), "got 1048576\n");
}

#[test]
fn a_full_stdout_pipe_grows_and_a_reader_closing_it_ends_the_proxy_quietly() {
    use std::os::fd::AsRawFd;
    let port = backend(|mut s| {
        let chunk = vec![b'x'; 64 * 1024];
        while s.write_all(&chunk).is_ok() {}
    });
    let bed = TestBed::builder()
        .vm("a")
        .route(&format!("flood.vm.test=127.0.0.1:{port}"))
        .start();
    let mut child = spawn_piped(&bed, "flood.vm.test");
    let _stdin_kept_open = child.stdin.take();
    let mut stdout = child.stdout.take().unwrap();
    // A bulk download fills the pipe, and the proxy grows it (fewer wake-ups on both ends).
    let start = Instant::now();
    // SAFETY: F_GETPIPE_SZ on the read end of the pipe this test holds; no memory is involved.
    while unsafe { libc::fcntl(stdout.as_raw_fd(), libc::F_GETPIPE_SZ) } < 1 << 20 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a full stdout pipe was not grown"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut first = vec![0u8; 1 << 20];
    let watchdog = Watchdog::new(&child, Duration::from_secs(10));
    stdout.read_exact(&mut first).unwrap();
    drop(watchdog);
    drop(stdout);
    let status = wait_within(&mut child, Duration::from_secs(10));
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{status:?}, stderr: {stderr}");
    assert!(stderr.is_empty(), "a closed stdout is no error: {stderr}");
}

fn nonblocking(fd: &impl std::os::fd::AsRawFd) -> bool {
    // SAFETY: F_GETFL on a descriptor this test owns; no memory is involved.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    assert!(flags >= 0, "fcntl: {}", std::io::Error::last_os_error());
    flags & libc::O_NONBLOCK != 0
}

fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe() fills two new descriptors, owned from here on by the OwnedFds.
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    }
}

/// O_NONBLOCK belongs to the open file description, which the parent shares: the proxy may set
/// it on pipes and sockets while it runs, and must put the old flags back before it exits.
#[test]
fn stdin_and_stdout_are_left_blocking_on_exit() {
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;
    // Two cases: stdin a pipe and stdout a socket; one socket as both (one file description).
    for same_socket in [false, true] {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let port = backend(move |mut s| {
            let _ = released.recv();
            s.write_all(b"bye\n").unwrap();
        });
        let bed = TestBed::builder()
            .vm("a")
            .route(&format!("bye.vm.test=127.0.0.1:{port}"))
            .start();
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        // The `watch` copies share the proxy's file descriptions; `_writer` keeps the pipe open.
        let (stdin, _writer) = if same_socket {
            (OwnedFd::from(theirs.try_clone().unwrap()), None)
        } else {
            let (r, w) = pipe();
            (r, Some(w))
        };
        let stdin_watch = stdin.try_clone().unwrap();
        let stdout_watch = theirs.try_clone().unwrap();
        assert!(!nonblocking(&stdin_watch) && !nonblocking(&stdout_watch));
        let mut child = bed
            .vtun()
            .args(["proxy", "bye.vm.test"])
            .stdin(stdin)
            .stdout(OwnedFd::from(theirs))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // While it runs, the proxy serves both on its task (non-blocking)...
        let start = Instant::now();
        while !(nonblocking(&stdin_watch) && nonblocking(&stdout_watch)) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "never non-blocking"
            );
            assert!(child.try_wait().unwrap().is_none(), "proxy exited early");
            std::thread::sleep(Duration::from_millis(5));
        }
        release.send(()).unwrap();
        let status = wait_within(&mut child, Duration::from_secs(10));
        assert!(status.success(), "same socket: {same_socket}: {status:?}");
        // ...and leaves them as it found them.
        assert!(!nonblocking(&stdin_watch), "same socket: {same_socket}");
        assert!(!nonblocking(&stdout_watch), "same socket: {same_socket}");
        let mut reply = [0u8; 4];
        ours.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"bye\n");
    }
}

#[test]
fn fifty_concurrent_sessions_through_one_gateway() {
    let bed = TestBed::start();
    let children: Vec<_> = (0..50)
        .map(|i| {
            let vm = if i % 2 == 0 { "a.vm.test" } else { "b.vm.test" };
            Spawned::start(
                bed.ssh()
                    .args([vm, &format!("echo session-{i}")])
                    .stdin(Stdio::null()),
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait(deadline.saturating_duration_since(Instant::now()));
        assert!(out.status.success(), "session {i}: {}", out.stderr);
        assert_eq!(out.stdout_str(), format!("session-{i}\n"));
    }
}

#[test]
fn scp_and_rsync_work_through_the_proxy() {
    let bed = TestBed::start();
    let local = bed.dir("local");
    let data = random_bytes(3 << 20, 3);
    std::fs::write(local.join("blob"), &data).unwrap();
    let remote = bed.dir("remote");

    // scp up and back down.
    run(bed.scp().arg(local.join("blob")).arg(format!(
        "{}@a.vm.test:{}/blob",
        bed.user,
        remote.display()
    )))
    .assert_ok();
    assert_eq!(hash_file(&remote.join("blob")), hash(&data));
    let back = bed.dir("back");
    run(bed
        .scp()
        .arg(format!("{}@a.vm.test:{}/blob", bed.user, remote.display()))
        .arg(back.join("blob")))
    .assert_ok();
    assert_eq!(hash_file(&back.join("blob")), hash(&data));

    // rsync a small tree.
    let tree = bed.dir("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/x"), b"x").unwrap();
    std::fs::write(tree.join("y"), random_bytes(100_000, 4)).unwrap();
    let dst = bed.dir("rsync-dst");
    run(bed
        .rsync()
        .arg("-a")
        .arg(format!("{}/", tree.display()))
        .arg(format!("a.vm.test:{}/", dst.display())))
    .assert_ok();
    assert_eq!(std::fs::read(dst.join("sub/x")).unwrap(), b"x");
    assert_eq!(hash_file(&dst.join("y")), hash_file(&tree.join("y")));
}

#[test]
fn ssh_config_block_names_this_binary() {
    let bed = TestBed::start();
    let out = run(bed
        .vtun()
        .env("VTUN_DOMAIN", "vm.vers.sh")
        .args(["ssh-config"]));
    out.assert_ok();
    let text = out.stdout_str();
    assert!(text.contains("Host *.vm.vers.sh"), "{text}");
    assert!(text.contains("User "), "{text}");
    let exe = vtun_bin().canonicalize().unwrap();
    assert!(
        text.contains(&format!("ProxyCommand {} proxy", exe.display()))
            || text.contains("proxy %h"),
        "{text}"
    );
}
