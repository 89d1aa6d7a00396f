//! Operands as typed values: `[user@]NAME[:PORT]` hosts and scp-style `VM:PATH` locations.
//!
//! The one non-obvious rule is scp's: an operand is remote only if it has a `:` with no `/`
//! before it, so `./a:b` and `/tmp/x:y` stay local paths. NAME is resolved (an alias or `HEAD`,
//! see [`crate::vers::names`]) before the domain is appended, so SNI and the host-key pin always
//! use the VM's real `<id>.<domain>`: an alias moved to another VM never reuses the old pin.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::vers::names::Names;

/// The domain used when nothing else is configured.
pub const DEFAULT_DOMAIN: &str = "vm.vers.sh";

/// Resolve the VM domain: `--domain`/`VTUN_DOMAIN`, else `VERS_URL=https://api.X` → `vm.X`.
pub fn resolve_domain(flag: Option<&str>, vers_url: Option<&str>) -> String {
    if let Some(d) = flag.filter(|d| !d.is_empty()) {
        return d.trim_matches('.').to_string();
    }
    if let Some(url) = vers_url {
        let rest = url
            .trim()
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let host = rest.split(['/', ':']).next().unwrap_or("");
        if let Some(base) = host.strip_prefix("api.") {
            if !base.is_empty() {
                return format!("vm.{base}");
            }
        }
    }
    DEFAULT_DOMAIN.to_string()
}

/// A host to reach through the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Login name, if given as `user@`.
    pub user: Option<String>,
    /// Fully qualified name: used for SNI, certificate checks and host-key pinning.
    pub name: String,
    /// Explicit port from `NAME:PORT`; otherwise the caller's `--port`.
    pub port: Option<u16>,
    /// The name as typed when it was an alias or `HEAD` (for messages).
    pub label: Option<String>,
}

impl Host {
    /// Parse `[user@]NAME[:PORT]`; a NAME without a dot gets `.<domain>` appended. No aliases.
    pub fn parse(s: &str, domain: &str) -> Result<Host> {
        Host::parse_with(s, domain, None)
    }

    /// [`Host::parse`], with NAME first resolved through `names` (aliases, `HEAD`).
    pub fn resolve(s: &str, domain: &str, names: &Names) -> Result<Host> {
        Host::parse_with(s, domain, Some(names))
    }

    fn parse_with(s: &str, domain: &str, names: Option<&Names>) -> Result<Host> {
        let (user, rest) = match s.rsplit_once('@') {
            Some((u, r)) if !u.is_empty() => (Some(u.to_string()), r),
            Some(_) => bail!("invalid host {s:?}: empty user name before '@'"),
            None => (None, s),
        };
        let (name, port) = match rest.rsplit_once(':') {
            Some((n, p)) => {
                let port: u16 = p
                    .parse()
                    .map_err(|_| anyhow::anyhow!("invalid port {p:?} in {s:?}"))?;
                (n, Some(port))
            }
            None => (rest, None),
        };
        let name = name.trim_end_matches('.');
        if name.is_empty() {
            bail!("invalid host {s:?}: empty name");
        }
        let (name, label) = match names {
            Some(names) => {
                let id = names.resolve(name)?;
                let label = (id != name).then(|| name.to_string());
                (id, label)
            }
            None => (name.to_string(), None),
        };
        let name = name.as_str();
        if name
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_'))
        {
            bail!("invalid host {s:?}: a name has only letters, digits, '-', '_' and '.'");
        }
        let name = if name.contains('.') {
            name.to_ascii_lowercase()
        } else {
            format!("{}.{}", name.to_ascii_lowercase(), domain)
        };
        Ok(Host {
            user,
            name,
            port,
            label,
        })
    }

    /// The first label of the name: the VM id for `<id>.vm.vers.sh`.
    pub fn vm_id(&self) -> &str {
        self.name.split('.').next().unwrap_or(&self.name)
    }

    /// The name the user gave: the alias or `HEAD` if that is what was typed, else the VM id.
    pub fn shown(&self) -> &str {
        self.label.as_deref().unwrap_or_else(|| self.vm_id())
    }
}

/// One `cp`/`sync` operand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Local(PathBuf),
    Remote { host: Host, path: String },
}

impl Location {
    /// Parse with scp's rules: remote when a `:` comes before any `/`. No aliases.
    pub fn parse(s: &str, domain: &str) -> Result<Location> {
        Location::parse_with(s, domain, None)
    }

