//! The key cache vtun shares with the vers CLI: `$TMPDIR/vers-ssh-keys/<vm-id>.key`, mode 0600.
//!
//! A key fetched from the API is written under a temporary name and renamed into place, so a
//! concurrent `vers` or `vtun` never reads half a key, and the file is created 0600 (never
//! widened after the fact). The directory is created 0700 if it is missing.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// `$TMPDIR/vers-ssh-keys`.
pub fn cache_dir() -> PathBuf {
    std::env::temp_dir().join("vers-ssh-keys")
}

/// The vers CLI's cached key for a VM.
pub fn cache_file(vm_id: &str) -> PathBuf {
    cache_dir().join(format!("{vm_id}.key"))
}

/// pi-v's copy of a VM's key, beside the vers CLI's (`vers-<first 12 chars of the id>.pem`).
pub fn pi_v_file(vm_id: &str) -> PathBuf {
    let short: String = vm_id.chars().take(12).collect();
    cache_dir().join(format!("vers-{short}.pem"))
}

/// Write `key` as the cached key of `vm_id`, atomically, mode 0600; returns its path.
pub fn store(vm_id: &str, key: &str) -> Result<PathBuf> {
    let dir = cache_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create the key cache {}", dir.display()))?;
    let path = cache_file(vm_id);
    write_atomic(&dir, &path, key.as_bytes())
        .with_context(|| format!("cannot write the VM's key to {}", path.display()))?;
    Ok(path)
}

fn write_atomic(dir: &Path, path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(
        ".{}.tmp{}.{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("key"),
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        if !data.ends_with(b"\n") {
            f.write_all(b"\n")?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
