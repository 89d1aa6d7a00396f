//! rsync exclude rules: `--exclude PATTERN` and `--exclude-from FILE`.
//!
//! Paths are matched relative to the transfer root (for `SRC` without a trailing `/` that root is
//! SRC's parent, so `/SRC/x` anchors as in rsync). The rules are rsync's `rule_matches`
//! (exclude.c), checked against rsync 3.x: a pattern starting with `/` must match the whole path;
//! one starting with `**` is matched against the path with a `/` in front, so `**/x` also matches
//! a top-level `x`; any other pattern matches the end of the path at a component boundary, which
//! for a pattern without `/` means "a name at any depth". A trailing `/` restricts a rule to
//! directories, and a trailing `***` also lets the directory itself match (`dir/***` is the
//! directory `dir` and everything below it, never a file named `dir`). `**` never matches "no
//! directory": `a/**/b` does not match `a/b`. Backslash escapes only in patterns that have a
//! wildcard (`*`, `?`, `[`); otherwise it is an ordinary character.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// One parsed exclude rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    tokens: Vec<Token>,
    anchored: bool,
    dir_only: bool,
    /// Starts with `**`: matched against `/` + path, from the start only.
    dstar_prefix: bool,
    /// Ends with `***`: a directory is matched as `path/`.
    tstar_suffix: bool,
    /// Source text, for messages and for sending to the agent.
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Lit(char),
    /// `?`: one character other than `/`.
    One,
    /// `*`: any run of characters other than `/`.
    Star,
    /// `**`: any run of characters, `/` included.
    DStar,
    /// `[...]`: one character (other than `/`) in (or with `negated`, not in) the ranges.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Rule {
    /// Parse one pattern with rsync's rules.
    pub fn parse(pattern: &str) -> Result<Rule> {
        if pattern.is_empty() {
            bail!("empty exclude pattern");
        }
        let mut p = pattern;
        let dir_only = p.len() > 1 && p.ends_with('/');
        if dir_only {
            p = &p[..p.len() - 1];
        }
        let anchored = p.starts_with('/');
        if anchored {
            p = &p[1..];
        }
        if p.is_empty() {
            bail!("exclude pattern {pattern:?} matches nothing");
        }
        let wild = p.contains(['*', '?', '[']);
        let tokens = if wild {
            tokenize(p, pattern)?
        } else {
            p.chars().map(Token::Lit).collect()
        };
        Ok(Rule {
            tokens,
            anchored,
            dir_only,
            dstar_prefix: !anchored && p.starts_with("**"),
            tstar_suffix: wild && p.ends_with("***"),
            text: pattern.to_string(),
        })
    }

    /// Does this rule match `path` (relative, `/`-separated, no leading `/`)?
    pub fn matches(&self, path: &str, is_dir: bool) -> bool {
        if self.dir_only && !is_dir {
            return false;
        }
        let mut chars: Vec<char> = Vec::with_capacity(path.len() + 2);
        if self.dstar_prefix {
            chars.push('/');
        }
        chars.extend(path.chars());
        if is_dir && self.tstar_suffix {
            chars.push('/');
        }
        if self.anchored || self.dstar_prefix {
            return glob(&self.tokens, &chars);
        }
        // Unanchored: the end of the path, starting at a component boundary.
        if glob(&self.tokens, &chars) {
            return true;
        }
        chars
            .iter()
            .enumerate()
            .filter(|(_, c)| **c == '/')
            .any(|(i, _)| glob(&self.tokens, &chars[i + 1..]))
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

fn tokenize(p: &str, whole: &str) -> Result<Vec<Token>> {
    let chars: Vec<char> = p.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => {
                let c = chars
                    .get(i + 1)
                    .with_context(|| format!("pattern {whole:?} ends with a lone '\\'"))?;
                out.push(Token::Lit(*c));
                i += 2;
            }
            '?' => {
                out.push(Token::One);
                i += 1;
            }
            '*' => {
                if chars.get(i + 1) == Some(&'*') {
                    out.push(Token::DStar);
                    i += 2;
                    while chars.get(i) == Some(&'*') {
                        i += 1;
                    }
                } else {
                    out.push(Token::Star);
                    i += 1;
                }
            }
            '[' => {
                let (tok, next) = class(&chars, i)
                    .with_context(|| format!("unclosed '[' in pattern {whole:?}"))?;
                out.push(tok);
                i = next;
            }
            c => {
                out.push(Token::Lit(c));
                i += 1;
            }
        }
    }
    Ok(out)
}

