//! Compare a source and a destination listing and decide what to do, rsync style.
//!
//! Quick check, as rsync's default (`--modify-window=0`): a file whose size and mtime to the second
//! match is skipped (mtimes are still kept to the nanosecond when a file is written); `-c` compares content hashes, `--size-only` sizes. A file those checks skip still gets
//! the source's mode and mtime (`.f..tp.....`), as with `rsync -a`. Directory metadata is applied last,
//! because writing into a directory changes its mtime; that is why every directory whose contents
//! change gets its mtime set again even when it is not itemized.

use std::collections::{BTreeSet, HashMap};

use super::listing::{Entry, EntryKind, RelPath};
use super::pattern::Excludes;

#[derive(Debug, Clone, Copy, Default)]
pub struct PlanOpts {
    pub checksum: bool,
    pub size_only: bool,
    pub delete: bool,
    /// One side is plain SFTP, which only knows mtimes to the second and cannot set a symlink's
    /// own mtime: a link whose only difference is its time is left alone.
    pub mtime_seconds: bool,
    /// The destination listing leaves out excluded entries, which deletions must keep.
    pub keep_excluded: bool,
}

/// One itemized change, in the order it is carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Remove a destination entry (recursive when a directory is replaced by a non-directory).
    Delete {
        path: RelPath,
        is_dir: bool,
        recursive: bool,
        /// Makes way for a source entry of another type. rsync itemizes what goes from inside
        /// it, not the entry itself.
        replaced: bool,
    },
    Mkdir(Entry),
    /// Send file content; `update` when the receiver has an old copy (a delta candidate).
    Transfer {
        entry: Entry,
        update: bool,
        flags: Flags,
    },
    /// Create or replace a symlink; `time` when an existing link's mtime differs.
    Symlink {
        entry: Entry,
        new: bool,
        time: bool,
    },
    /// Mode or mtime only (a symlink: mtime only).
    Meta {
        entry: Entry,
        flags: Flags,
    },
}

/// Which attributes differ (rsync's `c`, `s`, `t`, `p` columns).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    pub checksum: bool,
    pub size: bool,
    pub time: bool,
    pub perms: bool,
}

/// The plan: itemized actions, plus the directories whose metadata must be (re)set at the end.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Directories (from the source listing) to give their mode and mtime after all writes,
    /// deepest first.
    pub dir_meta: Vec<Entry>,
}

