//! Reading private keys from disk, asking for a passphrase on the terminal when one is encrypted.
//!
//! The prompt goes to `/dev/tty`, never stdin/stdout: those may carry the user's data
//! (`vtun exec vm -- cat < file`). Without a terminal an encrypted key is skipped with a reason
//! that ends up in the "tried …" line. Key material is never logged.

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;

use russh::keys::PrivateKey;

/// The outcome of loading one key file.
pub enum Loaded {
    Key(Arc<PrivateKey>),
    /// Not usable; the reason is shown in the final "tried …" line.
    Skipped(String),
    /// The file does not exist (only worth mentioning for `-i` files).
    Missing,
}

/// Load `path`, prompting for its passphrase on the terminal if it is encrypted.
pub fn load(path: &Path) -> Loaded {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::Missing,
        Err(e) => return Loaded::Skipped(format!("unreadable: {e}")),
    };
    match russh::keys::decode_secret_key(&text, None) {
        Ok(k) => Loaded::Key(Arc::new(k)),
        Err(russh::keys::Error::KeyIsEncrypted) => decrypt(&text, path),
        Err(e) => Loaded::Skipped(format!("not a usable private key: {e}")),
    }
}

fn decrypt(text: &str, path: &Path) -> Loaded {
    let prompt = format!("Enter passphrase for key '{}': ", path.display());
    let pass = match read_passphrase(&prompt) {
        Ok(p) => p,
        Err(_) => {
            return Loaded::Skipped(
                "encrypted, and no terminal to ask for its passphrase (add it to ssh-agent)".into(),
            )
        }
    };
    match russh::keys::decode_secret_key(text, Some(&pass)) {
        Ok(k) => Loaded::Key(Arc::new(k)),
        Err(_) => Loaded::Skipped("wrong passphrase".into()),
    }
}

/// Ask on `/dev/tty` with echo off; restores the terminal before returning.
fn read_passphrase(prompt: &str) -> std::io::Result<String> {
    use std::os::fd::AsRawFd;
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")?;
    let fd = tty.as_raw_fd();
    // SAFETY: fd is an open terminal for the lifetime of `tty`; termios is plain data.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut quiet = saved;
    quiet.c_lflag &= !libc::ECHO;
    quiet.c_lflag |= libc::ECHONL;
    // SAFETY: as above.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    let mut out = &tty;
    let _ = out.write_all(prompt.as_bytes());
    let _ = out.flush();
    let mut line = String::new();
    let read = std::io::BufReader::new(&tty).read_line(&mut line);
    // SAFETY: as above; restores what tcgetattr returned.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    read?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}
