//! `-L`, `-R` and `-D` operands, parsed the way OpenSSH's `parse_forward` does (readconf.c), so
//! whatever works with `ssh -L` works here: fields split on `:`, a field in `[...]` taken
//! literally (IPv6 addresses), `\` escaping the next character, and a field containing `/` being a
//! Unix socket path.
//!
//! Binding follows ssh: no bind address means loopback (`localhost`); `*` or an empty one means
//! every address. For `-R` that is what the VM is asked for (`localhost`, or `` for all); its
//! sshd still binds loopback unless `GatewayPorts` allows more.

use std::fmt;

use anyhow::Result;

/// Which way a forward goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `-L`: listen here, connect from the VM.
    Local,
    /// `-R`: listen on the VM, connect from here (to a fixed target, or where a SOCKS client on
    /// the VM asks).
    Remote,
    /// `-D`: a SOCKS5 proxy here, connecting from the VM.
    Dynamic,
}

impl Kind {
    pub fn flag(self) -> &'static str {
        match self {
            Kind::Local => "-L",
            Kind::Remote => "-R",
            Kind::Dynamic => "-D",
        }
    }
}

/// Where a forward listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// `bind` as given (`None`: loopback; `Some("")` or `Some("*")`: every address).
    Tcp {
        bind: Option<String>,
        port: u16,
    },
    Unix(String),
}

/// Where a forwarded connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp { host: String, port: u16 },
    Unix(String),
}

/// One `-L`, `-R` or `-D` operand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub kind: Kind,
    pub listen: Listen,
    /// `None` for `-D` and `-R [BIND:]PORT` (the SOCKS client names the target).
    pub target: Option<Target>,
    /// The operand as typed, for messages.
    pub text: String,
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.flag(), self.text)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Target::Tcp { host, port } => write!(f, "{host}:{port}"),
            Target::Unix(path) => f.write_str(path),
        }
    }
}

/// One `:`-separated field and whether it looks like a path.
struct Field {
    text: String,
    path: bool,
}

/// Split like OpenSSH's `parse_fwd_field`; `None` when the brackets are malformed.
fn fields(s: &str) -> Option<Vec<Field>> {
    let mut out = Vec::new();
    let mut rest = s.chars().peekable();
    while rest.peek().is_some() {
        let mut text = String::new();
        let mut path = false;
        if rest.peek() == Some(&'[') {
            rest.next();
            loop {
                match rest.next()? {
                    ']' => break,
                    c => {
                        path |= c == '/';
                        text.push(c);
                    }
                }
            }
            match rest.next() {
                None | Some(':') => {}
                Some(_) => return None,
            }
        } else {
            while let Some(c) = rest.next() {
                match c {
                    '\\' => text.push(rest.next()?),
                    ':' => break,
                    c => {
                        path |= c == '/';
                        text.push(c);
                    }
                }
            }
        }
        out.push(Field { text, path });
        if out.len() > 4 {
            return None;
        }
    }
    Some(out)
}

