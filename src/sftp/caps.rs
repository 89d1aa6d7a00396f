//! How much a server may make us do. Every number here bounds something a hostile or broken
//! SFTP server controls: how long a listing runs, how much of it we hold, how deep a walk goes
//! and how many round trips one read may cost. Each is far beyond any real tree or server, so
//! reaching one means the server is not behaving, and the command stops with one line saying so.

/// Bytes in one reply: the largest READ we send (256 KiB) plus room for its header. OpenSSH's
/// own limit for every message is 256 KiB; a listing reply of 100 long names is ~60 KiB.
pub const PACKET: usize = 256 * 1024 + 16 * 1024;
/// Entries in one directory (a `READDIR` that never says end-of-file stops here).
pub const DIR_ENTRIES: usize = 1 << 20;
/// Entries in one walk of a tree (memory: every entry of a walk is held at once).
pub const WALK_ENTRIES: usize = 4 << 20;
/// Directory levels below the root of a walk (a directory that always holds another one).
pub const DEPTH: usize = 1024;
/// Bytes in one name (`NAME_MAX` on Linux: a longer name cannot be created locally anyway).
pub const NAME_LEN: usize = 255;
/// `READDIR` replies without a single entry, per directory (a server may stall the walk with
/// empty replies that never reach [`DIR_ENTRIES`]).
pub const EMPTY_REPLIES: usize = 16;
/// A read that comes back short is asked again for the rest (legal, and what a server with a
/// smaller limit does), but a request may take at most `1 + max(4, len / SHORT_READ_UNIT)`
/// replies: a server answering a few bytes at a time would otherwise cost a round trip each
/// (262,144 of them for one 256 KiB request at one byte per reply).
pub const SHORT_READ_UNIT: u32 = 4096;

/// Follow-up reads allowed for one request of `len` bytes.
pub fn follow_ups(len: u32) -> u32 {
    (len / SHORT_READ_UNIT).max(4)
}