pub fn plan(src: &[Entry], dst: &[Entry], opts: PlanOpts) -> Plan {
    let dst_by: HashMap<&RelPath, &Entry> = dst.iter().map(|e| (&e.path, e)).collect();
    let src_paths: BTreeSet<&RelPath> = src.iter().map(|e| &e.path).collect();
    let mut deletes = Vec::new();
    let mut creates = Vec::new();
    let mut touched_dirs: BTreeSet<RelPath> = BTreeSet::new();
    // Destination subtrees removed because their type changed: their contents go with them.
    let mut gone: Vec<RelPath> = Vec::new();

    let touch = |p: &RelPath, touched: &mut BTreeSet<RelPath>| {
        if let Some(parent) = p.parent() {
            touched.insert(parent);
        }
    };

    for s in src {
        let d = dst_by.get(&s.path).copied();
        let same_kind = matches!(
            (d.map(|d| &d.kind), &s.kind),
            (Some(EntryKind::Dir), EntryKind::Dir)
                | (Some(EntryKind::File { .. }), EntryKind::File { .. })
                | (Some(EntryKind::Symlink { .. }), EntryKind::Symlink { .. })
        );
        let d = match d {
            Some(d) if !same_kind => {
                // As rsync: without --delete a non-empty directory is not replaced (rsync would
                // need --force). With it, what the listing shows inside goes first, one by one;
                // an excluded entry inside stays, which keeps the directory, and the new entry
                // then cannot take its place (rsync: "could not make way").
                if d.is_dir() && opts.delete {
                    for c in dst
                        .iter()
                        .filter(|c| c.path != d.path && c.path.starts_with(&d.path))
                    {
                        deletes.push(Action::Delete {
                            path: c.path.clone(),
                            is_dir: c.is_dir(),
                            recursive: false,
                            replaced: false,
                        });
                    }
                }
                deletes.push(Action::Delete {
                    path: d.path.clone(),
                    is_dir: d.is_dir(),
                    recursive: d.is_dir() && opts.delete && !opts.keep_excluded,
                    replaced: true,
                });
                if d.is_dir() {
                    gone.push(d.path.clone());
                }
                None
            }
            other => other,
        };
        let perms = d.is_some_and(|d| d.mode != s.mode);
        // Whole seconds, as rsync compares by default: an mtime that differs only below the second
        // is not a change, for files, directories and links alike.
        let time = d.is_some_and(|d| !d.mtime.same_as(s.mtime, true));
        match (&s.kind, d) {
            (EntryKind::Dir, None) => {
                touch(&s.path, &mut touched_dirs);
                touched_dirs.insert(s.path.clone());
                creates.push(Action::Mkdir(s.clone()));
            }
            (EntryKind::Dir, Some(_)) => {
                if perms || time {
                    touched_dirs.insert(s.path.clone());
                    creates.push(Action::Meta {
                        entry: s.clone(),
                        flags: Flags {
                            time,
                            perms,
                            ..Flags::default()
                        },
                    });
                }
            }
            (EntryKind::File { .. }, None) => {
                touch(&s.path, &mut touched_dirs);
                creates.push(Action::Transfer {
                    entry: s.clone(),
                    update: false,
                    flags: Flags::default(),
                });
            }
            (EntryKind::File { size }, Some(d)) => {
                let size_differs = d.size() != *size;
                let hash_differs = opts.checksum && s.hash != d.hash;
                let send = if opts.size_only {
                    size_differs
                } else if opts.checksum {
                    size_differs || hash_differs
                } else {
                    size_differs || time
                };
                let flags = Flags {
                    checksum: hash_differs,
                    size: size_differs,
                    time,
                    perms,
                };
                if send {
                    touch(&s.path, &mut touched_dirs);
                    creates.push(Action::Transfer {
                        entry: s.clone(),
                        update: true,
                        flags,
                    });
                } else if perms || time {
                    // rsync sets the mode and mtime of a file it skips, whichever check skipped
                    // it: `--size-only` and `-c` decide whether to send, not what to keep.
                    creates.push(Action::Meta {
                        entry: s.clone(),
                        flags,
                    });
                }
            }
            (EntryKind::Symlink { target }, d) => {
                let same = matches!(d.map(|d| &d.kind), Some(EntryKind::Symlink { target: t }) if t == target);
                if !same {
                    touch(&s.path, &mut touched_dirs);
                    creates.push(Action::Symlink {
                        entry: s.clone(),
                        new: d.is_none(),
                        time,
                    });
                } else if time && !opts.mtime_seconds {
                    // rsync -a sets a link's own mtime (`.L..t......`).
                    creates.push(Action::Meta {
                        entry: s.clone(),
                        flags: Flags {
                            time,
                            ..Flags::default()
                        },
                    });
                }
            }
        }
    }

    if opts.delete {
        for d in dst.iter().rev() {
            if src_paths.contains(&d.path) || d.path.is_root() {
                continue;
            }
            if gone.iter().any(|g| d.path.starts_with(g)) {
                continue;
            }
            touch(&d.path, &mut touched_dirs);
            deletes.push(Action::Delete {
                path: d.path.clone(),
                is_dir: d.is_dir(),
                recursive: false,
                replaced: false,
            });
        }
    }
    // Deepest first, so a directory is empty by the time it is removed.
    deletes.sort_by_key(|a| match a {
        Action::Delete { path, .. } => std::cmp::Reverse(path.depth()),
        _ => std::cmp::Reverse(0),
    });

    let mut dir_meta: Vec<Entry> = src
        .iter()
        .filter(|e| e.is_dir() && touched_dirs.contains(&e.path))
        .cloned()
        .collect();
    dir_meta.sort_by_key(|e| std::cmp::Reverse(e.path.depth()));

    let mut actions = deletes;
    actions.extend(creates);
    Plan { actions, dir_meta }
}

/// Source entries that may stand where the destination has an entry the excludes hide: an entry
/// whose type differs from the source's, and only that type is excluded (`--exclude 'x/'` over a
/// source file `x`). rsync makes way for the source entry there as for any type change, so the
/// engine lists each of these paths on the destination and adds what it finds before planning.
/// Rare, so this costs nothing on an ordinary run: no destination entry is missing at a path a
/// pattern would hide only as the other type.
pub fn hidden_in_the_way(src: &[Entry], dst: &[Entry], excludes: &Excludes) -> Vec<RelPath> {
    let dst_dirs: BTreeSet<&RelPath> = dst.iter().filter(|e| e.is_dir()).map(|e| &e.path).collect();
    let dst_paths: BTreeSet<&RelPath> = dst.iter().map(|e| &e.path).collect();
    src.iter()
        .filter(|s| {
            !s.path.is_root()
                && !dst_paths.contains(&s.path)
                && s.path.parent().is_some_and(|p| dst_dirs.contains(&p))
                && excludes.is_excluded(s.path.as_str(), !s.is_dir())
                && !excludes.is_excluded(s.path.as_str(), s.is_dir())
        })
        .map(|s| s.path.clone())
        .collect()
}

