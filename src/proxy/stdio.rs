//! stdin and stdout of `vtun proxy`, served on the TLS task when they are pipes or sockets.
//!
//! ssh hands its ProxyCommand two pipes. Those are made non-blocking and driven by the reactor,
//! so each chunk moves between the descriptor and the TLS buffers on the one task: no thread
//! hand-off and no extra copy. Terminals and files keep blocking I/O on a thread each: epoll
//! refuses regular files, and a terminal's file description is shared with the shell, which
//! would get EAGAIN from its own reads if O_NONBLOCK were left on it.
//!
//! O_NONBLOCK is a flag of the open file description, not of our descriptor, so it is visible to
//! every process holding that description (the parent ssh, a wrapping shell). The flags both
//! descriptors had before the proxy touched either are put back when they are dropped.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;

/// Size of the buffer stdin is read into, on the task or on the thread (a pipe holds 64 KiB by
/// default; a socket may give more).
pub const READ_BUF: usize = 256 * 1024;

/// What a pipe on stdout grows to the first time it is found full (the default for
/// /proc/sys/fs/pipe-max-size, the most an unprivileged process may ask for).
const PIPE_SIZE: libc::c_int = 1 << 20;

/// A pipe's capacity unless grown (16 pages).
const DEFAULT_PIPE: usize = 64 * 1024;

/// stdin and stdout, set up together: if both are the same socket (one open file description),
/// the flags saved for each are the ones from before either was changed.
pub fn open() -> (Stdin, Stdout) {
    let in_flags = file_flags(libc::STDIN_FILENO);
    let out_flags = file_flags(libc::STDOUT_FILENO);
    let stdin =
        match in_flags.and_then(|f| NonBlocking::new(libc::STDIN_FILENO, f, Interest::READABLE)) {
            Some(fd) => Stdin::Direct(fd),
            None => {
                let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
                std::thread::spawn(move || stdin_reader(tx));
                Stdin::Thread(rx)
            }
        };
    let stdout = match out_flags
        .and_then(|f| NonBlocking::new(libc::STDOUT_FILENO, f, Interest::WRITABLE))
    {
        Some(fd) => Stdout::Direct(fd),
        None => {
            let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
            let writer = std::thread::spawn(move || stdout_writer(rx));
            Stdout::Thread { tx, writer }
        }
    };
    (stdin, stdout)
}

pub enum Stdin {
    Direct(NonBlocking),
    Thread(mpsc::Receiver<Vec<u8>>),
}

impl Stdin {
    /// Read into `buf`; 0 at end of input.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stdin::Direct(fd) => std::future::poll_fn(|cx| fd.poll_read(cx, buf)).await,
            Stdin::Thread(rx) => match rx.recv().await {
                Some(chunk) => {
                    // The thread reads at most READ_BUF bytes, the size callers pass.
                    let n = chunk.len().min(buf.len());
                    buf[..n].copy_from_slice(&chunk[..n]);
                    Ok(n)
                }
                None => Ok(0),
            },
        }
    }
}

pub enum Stdout {
    /// Written on the task, straight from the caller's buffer.
    Direct(NonBlocking),
    /// Written by a thread, fed with owned copies.
    Thread {
        tx: mpsc::Sender<Vec<u8>>,
        writer: std::thread::JoinHandle<()>,
    },
}

