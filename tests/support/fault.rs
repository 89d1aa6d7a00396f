//! An in-process TCP relay that can cut or stall connections on command: the fault hooks of the
//! test bed. It sits between the gateway and an sshd, so faults hit the middle of a real session.
//!
//! Faults are one-shot: armed with a byte budget, they fire once (on every connection open at
//! that moment) and then disarm, so a retry or `--resume` run goes through.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Pass everything.
    None,
    /// Reset every open connection once this many bytes moved (both directions) since arming.
    CutAfter(u64),
    /// Stop forwarding (keep sockets open) once this many bytes moved since arming.
    StallAfter(u64),
}

struct State {
    fault: Mutex<Fault>,
    moved: AtomicU64,
    /// Bumped each time a cut fires; connections opened before it die.
    generation: AtomicU64,
    stalled: AtomicBool,
    conns: Mutex<Vec<(u64, TcpStream, TcpStream)>>,
}

pub struct FaultRelay {
    port: u16,
    state: Arc<State>,
}

impl FaultRelay {
    pub fn start(backend: impl ToSocketAddrs) -> FaultRelay {
        let backend = backend
            .to_socket_addrs()
            .expect("addr")
            .next()
            .expect("addr");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(State {
            fault: Mutex::new(Fault::None),
            moved: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(backend) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let gen = st.generation.load(Ordering::SeqCst);
                if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                    st.conns.lock().expect("lock").push((gen, c2, s2));
                }
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    let st = st.clone();
                    std::thread::spawn(move || copy(from, to, st));
                }
            }
        });
        FaultRelay { port, state }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Arm a fault; the byte count starts from now.
    pub fn arm(&self, fault: Fault) {
        self.state.moved.store(0, Ordering::SeqCst);
        self.state.stalled.store(false, Ordering::SeqCst);
        *self.state.fault.lock().expect("lock") = fault;
    }

    /// Cut every open connection now.
    pub fn cut_now(&self) {
        cut_all(&self.state);
    }

    /// Resume a stalled relay (and disarm).
    pub fn release(&self) {
        *self.state.fault.lock().expect("lock") = Fault::None;
        self.state.stalled.store(false, Ordering::SeqCst);
    }

    /// Whether an armed fault has fired.
    pub fn fired(&self) -> bool {
        *self.state.fault.lock().expect("lock") == Fault::None
            && self.state.generation.load(Ordering::SeqCst) > 0
            || self.state.stalled.load(Ordering::SeqCst)
    }
}

fn cut_all(st: &State) {
    let gen = st.generation.fetch_add(1, Ordering::SeqCst);
    let mut conns = st.conns.lock().expect("lock");
    for (g, c, s) in conns.iter() {
        if *g <= gen {
            let _ = c.shutdown(Shutdown::Both);
            let _ = s.shutdown(Shutdown::Both);
        }
    }
    conns.retain(|(g, _, _)| *g > gen);
}

fn copy(mut from: TcpStream, mut to: TcpStream, st: Arc<State>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while st.stalled.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
        };
        let total = st.moved.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
        let fault = *st.fault.lock().expect("lock");
        match fault {
            Fault::CutAfter(limit) if total >= limit => {
                *st.fault.lock().expect("lock") = Fault::None;
                cut_all(&st);
                return;
            }
            Fault::StallAfter(limit) if total >= limit => {
                st.stalled.store(true, Ordering::SeqCst);
            }
            _ => {}
        }
        // A stalled relay holds the chunk in hand until release().
        while st.stalled.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if to.write_all(&buf[..n]).is_err() {
            let _ = from.shutdown(Shutdown::Both);
            return;
        }
    }
}
