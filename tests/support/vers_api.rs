//! A stand-in for the Vers API on loopback (plain HTTP/1.1, `VERS_URL=http://127.0.0.1:PORT`),
//! speaking the documented shapes: `GET /api/v1/vm/{id}/ssh_key`, `GET /api/v1/vm/{id}/status`,
//! `PATCH /api/v1/vm/{id}/state`, JSON errors `{"success":false,"error":…}`, 401 for a wrong key.
//! Every request is recorded with its Authorization header, so tests can assert what vtun asked
//! and how often (zero times on the cached fast path).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::Power;

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub body: String,
}

impl Request {
    /// `"GET /api/v1/vm/ID/ssh_key"`.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// A VM the account has.
pub struct FakeVm {
    /// booting|running|paused|sleeping|dead
    pub state: String,
    /// What `ssh_key` hands out.
    pub private_key: String,
    /// Called when the VM is resumed (e.g. [`Power::on`]).
    pub on_resume: Option<Power>,
}

struct Shared {
    api_key: String,
    vms: HashMap<String, FakeVm>,
    requests: Vec<Request>,
    /// Answer the next requests with these statuses (a flaky API), before anything else.
    failures: Vec<u16>,
}

pub struct VersApi {
    pub port: u16,
    shared: Arc<Mutex<Shared>>,
    closing: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl VersApi {
    /// Serve on a loopback port, accepting `Bearer <api_key>`.
    pub fn start(api_key: &str) -> VersApi {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let shared = Arc::new(Mutex::new(Shared {
            api_key: api_key.to_string(),
            vms: HashMap::new(),
            requests: Vec::new(),
            failures: Vec::new(),
        }));
        let closing = Arc::new(AtomicBool::new(false));
        let (s, c) = (shared.clone(), closing.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if c.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(conn) = conn {
                    let _ = serve(conn, &s);
                }
            }
        });
        VersApi {
            port,
            shared,
            closing,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn add_vm(&self, id: &str, vm: FakeVm) {
        self.lock().vms.insert(id.to_string(), vm);
    }

    /// Answer the next requests with `codes`, in order (e.g. `[503]`: one server error).
    pub fn fail_next(&self, codes: &[u16]) {
        self.lock().failures = codes.iter().rev().copied().collect();
    }

    pub fn set_state(&self, id: &str, state: &str) {
        if let Some(vm) = self.lock().vms.get_mut(id) {
            vm.state = state.to_string();
        }
    }

    pub fn state_of(&self, id: &str) -> Option<String> {
        self.lock().vms.get(id).map(|v| v.state.clone())
    }

    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    /// The recorded requests as `"METHOD PATH"` lines.
    pub fn lines(&self) -> Vec<String> {
        self.requests().iter().map(Request::line).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for VersApi {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(conn: TcpStream, shared: &Mutex<Shared>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut authorization = None;
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            let value = value.trim().to_string();
            match name.trim().to_ascii_lowercase().as_str() {
                "authorization" => authorization = Some(value),
                "content-length" => length = value.parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    let mut body = vec![0; length.min(1 << 20)];
    reader.read_exact(&mut body)?;
    let req = Request {
        method,
        path,
        authorization,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let (code, reply) = answer(&req, shared);
    let reason = match code {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        409 => "Conflict",
        429 => "Too Many Requests",
        _ => "Error",
    };
    let mut out = conn;
    write!(
        out,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{reply}",
        reply.len()
    )?;
    out.flush()
}

fn error(code: u16, msg: &str) -> (u16, String) {
    (
        code,
        serde_json::json!({"success": false, "error": msg}).to_string(),
    )
}

fn answer(req: &Request, shared: &Mutex<Shared>) -> (u16, String) {
    let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
    s.requests.push(req.clone());
    if let Some(code) = s.failures.pop() {
        return error(code, "try again later");
    }
    if req.authorization.as_deref() != Some(&format!("Bearer {}", s.api_key)) {
        return error(401, "invalid API key");
    }
    let rest = req.path.strip_prefix("/api/v1/vm/").unwrap_or("");
    let (id, what) = rest.split_once('/').unwrap_or(("", ""));
    let Some(vm) = s.vms.get_mut(id) else {
        return error(404, "VM not found");
    };
    match (req.method.as_str(), what) {
        ("GET", "ssh_key") if vm.state == "running" => (
            200,
            serde_json::json!({"ssh_private_key": vm.private_key, "ssh_port": 22}).to_string(),
        ),
        ("GET", "ssh_key") => error(409, "VM is not running; is it sleeping?"),
        ("GET", "status") => (
            200,
            serde_json::json!({
                "vm_id": id, "owner_id": "owner-1", "created_at": "2026-01-01T00:00:00Z",
                "labels": {}, "state": vm.state,
            })
            .to_string(),
        ),
        ("PATCH", "state") if req.body.contains("\"Running\"") => {
            vm.state = "running".into();
            if let Some(p) = &vm.on_resume {
                p.on();
            }
            (200, String::new())
        }
        _ => error(404, "no such route"),
    }
}
