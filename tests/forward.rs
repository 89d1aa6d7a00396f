//! `vtun forward` (and `vtun ssh -L/-R`) against real sshd behind the gateway: what a user sees
//! through the forwards (curl and raw HTTP through -L, -R, -D, Unix sockets), what is said on
//! stderr, and what happens when the connection is cut or the VM says no. The "VM" is this
//! machine, so a server bound to loopback here is also one on the VM's loopback.

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

const LIMIT: Duration = Duration::from_secs(30);

/// A tiny HTTP/1.0 server: every request gets `body`, except `/hold`, which gets its headers and
/// then nothing for a minute (a connection that stays open).
fn serve_http<S: Read + Write>(mut s: S, body: &[u8]) {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
        if req.len() > 16 * 1024 {
            return;
        }
    }
    if req.starts_with(b"GET /hold ") {
        let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nheld");
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    let head = format!(
        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s
        .write_all(head.as_bytes())
        .and_then(|()| s.write_all(body));
}

/// Start [`serve_http`] on a TCP listener; returns its port.
fn web_tcp(addr: SocketAddr, body: Arc<Vec<u8>>) -> u16 {
    let l = TcpListener::bind(addr).expect("bind web server");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let body = body.clone();
            std::thread::spawn(move || serve_http(c, &body));
        }
    });
    port
}

fn web_v4(body: Arc<Vec<u8>>) -> u16 {
    web_tcp((Ipv4Addr::LOCALHOST, 0).into(), body)
}

/// Start [`serve_http`] on a Unix socket.
fn web_unix(path: &Path, body: Arc<Vec<u8>>) {
    let l = UnixListener::bind(path).expect("bind unix web server");
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let body = body.clone();
            std::thread::spawn(move || serve_http(c, &body));
        }
    });
}

/// GET / over `s`; the body, or None when the connection closed without a full reply.
fn http_get<S: Read + Write>(mut s: S) -> Option<Vec<u8>> {
    s.write_all(b"GET /file HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut all = Vec::new();
    s.read_to_end(&mut all).ok()?;
    let at = all.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some(all.split_off(at + 4))
}

fn get_tcp(port: u16) -> Option<Vec<u8>> {
    let s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(LIMIT)).ok()?;
    http_get(s)
}

fn forward(bed: &TestBed, vm: &str, args: &[&str]) -> Spawned {
    let mut cmd = bed.vtun();
    cmd.arg("forward").arg(vm).args(args);
    Spawned::start(&mut cmd)
}

/// The port printed right after the last `needle` on the child's stderr (waiting for it).
#[track_caller]
fn port_after(p: &mut Spawned, needle: &str) -> u16 {
    p.wait_for_stderr(needle, LIMIT);
    let err = p.stderr_so_far();
    let at = err.rfind(needle).expect("needle") + needle.len();
    let digits: String = err[at..].chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no port after {needle:?} in {err}"))
}

fn curl(bed: &TestBed, args: &[&str]) -> Out {
    let mut cmd = bed.command("curl");
    cmd.args(["-sS", "--fail", "--max-time", "60"]).args(args);
    run_with_timeout(&mut cmd, Duration::from_secs(90))
}

/// A port on loopback that refuses connections (bound, never listening) for as long as the
/// returned descriptor lives.
fn refusing_port() -> (std::os::fd::OwnedFd, u16) {
    reserve_port()
}

#[test]
fn local_forward_downloads_64_mib_hash_identical() {
    let bed = TestBed::builder().vm("a").start();
    let body = Arc::new(random_bytes(64 << 20, 15));
    let want = hash(&body);
    let web = web_v4(body);
    let spec = format!("0:127.0.0.1:{web}");
    let mut fwd = forward(&bed, "a", &["-L", &spec]);
    let port = port_after(&mut fwd, &format!("-L {spec}: listening on 127.0.0.1:"));
    let err = fwd.stderr_so_far();
    assert!(
        err.contains(&format!("→ 127.0.0.1:{web} on a.vm.test")),
        "the line says where connections go: {err}"
    );
    let out_file = bed.dir("dl").join("file");
    let url = format!("http://127.0.0.1:{port}/file");
    curl(&bed, &["-o", out_file.to_str().expect("utf-8"), &url]).assert_ok();
    assert_eq!(hash_file(&out_file), want, "hash-identical through -L");
}