/// A name as rsync prints it: a control character other than tab, and a backslash that would
/// read as such an escape, become `\#ooo`, so that one change is always one line.
fn escaped(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    for (i, c) in s.char_indices() {
        let looks_escaped = c == '\\'
            && b.get(i + 1) == Some(&b'#')
            && b.get(i + 2..i + 5)
                .is_some_and(|d| d.iter().all(u8::is_ascii_digit));
        if (c < ' ' && c != '\t') || looks_escaped {
            out.push_str(&format!("\\#{:03o}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// The rsync `--itemize-changes` line for an action, if rsync prints one.
pub fn itemize(a: &Action) -> Option<String> {
    fn cols(f: &Flags) -> String {
        format!(
            "{}{}{}{}.....",
            if f.checksum { 'c' } else { '.' },
            if f.size { 's' } else { '.' },
            if f.time { 't' } else { '.' },
            if f.perms { 'p' } else { '.' },
        )
    }
    fn name(e: &Entry) -> String {
        let path = escaped(&e.path.to_string());
        match (&e.kind, e.path.is_root()) {
            (EntryKind::Dir, true) => "./".to_string(),
            (EntryKind::Dir, false) => format!("{path}/"),
            (EntryKind::Symlink { target }, _) => format!("{path} -> {}", escaped(target)),
            _ => path,
        }
    }
    Some(match a {
        Action::Delete { replaced: true, .. } => return None,
        Action::Delete { path, is_dir, .. } => {
            let path = escaped(&path.to_string());
            format!("*deleting   {path}{}", if *is_dir { "/" } else { "" })
        }
        Action::Mkdir(e) => format!("cd+++++++++ {}", name(e)),
        Action::Transfer {
            entry,
            update: false,
            ..
        } => format!(">f+++++++++ {}", name(entry)),
        Action::Transfer { entry, flags, .. } => format!(">f{} {}", cols(flags), name(entry)),
        Action::Symlink { entry, new, time } => {
            let cols = if *new {
                "+++++++++".to_string()
            } else {
                // rsync marks a changed target in the checksum column.
                cols(&Flags {
                    checksum: true,
                    time: *time,
                    ..Flags::default()
                })
            };
            format!("cL{cols} {}", name(entry))
        }
        Action::Meta { entry, flags } => {
            let t = match entry.kind {
                EntryKind::Dir => 'd',
                EntryKind::Symlink { .. } => 'L',
                EntryKind::File { .. } => 'f',
            };
            format!(".{t}{} {}", cols(flags), name(entry))
        }
    })
}

// Tests only: unwrap on values the test itself built (in-memory data, temp files, local
// processes), where a failure is the test failing.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::fs::FileTime;

    fn e(path: &str, kind: EntryKind, mtime: FileTime) -> Entry {
        Entry {
            path: RelPath::parse(path).unwrap(),
            kind,
            mode: 0o644,
            mtime,
            hash: None,
        }
    }
    fn f(path: &str, size: u64, mtime: impl Into<Time>) -> Entry {
        e(path, EntryKind::File { size }, mtime.into().0)
    }
    fn d(path: &str) -> Entry {
        e(path, EntryKind::Dir, FileTime::from_secs(1))
    }
    /// Test times: whole seconds, or an exact FileTime.
    struct Time(FileTime);
    impl From<i64> for Time {
        fn from(s: i64) -> Time {
            Time(FileTime::from_secs(s))
        }
    }
    impl From<FileTime> for Time {
        fn from(t: FileTime) -> Time {
            Time(t)
        }
    }
    #[test]
    fn only_entries_a_rule_hides_as_the_other_type_are_looked_up() {
        let ex = Excludes::new(&["x/".to_string(), "*.log".to_string()]).unwrap();
        let src = [
            d(""),
            f("x", 1, 1),
            f("a.log", 1, 1),
            d("sub"),
            f("sub/x", 1, 1),
            f("y", 1, 1),
        ];
        // `sub` is missing on the destination, so nothing can stand in the way beneath it;
        // `a.log` is excluded as either type (a listing would not hold it); `y` no rule hides.
        let dst = [d("")];
        let want = vec![RelPath::parse("x").unwrap()];
        assert_eq!(hidden_in_the_way(&src, &dst, &ex), want);
        assert!(
            hidden_in_the_way(&src, &[d(""), d("x")], &ex).is_empty(),
            "listed already"
        );
    }

    fn lines(p: &Plan) -> Vec<String> {
        p.actions.iter().filter_map(itemize).collect()
    }

    #[test]
    fn new_tree_is_created_parents_first() {
        let src = [
            d("a"),
            f("a/x", 3, 5),
            e(
                "a/l",
                EntryKind::Symlink { target: "x".into() },
                FileTime::from_secs(1),
            ),
        ];
        let p = plan(&src, &[], PlanOpts::default());
        assert_eq!(
            lines(&p),
            ["cd+++++++++ a/", ">f+++++++++ a/x", "cL+++++++++ a/l -> x"]
        );
        assert_eq!(p.dir_meta.len(), 1);
    }

    #[test]
    fn identical_trees_plan_nothing() {
        let src = [d(""), d("a"), f("a/x", 3, 5)];
        let p = plan(
            &src,
            &src,
            PlanOpts {
                delete: true,
                ..PlanOpts::default()
            },
        );
        assert!(p.actions.is_empty());
        assert!(p.dir_meta.is_empty());
    }

    #[test]
    fn quick_check_size_only_and_checksum() {
        let src = [f("x", 3, 5)];
        let dst = [f("x", 3, 6)];
        assert_eq!(
            lines(&plan(&src, &dst, PlanOpts::default())),
            [">f..t...... x"]
        );
        let so = PlanOpts {
            size_only: true,
            ..PlanOpts::default()
        };
        assert_eq!(lines(&plan(&src, &dst, so)), [".f..t...... x"]);
        let mut s = f("x", 3, 5);
        s.hash = Some([1; 32]);
        let mut t = f("x", 3, 5);
        t.hash = Some([2; 32]);
        let c = PlanOpts {
            checksum: true,
            ..PlanOpts::default()
        };
        assert_eq!(lines(&plan(&[s], &[t], c)), [">fc........ x"]);
        assert_eq!(
            lines(&plan(&[f("x", 4, 5)], &[f("x", 3, 6)], PlanOpts::default())),
            [">f.st...... x"]
        );
    }

    #[test]
    fn whole_second_mtimes_match_their_second() {
        // FileTime::same_as has the rule's own tests; here, what the plan makes of it.
        let ns = FileTime::new(1_700_000_000, 123_456_789);
        let secs = FileTime::from_secs(1_700_000_000);
        let src = [f("x", 3, ns)];
        assert!(plan(&src, &[f("x", 3, secs)], PlanOpts::default())
            .actions
            .is_empty());
    }

    /// The strings `rsync -a -i` prints (3.x) when `--size-only` or `-c` skip the content.
    #[test]
    fn skipped_files_still_get_mode_and_mtime() {
        let mut s = f("x", 3, 5);
        s.mode = 0o755;
        s.hash = Some([1; 32]);
        let mut same = f("x", 3, 6);
        same.hash = Some([1; 32]);
        let so = PlanOpts {
            size_only: true,
            ..PlanOpts::default()
        };
        let c = PlanOpts {
            checksum: true,
            ..PlanOpts::default()
        };
        assert_eq!(
            lines(&plan(&[s.clone()], &[same.clone()], so)),
            [".f..tp..... x"]
        );
        assert_eq!(
            lines(&plan(&[s.clone()], &[same.clone()], c)),
            [".f..tp..... x"]
        );
        same.mode = 0o755;
        assert_eq!(
            lines(&plan(&[s.clone()], &[same.clone()], c)),
            [".f..t...... x"]
        );
        same.mtime = s.mtime;
        same.mode = 0o600;
        assert_eq!(lines(&plan(&[s.clone()], &[same], so)), [".f...p..... x"]);
        let p = plan(&[s.clone()], &[f("x", 3, 6)], so);
        assert!(matches!(&p.actions[..], [Action::Meta { entry, .. }] if *entry == s));
    }

    #[test]
    fn mode_only_change_is_metadata() {
        let mut s = f("x", 3, 5);
        s.mode = 0o755;
        assert_eq!(
            lines(&plan(&[s], &[f("x", 3, 5)], PlanOpts::default())),
            [".f...p..... x"]
        );
    }

    #[test]
    fn delete_deepest_first_and_only_with_flag() {
        let src = [d("")];
        let dst = [d(""), d("old"), f("old/a", 1, 1), f("b", 1, 1)];
        assert!(plan(&src, &dst, PlanOpts::default()).actions.is_empty());
        let p = plan(
            &src,
            &dst,
            PlanOpts {
                delete: true,
                ..PlanOpts::default()
            },
        );
        assert_eq!(
            lines(&p),
            ["*deleting   old/a", "*deleting   b", "*deleting   old/"]
        );
        assert_eq!(p.dir_meta.len(), 1, "root mtime is restored");
    }

    #[test]
    fn type_change_replaces_the_whole_subtree() {
        let src = [d(""), f("x", 1, 1)];
        let dst = [d(""), d("x"), f("x/inner", 1, 1)];
        let p = plan(
            &src,
            &dst,
            PlanOpts {
                delete: true,
                ..PlanOpts::default()
            },
        );
        assert_eq!(lines(&p), ["*deleting   x/inner", ">f+++++++++ x"]);
        assert!(matches!(
            &p.actions[1],
            Action::Delete {
                recursive: true,
                replaced: true,
                path,
                ..
            } if path.to_string() == "x"
        ));
        // Without --delete nothing inside goes, and the directory only if it is empty.
        let p = plan(&src, &dst, PlanOpts::default());
        assert_eq!(lines(&p), [">f+++++++++ x"]);
        assert!(matches!(
            &p.actions[0],
            Action::Delete {
                recursive: false,
                replaced: true,
                ..
            }
        ));
    }

    #[test]
    fn type_change_keeps_excluded_entries_inside() {
        let src = [d(""), f("x", 1, 1)];
        let dst = [
            d(""),
            d("x"),
            d("x/sub"),
            f("x/sub/a", 1, 1),
            f("x/b", 1, 1),
        ];
        let p = plan(
            &src,
            &dst,
            PlanOpts {
                delete: true,
                keep_excluded: true,
                ..PlanOpts::default()
            },
        );
        assert_eq!(
            lines(&p),
            [
                "*deleting   x/sub/a",
                "*deleting   x/sub/",
                "*deleting   x/b",
                ">f+++++++++ x"
            ]
        );
        assert!(p.actions.iter().all(|a| !matches!(
            a,
            Action::Delete {
                recursive: true,
                ..
            }
        )));
    }

    /// Checked against `rsync -ai` 3.x output.
    #[test]
    fn names_are_escaped_as_rsync_prints_them() {
        assert_eq!(escaped("a\nb\rc\td\u{7f}é"), "a\\#012b\\#015c\td\u{7f}é");
        assert_eq!(escaped("a\\#012b"), "a\\#134#012b");
        assert_eq!(escaped("back\\slash \\#1"), "back\\slash \\#1");
        let l = e(
            "new\nline",
            EntryKind::Symlink {
                target: "tar\nget".into(),
            },
            FileTime::from_secs(1),
        );
        assert_eq!(
            lines(&plan(&[l], &[], PlanOpts::default())),
            ["cL+++++++++ new\\#012line -> tar\\#012get"]
        );
    }

    #[test]
    fn changed_symlink_is_replaced() {
        let s = e(
            "l",
            EntryKind::Symlink { target: "b".into() },
            FileTime::from_secs(1),
        );
        let t = e(
            "l",
            EntryKind::Symlink { target: "a".into() },
            FileTime::from_secs(1),
        );
        assert_eq!(
            lines(&plan(
                std::slice::from_ref(&s),
                std::slice::from_ref(&t),
                PlanOpts::default()
            )),
            ["cLc........ l -> b"]
        );
        let mut old = t.clone();
        old.mtime = FileTime::from_secs(9);
        assert_eq!(
            lines(&plan(std::slice::from_ref(&s), &[old], PlanOpts::default())),
            ["cLc.t...... l -> b"]
        );
    }

    /// What `rsync -a -i` does with a link whose target is the same but whose mtime is not.
    #[test]
    fn symlink_with_an_other_mtime_gets_its_time() {
        let l = |secs| {
            e(
                "l",
                EntryKind::Symlink { target: "t".into() },
                FileTime::from_secs(secs),
            )
        };
        assert_eq!(
            lines(&plan(&[l(1)], &[l(2)], PlanOpts::default())),
            [".L..t...... l -> t"]
        );
        let sftp = PlanOpts {
            mtime_seconds: true,
            ..PlanOpts::default()
        };
        assert!(plan(&[l(1)], &[l(2)], sftp).actions.is_empty());
    }

    #[test]
    fn mtimes_differing_below_the_second_are_the_same() {
        let a = FileTime::new(1_700_000_000, 1);
        let b = FileTime::new(1_700_000_000, 999_999_999);
        assert!(plan(&[f("x", 3, a)], &[f("x", 3, b)], PlanOpts::default())
            .actions
            .is_empty());
    }
}