impl Stdout {
    /// Wait until everything handed over so far is written (or stdout failed), then release it.
    pub async fn finish(self) {
        if let Stdout::Thread { tx, writer } = self {
            drop(tx);
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
    }
}

/// One standard descriptor, non-blocking and registered with the reactor; restores the file
/// flags it found when dropped.
pub struct NonBlocking {
    fd: AsyncFd<StdFd>,
    saved_flags: libc::c_int,
    /// A pipe not grown yet (see [`grow_pipe`]).
    grow_when_full: bool,
}

struct StdFd(RawFd);

impl AsRawFd for StdFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl NonBlocking {
    /// `fd` made non-blocking and registered, if it is a pipe or a socket.
    fn new(fd: RawFd, saved_flags: libc::c_int, interest: Interest) -> Option<NonBlocking> {
        // SAFETY: fstat on a descriptor number with a valid out-pointer; no memory is shared.
        let kind = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &mut st) != 0 {
                return None;
            }
            st.st_mode & libc::S_IFMT
        };
        if kind != libc::S_IFIFO && kind != libc::S_IFSOCK {
            return None;
        }
        let grow_when_full = kind == libc::S_IFIFO;
        set_file_flags(fd, saved_flags | libc::O_NONBLOCK).ok()?;
        // SAFETY: fds 0 and 1 stay open, on the same file description, for the life of the
        // process, and StdFd always returns the number it was made with.
        match unsafe { AsyncFd::register_with_interest(StdFd(fd), interest) } {
            Ok(fd) => Some(NonBlocking {
                fd,
                saved_flags,
                grow_when_full,
            }),
            Err(e) => {
                tracing::debug!(fd, "cannot register with the reactor: {e}");
                let _ = set_file_flags(fd, saved_flags);
                None
            }
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let fd = self.fd.as_raw_fd();
            // SAFETY: reading into a valid, exclusively borrowed buffer of buf.len() bytes.
            match guard
                .try_io(|_| cvt(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) }))
            {
                Ok(Ok(n)) => {
                    // A short read emptied the pipe: wait for epoll to report more (edge-
                    // triggered, so nothing is missed), as tokio's TcpStream does. Reading again
                    // at once instead often finds data (ssh writes the next chunk while this one
                    // is encrypted) and saves syscalls, but measured no faster on uploads.
                    if n > 0 && n < buf.len() {
                        guard.clear_ready();
                    }
                    // A default-sized pipe read full: the writer is waiting on us.
                    if n >= DEFAULT_PIPE && std::mem::take(&mut self.grow_when_full) {
                        grow_pipe(fd);
                    }
                    return Poll::Ready(Ok(n));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    /// Write some of `data` (not empty); the count written.
    pub fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let fd = self.fd.as_raw_fd();
            // SAFETY: writing from a valid buffer of data.len() bytes.
            match guard
                .try_io(|_| cvt(unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) }))
            {
                Ok(Ok(n)) => {
                    // A short write filled the pipe: wait for the epoll edge that says ssh made
                    // room, rather than making a write that can only say EAGAIN.
                    if n < data.len() {
                        guard.clear_ready();
                        if std::mem::take(&mut self.grow_when_full) {
                            grow_pipe(fd);
                        }
                    }
                    return Poll::Ready(Ok(n));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {
                    if std::mem::take(&mut self.grow_when_full) {
                        grow_pipe(fd);
                    }
                    continue;
                }
            }
        }
    }
}

impl Drop for NonBlocking {
    fn drop(&mut self) {
        let _ = set_file_flags(self.fd.as_raw_fd(), self.saved_flags);
    }
}

/// Raise a full pipe's capacity to PIPE_SIZE. Bulk downloads write one TLS record (at most
/// 16 KiB) per write(), and with the default 64 KiB pipe both we and the ssh client keep waking
/// to wait for each other; on uploads ssh fills stdin's pipe and waits for each 64 KiB read.
/// Measured with the proxy_throughput bench against the same build without it: downloads 16 %
/// less proxy CPU and 12 % more throughput; uploads (stdin) 12 % less CPU, 8 % more throughput. Only pipes
/// found full are grown, because the capacity counts against the user's pipe-user-pages-soft
/// budget that all their pipes share; an interactive session never fills its pipe. Failure is
/// harmless: the pipe keeps its size.
fn grow_pipe(fd: RawFd) {
    // SAFETY: F_GETPIPE_SZ and F_SETPIPE_SZ on a pipe descriptor; no memory is involved.
    let result = unsafe {
        if libc::fcntl(fd, libc::F_GETPIPE_SZ) >= PIPE_SIZE {
            return;
        }
        libc::fcntl(fd, libc::F_SETPIPE_SZ, PIPE_SIZE)
    };
    if result < 0 {
        tracing::debug!(fd, "cannot grow the pipe: {}", io::Error::last_os_error());
    }
}

fn cvt(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn file_flags(fd: RawFd) -> Option<libc::c_int> {
    // SAFETY: F_GETFL reads the flags of a descriptor number; no memory is involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    (flags >= 0).then_some(flags)
}

fn set_file_flags(fd: RawFd, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: F_SETFL on a descriptor number; no memory is involved.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn stdin_reader(tx: mpsc::Sender<Vec<u8>>) {
    let mut stdin = io::stdin().lock();
    let mut buf = vec![0u8; READ_BUF];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if tx.blocking_send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!("stdin read failed: {e}");
                return;
            }
        }
    }
}

fn stdout_writer(mut rx: mpsc::Receiver<Vec<u8>>) {
    // Raw fd 1, unbuffered: std's stdout is line-buffered and would scan every chunk for '\n'.
    // ManuallyDrop: the descriptor belongs to the process, not to this File.
    use std::os::fd::FromRawFd;
    // SAFETY: fd 1 is open for the life of the process and nothing else closes it.
    let mut stdout = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(1) });
    while let Some(chunk) = rx.blocking_recv() {
        // Each chunk is written as it arrives: interactive sessions need each byte promptly.
        if let Err(e) = stdout.write_all(&chunk) {
            tracing::debug!("stdout write failed: {e}");
            return;
        }
    }
}