#[test]
fn remote_forward_reaches_a_server_here_and_prints_the_port_the_vm_picked() {
    let bed = TestBed::builder().vm("a").start();
    let body = Arc::new(random_bytes(1 << 20, 2));
    let web = web_v4(body.clone());
    // 127.0.0.1 rather than the default `localhost`: for that, sshd binds the port it picked on
    // ::1 and on 127.0.0.1 if free there, and here that port may be another test's server's.
    let spec = format!("127.0.0.1:0:127.0.0.1:{web}");
    let mut fwd = forward(&bed, "a", &["-R", &spec]);
    let port = port_after(
        &mut fwd,
        &format!("-R {spec}: a.vm.test listening on 127.0.0.1:"),
    );
    assert_ne!(port, 0);
    assert!(fwd
        .stderr_so_far()
        .contains(&format!("→ 127.0.0.1:{web} here")));
    // The VM's loopback is this machine's: connect to the port the VM listens on.
    assert_eq!(get_tcp(port).as_deref(), Some(&body[..]));
    assert_eq!(get_tcp(port).as_deref(), Some(&body[..]), "and again");
}

#[test]
fn dynamic_forward_speaks_socks5_with_names_ipv4_and_ipv6() {
    let bed = TestBed::builder().vm("a").start();
    let body = Arc::new(random_bytes(256 << 10, 3));
    let want = hash(&body);
    let web = web_v4(body.clone());
    let web6 = web_tcp((Ipv6Addr::LOCALHOST, 0).into(), body);
    let mut fwd = forward(&bed, "a", &["-D", "0"]);
    let socks = port_after(&mut fwd, "-D 0: SOCKS5 listening on 127.0.0.1:");
    let proxy = format!("127.0.0.1:{socks}");
    let dir = bed.dir("socks");
    let cases = [
        // The name is resolved on the VM.
        ("--socks5-hostname", format!("http://localhost:{web}/file")),
        ("--socks5", format!("http://127.0.0.1:{web}/file")),
        ("--socks5", format!("http://[::1]:{web6}/file")),
    ];
    for (i, (how, url)) in cases.iter().enumerate() {
        let f = dir.join(format!("f{i}"));
        curl(&bed, &[how, &proxy, "-o", f.to_str().expect("utf-8"), url]).assert_ok();
        assert_eq!(hash_file(&f), want, "{how} {url}");
    }
    // A target the VM cannot reach: that request fails, the proxy carries on.
    let (_held, closed) = refusing_port();
    let bad = format!("http://127.0.0.1:{closed}/file");
    let out = curl(&bed, &["--socks5-hostname", &proxy, &bad]);
    assert!(!out.status.success(), "unreachable target fails");
    // SOCKS5 reply 4: host unreachable.
    assert!(out.stderr.contains("(4)"), "{}", out.stderr);
    fwd.wait_for_stderr(&format!("refused a stream to 127.0.0.1:{closed}"), LIMIT);
    let f = dir.join("after");
    let url = format!("http://localhost:{web}/file");
    curl(
        &bed,
        &[
            "--socks5-hostname",
            &proxy,
            "-o",
            f.to_str().expect("utf-8"),
            &url,
        ],
    )
    .assert_ok();
    assert_eq!(hash_file(&f), want);
}

#[test]
fn fifty_concurrent_connections_through_one_forward() {
    let bed = TestBed::builder().vm("a").start();
    let body = Arc::new(random_bytes(1 << 20, 4));
    let web = web_v4(body.clone());
    let spec = format!("0:127.0.0.1:{web}");
    let mut fwd = forward(&bed, "a", &["-L", &spec]);
    let port = port_after(&mut fwd, &format!("-L {spec}: listening on 127.0.0.1:"));
    let barrier = Arc::new(std::sync::Barrier::new(50));
    let threads: Vec<_> = (0..50)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
                s.set_read_timeout(Some(LIMIT)).expect("timeout");
                barrier.wait();
                http_get(s)
            })
        })
        .collect();
    for t in threads {
        let got = t.join().expect("thread");
        assert!(
            got.as_deref() == Some(&body[..]),
            "every connection gets the whole body"
        );
    }
}

