//! `--route PATTERN=BACKEND`: which backend serves a TLS server name.

use anyhow::{bail, Result};

/// A server-name pattern: an exact name or `*.suffix` (which matches any name ending in
/// `.suffix`, at any depth, but not `suffix` itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Suffix(String),
}

impl Pattern {
    pub fn matches(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match self {
            Pattern::Exact(n) => name == *n,
            Pattern::Suffix(s) => {
                name.len() > s.len() + 1 && name.ends_with(s.as_str()) && {
                    let dot = name.len() - s.len() - 1;
                    name.as_bytes()[dot] == b'.'
                }
            }
        }
    }

    /// The certificate name that covers this pattern (`*.suffix` or the exact name).
    pub fn cert_name(&self) -> String {
        match self {
            Pattern::Exact(n) => n.clone(),
            Pattern::Suffix(s) => format!("*.{s}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub pattern: Pattern,
    /// `host:port` of the TCP backend.
    pub backend: String,
}

impl Route {
    pub fn parse(s: &str) -> Result<Route> {
        let Some((pat, backend)) = s.split_once('=') else {
            bail!("invalid route {s:?}: expected PATTERN=HOST:PORT");
        };
        let pat = pat.trim().to_ascii_lowercase();
        let backend = backend.trim();
        if !backend.contains(':') {
            bail!("invalid route {s:?}: backend must be HOST:PORT");
        }
        let pattern = if let Some(suffix) = pat.strip_prefix("*.") {
            if suffix.is_empty() || suffix.contains('*') {
                bail!("invalid route pattern {pat:?}");
            }
            Pattern::Suffix(suffix.to_string())
        } else {
            if pat.is_empty() || pat.contains('*') {
                bail!("invalid route pattern {pat:?}: use an exact name or *.suffix");
            }
            Pattern::Exact(pat)
        };
        Ok(Route {
            pattern,
            backend: backend.to_string(),
        })
    }
}

/// First matching route wins.
pub fn lookup<'a>(routes: &'a [Route], name: &str) -> Option<&'a Route> {
    routes.iter().find(|r| r.pattern.matches(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_wildcard_first_match_wins() {
        let routes = vec![
            Route::parse("b.vm.test=127.0.0.1:2").unwrap(),
            Route::parse("*.vm.test=127.0.0.1:1").unwrap(),
        ];
        assert_eq!(lookup(&routes, "b.vm.test").unwrap().backend, "127.0.0.1:2");
        assert_eq!(lookup(&routes, "A.vm.test").unwrap().backend, "127.0.0.1:1");
        assert_eq!(
            lookup(&routes, "x.y.vm.test").unwrap().backend,
            "127.0.0.1:1"
        );
        assert!(lookup(&routes, "vm.test").is_none());
        assert!(lookup(&routes, "evilvm.test").is_none());
        assert!(lookup(&routes, "a.vm.other").is_none());
    }

    #[test]
    fn bad_routes_rejected() {
        assert!(Route::parse("nobackend").is_err());
        assert!(Route::parse("a=noport").is_err());
        assert!(Route::parse("a*b=h:1").is_err());
        assert!(Route::parse("*.=h:1").is_err());
    }
}