/// Parse `[...]` starting at `start`; returns the token and the index after `]`.
fn class(chars: &[char], start: usize) -> Option<(Token, usize)> {
    let mut i = start + 1;
    let negated = matches!(chars.get(i), Some('!') | Some('^'));
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let c = *chars.get(i)?;
        if c == ']' && !first {
            return Some((Token::Class { negated, ranges }, i + 1));
        }
        first = false;
        if chars.get(i + 1) == Some(&'-') && chars.get(i + 2).is_some_and(|c| *c != ']') {
            ranges.push((c, chars[i + 2]));
            i += 3;
        } else {
            ranges.push((c, c));
            i += 1;
        }
    }
}

fn glob(tokens: &[Token], s: &[char]) -> bool {
    let Some((first, rest)) = tokens.split_first() else {
        return s.is_empty();
    };
    match first {
        Token::Lit(c) => s.first() == Some(c) && glob(rest, &s[1..]),
        Token::One => s.first().is_some_and(|c| *c != '/') && glob(rest, &s[1..]),
        Token::Class { negated, ranges } => {
            s.first().is_some_and(|c| {
                *c != '/' && ranges.iter().any(|(a, b)| a <= c && c <= b) != *negated
            }) && glob(rest, &s[1..])
        }
        Token::Star => {
            for i in 0..=s.len() {
                if glob(rest, &s[i..]) {
                    return true;
                }
                if s.get(i) == Some(&'/') {
                    break;
                }
            }
            false
        }
        Token::DStar => (0..=s.len()).any(|i| glob(rest, &s[i..])),
    }
}

/// The set of exclude rules for one sync.
#[derive(Debug, Clone, Default)]
pub struct Excludes {
    rules: Vec<Rule>,
    /// The patterns as given, in order (what the agent is sent).
    patterns: Vec<String>,
}

impl Excludes {
    pub fn new(patterns: &[String]) -> Result<Excludes> {
        let mut rules = Vec::new();
        for p in patterns {
            rules.push(Rule::parse(p)?);
        }
        Ok(Excludes {
            rules,
            patterns: patterns.to_vec(),
        })
    }

    /// `--exclude` patterns followed by those read from each `--exclude-from` file.
    pub fn from_args(exclude: &[String], exclude_from: &[impl AsRef<Path>]) -> Result<Excludes> {
        let mut patterns = exclude.to_vec();
        for file in exclude_from {
            let file = file.as_ref();
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read exclude file {}", file.display()))?;
            patterns.extend(
                parse_exclude_file(&text).with_context(|| format!("in {}", file.display()))?,
            );
        }
        Excludes::new(&patterns)
    }

    pub fn is_excluded(&self, path: &str, is_dir: bool) -> bool {
        !path.is_empty() && self.rules.iter().any(|r| r.matches(path, is_dir))
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}

/// Lines of an `--exclude-from` file: blank lines and `#`/`;` comments skipped, a `- ` prefix
/// allowed (rsync's filter-rule form); include rules (`+ `) are refused rather than ignored.
pub fn parse_exclude_file(text: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with("+ ") {
            bail!("line {}: include rules ('+ ') are not supported", n + 1);
        }
        let pat = line.strip_prefix("- ").unwrap_or(line);
        out.push(pat.to_string());
    }
    Ok(out)
}