    /// [`Location::parse`], with the VM name resolved through `names` (aliases, `HEAD`).
    pub fn resolve(s: &str, domain: &str, names: &Names) -> Result<Location> {
        Location::parse_with(s, domain, Some(names))
    }

    fn parse_with(s: &str, domain: &str, names: Option<&Names>) -> Result<Location> {
        if s.is_empty() {
            bail!("empty path");
        }
        match s.find(':') {
            Some(colon) if !s[..colon].contains('/') && colon > 0 => {
                let host = Host::parse_with(&s[..colon], domain, names)?;
                let path = s[colon + 1..].to_string();
                Ok(Location::Remote { host, path })
            }
            _ => Ok(Location::Local(PathBuf::from(s))),
        }
    }

    pub fn is_remote(&self) -> bool {
        matches!(self, Location::Remote { .. })
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::Remote { host, path } => write!(f, "{}:{}", host.name, path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_id_gets_domain() {
        let h = Host::parse("abc-123", "vm.vers.sh").unwrap();
        assert_eq!(h.name, "abc-123.vm.vers.sh");
        assert_eq!(h.user, None);
        assert_eq!(h.vm_id(), "abc-123");
    }

    #[test]
    fn dotted_name_used_as_is_with_user_and_port() {
        let h = Host::parse("me@a.vm.test:8443", "vm.vers.sh").unwrap();
        assert_eq!(h.name, "a.vm.test");
        assert_eq!(h.user.as_deref(), Some("me"));
        assert_eq!(h.port, Some(8443));
    }

    #[test]
    fn bad_hosts_rejected() {
        assert!(Host::parse("", "d").is_err());
        assert!(Host::parse("@x", "d").is_err());
        assert!(Host::parse("a:notaport", "d").is_err());
        assert!(Host::parse("a b", "d").is_err());
    }

    #[test]
    fn scp_rules_for_locations() {
        let d = "vm.test";
        assert_eq!(
            Location::parse("a:/srv/x", d).unwrap(),
            Location::Remote {
                host: Host::parse("a", d).unwrap(),
                path: "/srv/x".into()
            }
        );
        assert!(!Location::parse("./a:b", d).unwrap().is_remote());
        assert!(!Location::parse("/tmp/x:y", d).unwrap().is_remote());
        assert!(!Location::parse("plain", d).unwrap().is_remote());
        match Location::parse("root@vm1:", d).unwrap() {
            Location::Remote { host, path } => {
                assert_eq!(host.user.as_deref(), Some("root"));
                assert_eq!(path, "");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn aliases_and_head_resolve_before_the_domain() {
        let dir = tempfile::tempdir().unwrap();
        let aliases = dir.path().join("aliases.json");
        std::fs::write(&aliases, r#"{"golden": "0a1b-c2"}"#).unwrap();
        let head = dir.path().join("HEAD");
        std::fs::write(&head, "golden\n").unwrap();
        let names = Names::at(Some(aliases), head);
        let h = Host::resolve("me@golden", "vm.test", &names).unwrap();
        assert_eq!(h.name, "0a1b-c2.vm.test");
        assert_eq!(h.user.as_deref(), Some("me"));
        assert_eq!(h.shown(), "golden");
        assert_eq!(
            Host::resolve("HEAD", "d", &names).unwrap().name,
            "0a1b-c2.d"
        );
        let other = Host::resolve("0a1b-c3", "d", &names).unwrap();
        assert_eq!(
            (other.name.as_str(), other.shown()),
            ("0a1b-c3.d", "0a1b-c3")
        );
        match Location::resolve("golden:/srv", "d", &names).unwrap() {
            Location::Remote { host, path } => {
                assert_eq!((host.name.as_str(), path.as_str()), ("0a1b-c2.d", "/srv"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn domain_from_vers_url() {
        assert_eq!(resolve_domain(None, None), "vm.vers.sh");
        assert_eq!(
            resolve_domain(None, Some("https://api.example.dev/")),
            "vm.example.dev"
        );
        assert_eq!(
            resolve_domain(Some("x.test"), Some("https://api.a")),
            "x.test"
        );
        assert_eq!(
            resolve_domain(None, Some("https://other.host")),
            "vm.vers.sh"
        );
    }
}
