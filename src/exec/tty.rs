//! The local terminal: raw mode for interactive sessions, and its size.
//!
//! Raw mode must be undone on every way out, or the user's shell is left unusable: the guard
//! restores on drop (normal return and errors), and a panic hook restores before the panic
//! message is printed (a panic with `panic = "abort"` would skip drops).

use std::sync::Mutex;

/// The settings to put back, shared with the panic hook.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

pub fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// Columns and rows of the terminal on stdout (or stdin), if there is one.
pub fn size() -> Option<(u32, u32)> {
    for fd in [libc::STDOUT_FILENO, libc::STDIN_FILENO, libc::STDERR_FILENO] {
        // SAFETY: winsize is plain data; TIOCGWINSZ writes one into it.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_col > 0 {
            return Some((u32::from(ws.ws_col), u32::from(ws.ws_row)));
        }
    }
    None
}

/// While alive, stdin is in raw mode (no echo, no line editing, no signals from keys).
pub struct RawMode(());

impl RawMode {
    pub fn enable() -> std::io::Result<RawMode> {
        let fd = libc::STDIN_FILENO;
        // SAFETY: termios is plain data filled by tcgetattr on our own stdin.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if let Ok(mut saved) = SAVED.lock() {
            *saved = Some(t);
        }
        install_panic_hook();
        let mut raw = t;
        // SAFETY: cfmakeraw edits the struct in place.
        unsafe { libc::cfmakeraw(&mut raw) };
        if unsafe { libc::tcsetattr(fd, libc::TCSADRAIN, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RawMode(()))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

/// Put the saved settings back (idempotent).
fn restore() {
    let saved = match SAVED.lock() {
        Ok(mut s) => s.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    };
    if let Some(t) = saved {
        // SAFETY: restores settings tcgetattr returned for the same descriptor.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSADRAIN, &t) };
    }
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}