/// A port as OpenSSH's `a2port` reads it: decimal, 0–65535.
fn port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl Spec {
    pub fn parse(kind: Kind, text: &str) -> Result<Spec> {
        let usage = || -> anyhow::Error {
            let form = match kind {
                Kind::Local => {
                    "[BIND:]PORT:HOST:HOSTPORT, [BIND:]PORT:REMOTE_SOCKET, \
                                LOCAL_SOCKET:HOST:HOSTPORT or LOCAL_SOCKET:REMOTE_SOCKET"
                }
                Kind::Remote => {
                    "[BIND:]PORT:HOST:HOSTPORT, [BIND:]PORT:LOCAL_SOCKET, \
                                 REMOTE_SOCKET:HOST:HOSTPORT, REMOTE_SOCKET:LOCAL_SOCKET or [BIND:]PORT"
                }
                Kind::Dynamic => "[BIND:]PORT",
            };
            anyhow::anyhow!("bad {} {text:?}: expected {form}", kind.flag())
        };
        let f = fields(text.trim_start()).ok_or_else(usage)?;
        let tcp = |bind: Option<&Field>, p: &Field| -> Result<Listen> {
            Ok(Listen::Tcp {
                bind: bind.map(|b| b.text.clone()),
                port: port(&p.text).ok_or_else(usage)?,
            })
        };
        let to_tcp = |h: &Field, p: &Field| -> Result<Target> {
            match port(&p.text) {
                Some(port) if port > 0 && !h.text.is_empty() => Ok(Target::Tcp {
                    host: h.text.clone(),
                    port,
                }),
                _ => Err(usage()),
            }
        };
        let path = |f: &Field| f.text.clone();
        let (listen, target) = match (kind, f.as_slice()) {
            (Kind::Dynamic, [p]) if !p.path => (tcp(None, p)?, None),
            (Kind::Dynamic, [b, p]) if !p.path && !b.path => (tcp(Some(b), p)?, None),
            (Kind::Dynamic, _) => return Err(usage()),
            (_, [a, b]) if a.path && b.path => (Listen::Unix(path(a)), Some(Target::Unix(path(b)))),
            (_, [p, s]) if s.path => (tcp(None, p)?, Some(Target::Unix(path(s)))),
            (_, [s, h, p]) if s.path => (Listen::Unix(path(s)), Some(to_tcp(h, p)?)),
            (_, [b, p, s]) if s.path => (tcp(Some(b), p)?, Some(Target::Unix(path(s)))),
            // A SOCKS proxy on the VM whose connections start here (OpenSSH 7.6's -R PORT).
            (Kind::Remote, [p]) if !p.path => (tcp(None, p)?, None),
            (Kind::Remote, [b, p]) if !p.path && !b.path => (tcp(Some(b), p)?, None),
            (_, [p, h, hp]) => (tcp(None, p)?, Some(to_tcp(h, hp)?)),
            (_, [b, p, h, hp]) => (tcp(Some(b), p)?, Some(to_tcp(h, hp)?)),
            _ => return Err(usage()),
        };
        Ok(Spec {
            kind,
            listen,
            target,
            text: text.to_string(),
        })
    }
}

/// The address a local listener binds for `bind` (ssh's rules; see the module docs).
pub fn local_bind(bind: Option<&str>) -> &str {
    match bind {
        None | Some("localhost") => "127.0.0.1",
        Some("" | "*") => "0.0.0.0",
        Some(b) => b,
    }
}

/// The address to ask the VM to listen on for `bind` (what OpenSSH's ssh sends).
pub fn remote_bind(bind: Option<&str>) -> &str {
    match bind {
        None => "localhost",
        Some("" | "*") => "",
        Some(b) => b,
    }
}

