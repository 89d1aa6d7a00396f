//! File times as seconds and nanoseconds, never one nanosecond count: `i64` nanoseconds end in
//! 2262, and a file touched to 2300 must come back as 2300, not 1901.

use std::os::unix::fs::MetadataExt;

/// A file time: whole seconds since the epoch (negative before 1970) and nanoseconds within the
/// second. Ordered by time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct FileTime {
    secs: i64,
    nsec: u32,
}

impl FileTime {
    pub const NANOS: u32 = 1_000_000_000;

    /// `nsec` past a second carries into `secs` (so every value has one form).
    pub const fn new(secs: i64, nsec: u32) -> FileTime {
        FileTime {
            secs: secs.saturating_add((nsec / Self::NANOS) as i64),
            nsec: nsec % Self::NANOS,
        }
    }

    pub const fn from_secs(secs: i64) -> FileTime {
        FileTime { secs, nsec: 0 }
    }

    /// The modification time of `m`.
    pub fn mtime_of(m: &std::fs::Metadata) -> FileTime {
        // The kernel keeps nsec in 0..1e9; clamp anyway rather than trust it.
        FileTime::new(m.mtime(), m.mtime_nsec().clamp(0, 999_999_999) as u32)
    }

    /// The status-change time of `m`.
    pub fn ctime_of(m: &std::fs::Metadata) -> FileTime {
        FileTime::new(m.ctime(), m.ctime_nsec().clamp(0, 999_999_999) as u32)
    }

    pub fn secs(self) -> i64 {
        self.secs
    }

    pub fn nsec(self) -> u32 {
        self.nsec
    }

    /// Quick-check equality. To the nanosecond normally; to the second when `seconds` is set (a
    /// side that only keeps seconds, like SFTP) or when either side has no sub-second part (a
    /// copy that went through such a side).
    pub fn same_as(self, other: FileTime, seconds: bool) -> bool {
        self == other || ((seconds || self.nsec == 0 || other.nsec == 0) && self.secs == other.secs)
    }

    /// As a `timespec` for utimensat.
    pub fn timespec(self) -> libc::timespec {
        libc::timespec {
            tv_sec: self.secs as libc::time_t,
            tv_nsec: self.nsec as _,
        }
    }
}

// Tests only: unwrap on local temp files.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn nanoseconds_carry_into_seconds() {
        assert_eq!(
            FileTime::new(1, 1_500_000_000),
            FileTime::new(2, 500_000_000)
        );
        assert_eq!(FileTime::new(i64::MAX, 2_000_000_000).secs(), i64::MAX);
    }

    #[test]
    fn times_order_across_the_epoch_and_past_2262() {
        let before = FileTime::new(-1, 999_999_999);
        let epoch = FileTime::from_secs(0);
        let y2300 = FileTime::from_secs(10_413_792_000);
        assert!(before < epoch && epoch < y2300);
    }

    #[test]
    fn same_as_compares_seconds_when_either_side_has_none() {
        let ns = FileTime::new(1_700_000_000, 123_456_789);
        let secs = FileTime::from_secs(1_700_000_000);
        assert!(ns.same_as(ns, false));
        assert!(!ns.same_as(FileTime::new(1_700_000_000, 123_456_790), false));
        assert!(ns.same_as(FileTime::new(1_700_000_000, 1), true));
        assert!(ns.same_as(secs, false), "an SFTP-synced copy");
        assert!(!ns.same_as(FileTime::from_secs(1_700_000_001), true));
    }

    #[test]
    fn a_time_in_2300_reads_back_from_disk() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        let t = FileTime::new(10_413_792_000, 42);
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::new(t.secs() as u64, t.nsec()))
            .unwrap();
        assert_eq!(FileTime::mtime_of(&std::fs::metadata(&p).unwrap()), t);
    }
}
