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
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
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
    let mut child = bed
        .vtun()
        .args(["proxy", "bye.vm.test"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _stdin_kept_open = child.stdin.take();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "proxy still running 1 s after the server closed"
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

#[test]
fn stdin_eof_half_closes_and_the_reply_still_arrives() {
    let port = backend(|mut s| {
        let mut n = 0usize;
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        // Reply only after the client's EOF: proves the read side stayed open.
        std::thread::sleep(Duration::from_millis(200));
        s.write_all(format!("got {n}\n").as_bytes()).unwrap();
    });
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
fn fifty_concurrent_sessions_through_one_gateway() {
    let bed = TestBed::start();
    let children: Vec<_> = (0..50)
        .map(|i| {
            let vm = if i % 2 == 0 { "a.vm.test" } else { "b.vm.test" };
            bed.ssh()
                .args([vm, &format!("echo session-{i}")])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "session {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("session-{i}\n")
        );
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