/// Cut mid-session: the open forwarded connection closes, the listeners stay, the -R timer
/// reconnects (one line), asks for -R again (the new port is printed), and -L works again.
#[test]
fn forwards_survive_a_cut_connection() {
    let bed = TestBed::builder().vm("a").fault("a").start();
    let body = Arc::new(random_bytes(1 << 20, 5));
    let web = web_v4(body.clone());
    let spec = format!("0:127.0.0.1:{web}");
    let rspec = format!("127.0.0.1:{spec}");
    // And one at a fixed port, which the VM must give back after the cut.
    let fixed = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let fixed_spec = format!("127.0.0.1:{fixed}:127.0.0.1:{web}");
    let mut fwd = forward(
        &bed,
        "a-fault",
        &["-L", &spec, "-R", &rspec, "-R", &fixed_spec],
    );
    let local = port_after(&mut fwd, &format!("-L {spec}: listening on 127.0.0.1:"));
    let remote_line = format!("-R {rspec}: a-fault.vm.test listening on 127.0.0.1:");
    let remote = port_after(&mut fwd, &remote_line);
    assert_eq!(get_tcp(local).as_deref(), Some(&body[..]));
    assert_eq!(get_tcp(remote).as_deref(), Some(&body[..]));
    fwd.wait_for_stderr(
        &format!("-R {fixed_spec}: a-fault.vm.test listening"),
        LIMIT,
    );
    assert_eq!(get_tcp(fixed).as_deref(), Some(&body[..]));

    let mut held = TcpStream::connect(("127.0.0.1", local)).expect("connect");
    held.write_all(b"GET /hold HTTP/1.0\r\n\r\n")
        .expect("request");
    let mut buf = [0u8; 64];
    held.set_read_timeout(Some(LIMIT)).expect("timeout");
    let n = held.read(&mut buf).expect("headers through the forward");
    assert!(n > 0);

    bed.fault("a").cut_now();
    let cut = Instant::now();
    // The held connection closes (EOF or reset), instead of hanging.
    loop {
        match held.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("the open forwarded connection stayed open after the cut")
            }
            Err(_) => break,
        }
    }
    assert!(cut.elapsed() < LIMIT);

    fwd.wait_for_stderr("reconnected to a-fault.vm.test", LIMIT);
    wait_until(LIMIT, "-R asked for again", || {
        fwd.stderr_so_far().matches(&remote_line).count() == 2
    });
    let remote = port_after(&mut fwd, &remote_line);
    assert_eq!(
        get_tcp(local).as_deref(),
        Some(&body[..]),
        "-L after the cut"
    );
    assert_eq!(
        get_tcp(remote).as_deref(),
        Some(&body[..]),
        "-R after the cut"
    );
    wait_until(LIMIT, "the fixed -R port is back", || {
        get_tcp(fixed).as_deref() == Some(&body[..])
    });
    let err = fwd.stderr_so_far();
    assert_eq!(
        err.matches("reconnected").count(),
        1,
        "one line per reconnect: {err}"
    );
}

/// With only -L there is no timer: the next accepted connection reconnects.
#[test]
fn the_next_connection_reconnects_a_local_forward() {
    let bed = TestBed::builder().vm("a").fault("a").start();
    let body = Arc::new(random_bytes(64 << 10, 6));
    let web = web_v4(body.clone());
    let spec = format!("0:127.0.0.1:{web}");
    let mut fwd = forward(&bed, "a-fault", &["-L", &spec]);
    let local = port_after(&mut fwd, &format!("-L {spec}: listening on 127.0.0.1:"));
    assert_eq!(get_tcp(local).as_deref(), Some(&body[..]));
    let mark = bed.log_mark();
    bed.fault("a").cut_now();
    wait_until(LIMIT, "the gateway saw the cut", || {
        bed.gateway_log()[mark..].contains(" closed up=")
    });
    assert_eq!(get_tcp(local).as_deref(), Some(&body[..]), "after the cut");
    let err = fwd.stderr_so_far();
    assert_eq!(
        err.matches("reconnected to a-fault.vm.test").count(),
        1,
        "{err}"
    );
}

#[test]
fn a_local_port_in_use_is_one_line_and_exit_1() {
    let bed = TestBed::builder().vm("a").start();
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let mut cmd = bed.vtun();
    cmd.args(["forward", "a", "-L", &format!("{port}:127.0.0.1:1")]);
    let out = run_with_timeout(&mut cmd, LIMIT);
    assert_eq!(out.code(), 1, "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "-L {port}:127.0.0.1:1: cannot listen on 127.0.0.1:{port}"
        )) && out.stderr.contains("in use"),
        "{}",
        out.stderr
    );
}

