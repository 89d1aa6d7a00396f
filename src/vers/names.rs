//! The vers CLI's names for VMs: aliases from `~/.vers/aliases.json` and `HEAD` from
//! `./.vers/HEAD`, turned into VM ids before anything else looks at an operand.
//!
//! Resolution is exact and one level deep, as the vers CLI's: a name that is an alias becomes its
//! id, `HEAD` becomes what `./.vers/HEAD` holds (itself an alias or an id), and anything else
//! passes through unchanged. HEAD is looked up in the current directory only, never above it.
//! The aliases file is read once per process, and only when an operand needs it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

/// The name that means "the VM in ./.vers/HEAD".
pub const HEAD: &str = "HEAD";

/// `~/.vers/aliases.json`, if there is a home directory.
pub fn aliases_file() -> Option<PathBuf> {
    dirs::home_dir().map(|h| h.join(".vers").join("aliases.json"))
}

/// Every alias the vers CLI knows (alias → VM id); empty when the file does not exist.
pub fn load_aliases() -> Result<BTreeMap<String, String>> {
    match aliases_file() {
        Some(path) => read_aliases(&path),
        None => Ok(BTreeMap::new()),
    }
}

/// Read an aliases file: a flat JSON object of strings. A missing file is an empty map.
pub fn read_aliases(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    serde_json::from_str(&text).with_context(|| {
        format!(
            "cannot read {}: not a JSON object of alias → VM id",
            path.display()
        )
    })
}

/// Where names come from: the aliases file (read lazily, once) and the HEAD file.
#[derive(Debug)]
pub struct Names {
    aliases_file: Option<PathBuf>,
    head_file: PathBuf,
    aliases: OnceLock<Result<BTreeMap<String, String>, String>>,
}

impl Names {
    /// The vers CLI's files: `~/.vers/aliases.json` and `./.vers/HEAD`.
    pub fn from_env() -> Names {
        Names::at(aliases_file(), PathBuf::from(".vers").join("HEAD"))
    }

    /// Names from these files (tests).
    pub fn at(aliases_file: Option<PathBuf>, head_file: PathBuf) -> Names {
        Names {
            aliases_file,
            head_file,
            aliases: OnceLock::new(),
        }
    }

    fn aliases(&self) -> Result<&BTreeMap<String, String>> {
        let loaded = self.aliases.get_or_init(|| match &self.aliases_file {
            Some(p) => read_aliases(p).map_err(|e| format!("{e:#}")),
            None => Ok(BTreeMap::new()),
        });
        loaded.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The VM id (or full name) `name` stands for: an alias's id, HEAD's VM, or `name` itself.
    pub fn resolve(&self, name: &str) -> Result<String> {
        let name = if name == HEAD {
            self.head()?
        } else {
            name.to_string()
        };
        Ok(match self.aliases()?.get(&name) {
            Some(id) => id.trim().to_string(),
            None => name,
        })
    }

    /// What `./.vers/HEAD` holds, trimmed.
    fn head(&self) -> Result<String> {
        let shown = self.head_file.display();
        let text = match std::fs::read_to_string(&self.head_file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "HEAD: no {shown} in this directory (name a VM, or run vtun in the \
                 directory where the vers CLI keeps .vers/HEAD)"
            ),
            Err(e) => bail!("cannot read {shown}: {e}"),
        };
        let head = text.trim();
        if head.is_empty() {
            bail!("{shown} is empty: name a VM instead");
        }
        Ok(head.to_string())
    }
}

// Tests only: unwrap on temp files the test itself wrote.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn names(dir: &Path, aliases: &str, head: Option<&str>) -> Names {
        let a = dir.join("aliases.json");
        std::fs::write(&a, aliases).unwrap();
        let h = dir.join("HEAD");
        if let Some(head) = head {
            std::fs::write(&h, head).unwrap();
        }
        Names::at(Some(a), h)
    }

    #[test]
    fn aliases_resolve_exactly_and_others_pass_through() {
        let dir = tempfile::tempdir().unwrap();
        let n = names(dir.path(), r#"{"golden": "1234-abcd", "w": "5678"}"#, None);
        assert_eq!(n.resolve("golden").unwrap(), "1234-abcd");
        assert_eq!(n.resolve("Golden").unwrap(), "Golden");
        assert_eq!(n.resolve("gold").unwrap(), "gold");
        assert_eq!(n.resolve("9999").unwrap(), "9999");
    }

    #[test]
    fn head_is_trimmed_and_may_be_an_alias() {
        let dir = tempfile::tempdir().unwrap();
        let n = names(dir.path(), r#"{"golden": "1234"}"#, Some("  golden\n"));
        assert_eq!(n.resolve("HEAD").unwrap(), "1234");
        let n = names(dir.path(), "{}", Some("abcd-ef\n"));
        assert_eq!(n.resolve("HEAD").unwrap(), "abcd-ef");
    }

    #[test]
    fn missing_or_empty_head_and_bad_aliases_are_one_clear_line() {
        let dir = tempfile::tempdir().unwrap();
        let n = names(dir.path(), "{}", None);
        let e = format!("{:#}", n.resolve("HEAD").unwrap_err());
        assert!(e.contains("HEAD") && !e.contains('\n'), "{e}");
        let n = names(dir.path(), "{}", Some(" \n"));
        assert!(format!("{:#}", n.resolve("HEAD").unwrap_err()).contains("empty"));
        let n = names(dir.path(), "[1,2]", None);
        let e = format!("{:#}", n.resolve("x").unwrap_err());
        assert!(e.contains("aliases.json"), "{e}");
        // No file at all: nothing is an alias.
        let n = Names::at(Some(dir.path().join("none.json")), dir.path().join("H"));
        assert_eq!(n.resolve("x").unwrap(), "x");
    }
}
