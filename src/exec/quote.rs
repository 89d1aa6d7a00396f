//! Building the remote command line. SSH sends one string to the remote user's shell, so every
//! argument is single-quoted for POSIX sh: `vtun exec vm -- ls "a b" '$HOME'` lists the file `a b`
//! and the file literally named `$HOME`, exactly as the same argv would locally.

use anyhow::{bail, Result};

/// Quote one argument for POSIX sh (left bare when it only has characters sh never interprets).
pub fn quote(arg: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !arg.is_empty() && arg.chars().all(safe) {
        return arg.to_string();
    }
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// What to run and how, before any quoting.
#[derive(Debug, Default)]
pub struct CommandSpec {
    pub argv: Vec<String>,
    /// Run `argv` joined with spaces as a shell line instead of quoting each argument.
    pub shell_line: bool,
    pub env: Vec<(String, String)>,
    pub cd: Option<String>,
}

/// Parse `K=V` (K a shell variable name).
pub fn parse_env(s: &str) -> Result<(String, String)> {
    let Some((k, v)) = s.split_once('=') else {
        bail!("--env {s:?}: expected K=V");
    };
    let valid = !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        bail!("--env {s:?}: {k:?} is not a valid variable name");
    }
    Ok((k.to_string(), v.to_string()))
}

impl CommandSpec {
    /// The single string sent in the exec request.
    pub fn render(&self) -> String {
        let mut line = String::new();
        if let Some(dir) = &self.cd {
            line.push_str(&format!("cd -- {} || exit 1; ", quote(dir)));
        }
        for (k, v) in &self.env {
            line.push_str(&format!("export {k}={}; ", quote(v)));
        }
        if self.shell_line {
            line.push_str(&self.argv.join(" "));
        } else {
            let quoted: Vec<String> = self.argv.iter().map(|a| quote(a)).collect();
            line.push_str(&quoted.join(" "));
        }
        line
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sh(line: &str) -> Vec<String> {
        // Let the local sh split it back: the round trip is the property that matters.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("for a in {line}; do printf '%s\\0' \"$a\"; done"))
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .split_terminator('\0')
            .map(String::from)
            .collect()
    }

    #[test]
    fn quoting_round_trips_through_sh() {
        let args = [
            "plain",
            "a b",
            "it's",
            "$HOME",
            "a;b",
            "line\nbreak",
            "ünïcødé ✓",
            "",
            "\"dq\"",
            "`x`",
            "*",
            "\\",
        ];
        let line: Vec<String> = args.iter().map(|a| quote(a)).collect();
        assert_eq!(sh(&line.join(" ")), args);
    }

    #[test]
    fn render_adds_cd_and_env() {
        let spec = CommandSpec {
            argv: vec!["ls".into(), "a b".into()],
            env: vec![("K".into(), "v w".into())],
            cd: Some("/tmp/x y".into()),
            shell_line: false,
        };
        assert_eq!(
            spec.render(),
            "cd -- '/tmp/x y' || exit 1; export K='v w'; ls 'a b'"
        );
    }

    #[test]
    fn env_names_are_checked() {
        assert_eq!(parse_env("A_1=x=y").unwrap(), ("A_1".into(), "x=y".into()));
        assert!(parse_env("1A=x").is_err());
        assert!(parse_env("A-B=x").is_err());
        assert!(parse_env("novalue").is_err());
    }
}