/// `AllowTcpForwarding no`: -R is refused at once (one line naming it), -L when a connection
/// comes (one line naming it); a run with nothing left is exit 1.
#[test]
fn forwarding_forbidden_by_the_vm_names_the_forward() {
    let bed = TestBed::builder().vm("a").start();
    let config = bed.vm("a").dir.join("sshd_config");
    let mut text = read(&config);
    text.push_str("AllowTcpForwarding no\n");
    std::fs::write(&config, text).expect("sshd_config");
    let body = Arc::new(b"hello".to_vec());
    let web = web_v4(body);
    let spec = format!("0:127.0.0.1:{web}");
    let mut fwd = forward(&bed, "a", &["-L", &spec, "-R", &spec]);
    fwd.wait_for_stderr(&format!("-R {spec}: a.vm.test refused to listen on"), LIMIT);
    let local = port_after(&mut fwd, &format!("-L {spec}: listening on 127.0.0.1:"));
    assert_eq!(get_tcp(local), None, "the connection is closed");
    fwd.wait_for_stderr(
        &format!("-L {spec}: a.vm.test refused a stream to 127.0.0.1:{web} (forbidden"),
        LIMIT,
    );

    let mut cmd = bed.vtun();
    cmd.args(["forward", "a", "-R", &spec]);
    let out = run_with_timeout(&mut cmd, LIMIT);
    assert_eq!(out.code(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("refused to listen"), "{}", out.stderr);
    assert!(
        out.stderr.contains("no forward could be set up"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_port_taken_on_the_vm_refuses_that_remote_forward_only() {
    let bed = TestBed::builder().vm("a").start();
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let body = Arc::new(b"hello".to_vec());
    let web = web_v4(body.clone());
    let bad = format!("127.0.0.1:{port}:127.0.0.1:{web}");
    let good = format!("127.0.0.1:0:127.0.0.1:{web}");
    let mut fwd = forward(&bed, "a", &["-R", &bad, "-R", &good]);
    let remote = port_after(
        &mut fwd,
        &format!("-R {good}: a.vm.test listening on 127.0.0.1:"),
    );
    let err = fwd.stderr_so_far();
    assert!(
        err.contains(&format!(
            "-R {bad}: a.vm.test refused to listen on 127.0.0.1:{port}"
        )),
        "{err}"
    );
    assert_eq!(get_tcp(remote).as_deref(), Some(&body[..]));
}

#[test]
fn an_unreachable_target_closes_that_connection_only() {
    let bed = TestBed::builder().vm("a").start();
    let body = Arc::new(random_bytes(1 << 20, 7));
    let web = web_v4(body.clone());
    let (_held, closed) = refusing_port();
    let good = format!("0:127.0.0.1:{web}");
    let bad = format!("0:127.0.0.1:{closed}");
    let mut fwd = forward(&bed, "a", &["-L", &good, "-L", &bad]);
    let good_port = port_after(&mut fwd, &format!("-L {good}: listening on 127.0.0.1:"));
    let bad_port = port_after(&mut fwd, &format!("-L {bad}: listening on 127.0.0.1:"));
    // One long download in flight while the bad target is tried.
    let long = std::thread::spawn(move || get_tcp(good_port));
    assert_eq!(get_tcp(bad_port), None);
    fwd.wait_for_stderr(
        &format!("-L {bad}: a.vm.test refused a stream to 127.0.0.1:{closed} (it cannot connect)"),
        LIMIT,
    );
    assert_eq!(long.join().expect("thread").as_deref(), Some(&body[..]));
    assert_eq!(get_tcp(good_port).as_deref(), Some(&body[..]));
}

#[test]
fn unix_socket_forwards_both_ways() {
    let bed = TestBed::builder().vm("a").start();
    let body = Arc::new(random_bytes(1 << 20, 8));
    let want = hash(&body);
    let dir = bed.dir("sock");
    let vm_sock = dir.join("vm.sock");
    web_unix(&vm_sock, body.clone());
    let web = web_v4(body.clone());
    let here = dir.join("here.sock");
    let there = dir.join("there.sock");
    let s = |p: &Path| p.to_str().expect("utf-8").to_string();
    let l_unix = format!("{}:{}", s(&here), s(&vm_sock));
    let l_tcp = format!("0:{}", s(&vm_sock));
    let r_unix = format!("{}:127.0.0.1:{web}", s(&there));
    let mut fwd = forward(&bed, "a", &["-L", &l_unix, "-L", &l_tcp, "-R", &r_unix]);
    fwd.wait_for_stderr(&format!("-L {l_unix}: listening on {}", s(&here)), LIMIT);
    let tcp = port_after(&mut fwd, &format!("-L {l_tcp}: listening on 127.0.0.1:"));
    fwd.wait_for_stderr(
        &format!("-R {r_unix}: a.vm.test listening on {}", s(&there)),
        LIMIT,
    );

    let out = dir.join("out");
    for sock in [&here, &there] {
        let _ = std::fs::remove_file(&out);
        curl(
            &bed,
            &["--unix-socket", &s(sock), "-o", &s(&out), "http://x/file"],
        )
        .assert_ok();
        assert_eq!(hash_file(&out), want, "through {}", sock.display());
    }
    assert_eq!(
        get_tcp(tcp).as_deref(),
        Some(&body[..]),
        "TCP here to a socket there"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&here).expect("socket").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "only this user may use the socket");

    // SIGTERM: exit 0 and the socket made here is gone.
    // SAFETY: kill() takes no memory; the pid is our running child's.
    unsafe { libc::kill(fwd.id() as libc::pid_t, libc::SIGTERM) };
    let done = fwd.wait(LIMIT);
    assert_eq!(done.code(), 0, "{}", done.stderr);
    assert!(!here.exists(), "the socket is removed on exit");
    assert!(
        UnixStream::connect(&vm_sock).is_ok(),
        "the VM's own socket is left alone"
    );
}

/// `vtun ssh -L/-R` while a command runs: the command (on the "VM", this machine) fetches
/// through both forwards.
#[test]
fn ssh_forwards_while_the_command_runs() {
    let bed = TestBed::builder().vm("a").start();
    let body = Arc::new(random_bytes(64 << 10, 9));
    let want = hash(&body);
    let web = web_v4(body);
    let free = || {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let (lp, rp) = (free(), free());
    let dir = bed.dir("ssh");
    let (lf, rf) = (dir.join("l"), dir.join("r"));
    let line = format!(
        "curl -sS --fail -o {} http://127.0.0.1:{lp}/file && curl -sS --fail -o {} \
         http://127.0.0.1:{rp}/file",
        lf.display(),
        rf.display()
    );
    let mut cmd = bed.vtun();
    cmd.args(["ssh", "-L", &format!("{lp}:127.0.0.1:{web}")])
        .args(["-R", &format!("127.0.0.1:{rp}:127.0.0.1:{web}"), "a", &line]);
    let out = run_with_timeout(&mut cmd, LIMIT);
    out.assert_ok();
    assert_eq!(hash_file(&lf), want, "through -L");
    assert_eq!(hash_file(&rf), want, "through -R");
    assert!(
        TcpStream::connect(("127.0.0.1", lp)).is_err(),
        "the -L listener is gone with the command"
    );
}

/// A -R to a socket on the VM is asked for again after a cut, at the same path.
#[test]
fn a_remote_socket_forward_comes_back_after_a_cut() {
    let bed = TestBed::builder().vm("a").fault("a").start();
    let body = Arc::new(random_bytes(64 << 10, 10));
    let web = web_v4(body.clone());
    let there = bed.dir("rsock").join("there.sock");
    let spec = format!("{}:127.0.0.1:{web}", there.display());
    let mut fwd = forward(&bed, "a-fault", &["-R", &spec]);
    let line = format!(
        "-R {spec}: a-fault.vm.test listening on {}",
        there.display()
    );
    fwd.wait_for_stderr(&line, LIMIT);
    let get = || {
        let s = UnixStream::connect(&there).ok()?;
        s.set_read_timeout(Some(LIMIT)).ok()?;
        http_get(s)
    };
    assert_eq!(get().as_deref(), Some(&body[..]));
    bed.fault("a").cut_now();
    fwd.wait_for_stderr("reconnected to a-fault.vm.test", LIMIT);
    let start = Instant::now();
    while get().as_deref() != Some(&body[..]) {
        assert!(start.elapsed() < LIMIT, "not back: {}", fwd.stderr_so_far());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A VM that cannot be reached: exit 255 as for every command, and no socket left behind.
#[test]
fn an_unreachable_vm_is_exit_255_and_leaves_no_socket() {
    let bed = TestBed::builder().vm("a").start();
    let here = bed.dir("nosuch").join("here.sock");
    let spec = format!("{}:/nowhere.sock", here.display());
    let mut cmd = bed.vtun();
    cmd.args(["forward", "--wait", "0", "nosuch", "-L", &spec]);
    let out = run_with_timeout(&mut cmd, LIMIT);
    assert_eq!(out.code(), 255, "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(
        !here.exists(),
        "the socket bound before connecting is removed"
    );
}

/// The VM goes down under a forward and comes back: a connection accepted meanwhile waits for
/// it (the usual boot wait, with its one line) and then goes through.
#[test]
fn a_reconnect_waits_for_the_vm_to_come_back() {
    let mut bed = TestBed::builder().vm("a").start();
    let body = Arc::new(random_bytes(64 << 10, 11));
    let web = web_v4(body.clone());
    let spec = format!("0:127.0.0.1:{web}");
    let mut fwd = forward(&bed, "a", &["-L", &spec]);
    let local = port_after(&mut fwd, &format!("-L {spec}: listening on 127.0.0.1:"));
    assert_eq!(get_tcp(local).as_deref(), Some(&body[..]));
    bed.stop_vm("a");
    let during = std::thread::spawn(move || get_tcp(local));
    fwd.wait_for_stderr("waiting for a.vm.test to accept connections", LIMIT);
    bed.start_vm("a");
    assert_eq!(during.join().expect("thread").as_deref(), Some(&body[..]));
    fwd.wait_for_stderr("reconnected to a.vm.test", LIMIT);
}

/// Connections that arrive while the VM is down share one reconnect (and its failure): ten at
/// once fail together after one `--wait`, not one after another; the forward carries on.
#[test]
fn connections_during_an_outage_share_one_reconnect() {
    let mut bed = TestBed::builder().vm("a").start();
    let body = Arc::new(random_bytes(16 << 10, 12));
    let web = web_v4(body.clone());
    let spec = format!("0:127.0.0.1:{web}");
    let mut cmd = bed.vtun();
    cmd.args(["forward", "--wait", "2", "a", "-L", &spec]);
    let mut fwd = Spawned::start(&mut cmd);
    let local = port_after(&mut fwd, &format!("-L {spec}: listening on 127.0.0.1:"));
    assert_eq!(get_tcp(local).as_deref(), Some(&body[..]));
    bed.stop_vm("a");
    let start = Instant::now();
    let tries: Vec<_> = (0..10)
        .map(|_| std::thread::spawn(move || get_tcp(local)))
        .collect();
    for t in tries {
        assert_eq!(t.join().expect("thread"), None, "nothing gets through");
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "one shared wait, not ten: {took:?}"
    );
    let err = fwd.stderr_so_far();
    // One wait for all ten (two if the machine is slow enough that a connection is accepted
    // only after the first wait ended; ten one after another would take 20 s).
    let waits = err.matches("waiting for a.vm.test").count();
    assert!((1..=2).contains(&waits), "{err}");
    bed.start_vm("a");
    assert_eq!(
        get_tcp(local).as_deref(),
        Some(&body[..]),
        "back after the outage"
    );
}

/// `-R [BIND:]PORT`: a SOCKS5 proxy on the VM whose connections start here (as OpenSSH's).
#[test]
fn remote_dynamic_forward_is_a_socks_proxy_on_the_vm() {
    let bed = TestBed::builder().vm("a").start();
    let body = Arc::new(random_bytes(256 << 10, 13));
    let want = hash(&body);
    let web = web_v4(body);
    let mut fwd = forward(&bed, "a", &["-R", "127.0.0.1:0"]);
    let port = port_after(
        &mut fwd,
        "-R 127.0.0.1:0: a.vm.test listening on 127.0.0.1:",
    );
    assert!(fwd
        .stderr_so_far()
        .contains("→ SOCKS5, connecting from here"));
    let proxy = format!("127.0.0.1:{port}");
    let f = bed.dir("rsocks").join("f");
    let url = format!("http://localhost:{web}/file");
    curl(
        &bed,
        &[
            "--socks5-hostname",
            &proxy,
            "-o",
            f.to_str().expect("utf-8"),
            &url,
        ],
    )
    .assert_ok();
    assert_eq!(hash_file(&f), want);
    // A refused target: SOCKS5 reply 5, and one line naming the forward.
    let (_held, closed) = refusing_port();
    let out = curl(
        &bed,
        &["--socks5", &proxy, &format!("http://127.0.0.1:{closed}/")],
    );
    assert!(out.stderr.contains("(5)"), "{}", out.stderr);
    fwd.wait_for_stderr(
        &format!("-R 127.0.0.1:0: cannot connect to 127.0.0.1:{closed} here"),
        LIMIT,
    );
}