// Tests only: unwrap on values the test itself built, where a failure is the test failing.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tcp_listen(bind: Option<&str>, port: u16) -> Listen {
        Listen::Tcp {
            bind: bind.map(String::from),
            port,
        }
    }

    fn tcp_target(host: &str, port: u16) -> Option<Target> {
        Some(Target::Tcp {
            host: host.into(),
            port,
        })
    }

    fn parse(kind: Kind, s: &str) -> (Listen, Option<Target>) {
        let spec = Spec::parse(kind, s).unwrap();
        (spec.listen, spec.target)
    }

    #[test]
    fn tcp_forms_as_ssh_reads_them() {
        assert_eq!(
            parse(Kind::Local, "8080:localhost:80"),
            (tcp_listen(None, 8080), tcp_target("localhost", 80))
        );
        assert_eq!(
            parse(Kind::Local, "0.0.0.0:8080:db:5432"),
            (tcp_listen(Some("0.0.0.0"), 8080), tcp_target("db", 5432))
        );
        assert_eq!(
            parse(Kind::Remote, "*:0:127.0.0.1:3000"),
            (tcp_listen(Some("*"), 0), tcp_target("127.0.0.1", 3000))
        );
        assert_eq!(
            parse(Kind::Local, ":8080:h:1"),
            (tcp_listen(Some(""), 8080), tcp_target("h", 1))
        );
        assert_eq!(
            parse(Kind::Local, "[::1]:8080:[fe80::1]:80"),
            (tcp_listen(Some("::1"), 8080), tcp_target("fe80::1", 80))
        );
        assert_eq!(parse(Kind::Dynamic, "1080"), (tcp_listen(None, 1080), None));
        assert_eq!(parse(Kind::Remote, "1080"), (tcp_listen(None, 1080), None));
        assert_eq!(
            parse(Kind::Remote, "*:1080"),
            (tcp_listen(Some("*"), 1080), None)
        );
        assert_eq!(
            parse(Kind::Dynamic, "[::]:1080"),
            (tcp_listen(Some("::"), 1080), None)
        );
    }

    #[test]
    fn unix_socket_forms() {
        assert_eq!(
            parse(Kind::Local, "/tmp/db.sock:/run/postgresql/.s.PGSQL.5432"),
            (
                Listen::Unix("/tmp/db.sock".into()),
                Some(Target::Unix("/run/postgresql/.s.PGSQL.5432".into()))
            )
        );
        assert_eq!(
            parse(Kind::Local, "5432:/run/pg.sock"),
            (
                tcp_listen(None, 5432),
                Some(Target::Unix("/run/pg.sock".into()))
            )
        );
        assert_eq!(
            parse(Kind::Remote, "/tmp/r.sock:localhost:3000"),
            (
                Listen::Unix("/tmp/r.sock".into()),
                tcp_target("localhost", 3000)
            )
        );
        assert_eq!(
            parse(Kind::Remote, "0.0.0.0:9000:/tmp/app.sock"),
            (
                tcp_listen(Some("0.0.0.0"), 9000),
                Some(Target::Unix("/tmp/app.sock".into()))
            )
        );
        assert_eq!(
            parse(Kind::Local, "[/tmp/a:b.sock]:/x/y"),
            (
                Listen::Unix("/tmp/a:b.sock".into()),
                Some(Target::Unix("/x/y".into()))
            )
        );
        assert_eq!(
            parse(Kind::Local, "./a\\:b:/x"),
            (
                Listen::Unix("./a:b".into()),
                Some(Target::Unix("/x".into()))
            )
        );
    }

    #[test]
    fn bad_operands_are_refused_with_the_forms() {
        for (kind, s) in [
            (Kind::Local, "8080"),
            (Kind::Local, "8080:host"),
            (Kind::Local, "8080:host:0"),
            (Kind::Local, "70000:h:1"),
            (Kind::Local, "x:h:1"),
            (Kind::Local, "8080::80"),
            (Kind::Local, "a:b:c:d:e"),
            (Kind::Local, "[::1:8080:h:1"),
            (Kind::Local, "[::1]x:8080:h:1"),
            (Kind::Local, "-1:h:1"),
            (Kind::Local, "+1:h:1"),
            (Kind::Dynamic, "/tmp/s"),
            (Kind::Dynamic, "a:b:c"),
            (Kind::Dynamic, ""),
        ] {
            let e = Spec::parse(kind, s).unwrap_err().to_string();
            assert!(e.contains("expected"), "{s}: {e}");
        }
        let e = Spec::parse(Kind::Remote, "/tmp/s").unwrap_err().to_string();
        assert!(e.contains("expected"), "{e}");
    }

    #[test]
    fn bind_defaults_follow_ssh() {
        assert_eq!(local_bind(None), "127.0.0.1");
        assert_eq!(local_bind(Some("localhost")), "127.0.0.1");
        assert_eq!(local_bind(Some("*")), "0.0.0.0");
        assert_eq!(local_bind(Some("")), "0.0.0.0");
        assert_eq!(local_bind(Some("::1")), "::1");
        assert_eq!(remote_bind(None), "localhost");
        assert_eq!(remote_bind(Some("*")), "");
        assert_eq!(remote_bind(Some("127.0.0.1")), "127.0.0.1");
    }

    #[test]
    fn targets_print_as_typed() {
        assert_eq!(tcp_target("::1", 80).unwrap().to_string(), "[::1]:80");
        assert_eq!(tcp_target("db", 5432).unwrap().to_string(), "db:5432");
        let s = Spec::parse(Kind::Local, "8080:db:5432").unwrap();
        assert_eq!(s.to_string(), "-L 8080:db:5432");
    }
}
