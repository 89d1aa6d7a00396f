//! `vtun gateway`'s own limits: a client that connects and sends nothing is closed after the
//! handshake timeout, and connections past `--max-connections` are closed as they arrive; and a
//! backend that resets closes the client's connection.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

fn gateway(dir: &std::path::Path, extra: &[&str]) -> GatewayProc {
    let mut args = vec![
        "--self-signed".to_string(),
        dir.display().to_string(),
        "--route".into(),
        "*.vm.test=127.0.0.1:9".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    GatewayProc::start(&args)
}

/// How long until the gateway closes `s` (EOF or reset), or `None` if it is still open after
/// `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => Some(start.elapsed()),
        Ok(n) => panic!("gateway sent {n} bytes to a client that said nothing"),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(_) => Some(start.elapsed()),
    }
}

#[test]
fn a_client_that_sends_nothing_is_closed_after_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), &["--handshake-timeout", "1"]);
    let mut s = TcpStream::connect(gw.addr).unwrap();
    let took = closed_within(&mut s, Duration::from_secs(10)).expect("still open after 10 s");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
}

#[test]
fn connections_past_max_connections_are_closed_and_a_freed_slot_is_reused() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(
        dir.path(),
        &["--max-connections", "2", "--handshake-timeout", "60"],
    );
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(gw.addr).unwrap();
        assert_eq!(
            closed_within(&mut s, Duration::from_millis(200)),
            None,
            "within the limit"
        );
        held.push(s);
    }
    let mut third = TcpStream::connect(gw.addr).unwrap();
    assert!(
        closed_within(&mut third, Duration::from_secs(5)).is_some(),
        "a third connection must be closed"
    );
    drop(held.pop());
    // The freed slot is released when the gateway notices the close: poll until a new
    // connection stays open.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = TcpStream::connect(gw.addr).unwrap();
        if closed_within(&mut s, Duration::from_millis(300)).is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never freed");
    }
}

/// A backend that resets the connection after the client's first bytes (what a VM that is not
/// running looks like behind the edge, when the client spoke first) must end the client's
/// stream too: a client waiting for a banner would otherwise wait for its own timeout.
#[test]
fn a_backend_reset_closes_the_client_stream() {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = backend.local_addr().unwrap().port();
    let resetter = std::thread::spawn(move || {
        let (conn, _) = backend.accept().unwrap();
        // Wait for the client's bytes, then close without reading them: the kernel resets.
        let mut peek = [0u8; 1];
        conn.peek(&mut peek).unwrap();
        drop(conn);
    });
    let bed = TestBed::builder()
        .route(&format!("resets.{DOMAIN}=127.0.0.1:{port}"))
        .start();
    let start = Instant::now();
    let mut cmd = bed.vtun();
    cmd.args([
        "--wait",
        "0",
        "--connect-timeout",
        "20",
        "exec",
        "resets",
        "--",
        "true",
    ]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30));
    resetter.join().unwrap();
    assert_eq!(out.code(), 255, "{}", out.stderr);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}: {}",
        start.elapsed(),
        out.stderr
    );
    assert!(
        out.stderr.contains("closed before the ssh banner"),
        "{}",
        out.stderr
    );
}

/// A VM that is down closes each connection with the client's SSH banner unread, which resets
/// it; the gateway must close the client's side then, so vtun retries (boot wait) instead of
/// waiting out its connect timeout. Whether the banner arrives before the close is a race, so
/// several tries.
#[test]
fn a_backend_reset_closes_the_client_connection() {
    let mut bed = TestBed::builder().vm("a").start();
    bed.stop_vm("a");
    for _ in 0..6 {
        let mut cmd = bed.vtun();
        cmd.args([
            "--wait",
            "1",
            "--connect-timeout",
            "20",
            "exec",
            "a",
            "--",
            "true",
        ]);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(30));
        assert_eq!(out.code(), 255, "{}", out.stderr);
        assert!(
            out.stderr.contains("gave up after waiting"),
            "{}",
            out.stderr
        );
    }
}