// Tests only: unwrap on values the test itself built (in-memory data, temp files, local
// processes), where a failure is the test failing.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ex(p: &[&str]) -> Excludes {
        Excludes::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn name_without_slash_matches_at_any_depth() {
        let e = ex(&[".git"]);
        assert!(e.is_excluded(".git", true));
        assert!(e.is_excluded("a/b/.git", true));
        assert!(e.is_excluded("a/.git", false));
        assert!(!e.is_excluded("a/.gitignore", false));
        assert!(!e.is_excluded("x.git", false));
    }

    #[test]
    fn leading_slash_anchors_at_root() {
        let e = ex(&["/build"]);
        assert!(e.is_excluded("build", true));
        assert!(!e.is_excluded("src/build", true));
    }

    #[test]
    fn trailing_slash_matches_directories_only() {
        let e = ex(&["cache/"]);
        assert!(e.is_excluded("cache", true));
        assert!(e.is_excluded("a/cache", true));
        assert!(!e.is_excluded("cache", false));
    }

    #[test]
    fn star_stays_within_a_segment() {
        let e = ex(&["*.o"]);
        assert!(e.is_excluded("main.o", false));
        assert!(e.is_excluded("src/deep/main.o", false));
        assert!(!e.is_excluded("main.oo", false));
        let e = ex(&["/src/*.c"]);
        assert!(e.is_excluded("src/a.c", false));
        assert!(!e.is_excluded("src/x/a.c", false));
    }

    #[test]
    fn double_star_crosses_segments() {
        let e = ex(&["/src/**.c"]);
        assert!(e.is_excluded("src/a.c", false));
        assert!(e.is_excluded("src/x/y/a.c", false));
        assert!(!e.is_excluded("lib/a.c", false));
        let e = ex(&["logs/**"]);
        assert!(e.is_excluded("logs/a", false));
        assert!(e.is_excluded("x/logs/a/b", false));
        assert!(!e.is_excluded("logs", true));
    }

    #[test]
    fn unanchored_pattern_with_slash_matches_path_end() {
        let e = ex(&["foo/bar"]);
        assert!(e.is_excluded("foo/bar", false));
        assert!(e.is_excluded("x/foo/bar", false));
        assert!(!e.is_excluded("xfoo/bar", false));
        assert!(!e.is_excluded("foo/bar/baz", false));
    }

    #[test]
    fn question_mark_and_classes() {
        let e = ex(&["file?.txt", "[ab]*.log", "[!0-9]x"]);
        assert!(e.is_excluded("file1.txt", false));
        assert!(!e.is_excluded("file10.txt", false));
        assert!(e.is_excluded("d/a1.log", false));
        assert!(!e.is_excluded("c1.log", false));
        assert!(e.is_excluded("zx", false));
        assert!(!e.is_excluded("5x", false));
        assert!(!ex(&["a?b"]).is_excluded("a/b", false));
    }

    #[test]
    fn triple_star_matches_dir_and_contents() {
        let e = ex(&["/out/***"]);
        assert!(e.is_excluded("out", true));
        assert!(e.is_excluded("out/a/b", false));
        assert!(!e.is_excluded("outx", false));
    }

    /// Each case checked against `rsync -a --exclude PATTERN src/ dst/` (rsync 3.x).
    #[test]
    fn double_star_corner_cases_match_rsync() {
        type Paths = &'static [(&'static str, bool)];
        let cases: &[(&str, Paths, Paths)] = &[
            // (pattern, excluded (path, is_dir), kept (path, is_dir))
            (
                "**/x.txt",
                &[("x.txt", false), ("a/x.txt", false), ("a/b/c/x.txt", false)],
                &[("ax.txt", false)],
            ),
            ("**x.txt", &[("x.txt", false), ("a/b/x.txt", false)], &[]),
            (
                "/**/x.txt",
                &[("a/x.txt", false), ("a/b/x.txt", false)],
                &[("x.txt", false)],
            ),
            (
                "a/**/x.txt",
                &[("a/b/x.txt", false), ("q/a/b/c/x.txt", false)],
                &[("a/x.txt", false)],
            ),
            ("a/**/b", &[("a/c/b", true)], &[("a/b", true)]),
            ("**/", &[("a", true), ("a/b", true)], &[("f", false)]),
            (
                "**/b/**",
                &[("a/b/c", true), ("b/x", false)],
                &[("a/b", true)],
            ),
            (
                "a**",
                &[("a", true), ("ab", false), ("x/ab", false)],
                &[("ba", false)],
            ),
            (
                "**.c",
                &[("top.c", false), ("a/b/d.c", false)],
                &[("c", false)],
            ),
            (
                "dir/***",
                &[("dir", true), ("sub/dir", true), ("dir/in", false)],
                &[("dir", false), ("a/dir", false), ("dirx", true)],
            ),
            (
                "/dir/***",
                &[("dir", true), ("dir/in/deep", false)],
                &[("sub/dir", true)],
            ),
        ];
        for (pat, excluded, kept) in cases {
            let e = ex(&[pat]);
            for (path, is_dir) in *excluded {
                assert!(e.is_excluded(path, *is_dir), "{pat} should exclude {path}");
            }
            for (path, is_dir) in *kept {
                assert!(!e.is_excluded(path, *is_dir), "{pat} should keep {path}");
            }
        }
    }

    #[test]
    fn backslash_is_literal_without_wildcards() {
        assert!(ex(&["f\\oo"]).is_excluded("f\\oo", false));
        assert!(!ex(&["f\\oo"]).is_excluded("foo", false));
        assert!(ex(&["f\\o*"]).is_excluded("foo", false));
    }

    #[test]
    fn escapes_are_literal() {
        let e = ex(&["a\\*b"]);
        assert!(e.is_excluded("a*b", false));
        assert!(!e.is_excluded("axb", false));
    }

    #[test]
    fn root_is_never_excluded() {
        assert!(!ex(&["**"]).is_excluded("", true));
    }

    #[test]
    fn bad_patterns_rejected() {
        assert!(Rule::parse("").is_err());
        assert!(Rule::parse("/").is_err());
        assert!(Rule::parse("a[bc").is_err());
        assert!(Rule::parse("a*\\").is_err());
    }

    #[test]
    fn exclude_file_lines() {
        let got = parse_exclude_file("# c\n\n; c\n*.o\n- /build/\r\nnode_modules\n").unwrap();
        assert_eq!(got, vec!["*.o", "/build/", "node_modules"]);
        assert!(parse_exclude_file("+ keep\n").is_err());
    }
}
