//! Fan-out through the real gateway and real sshd: many VM names routed onto a few sshd (each
//! VM's $HOME holds a `who` file naming it, so output shows which sshd answered), names that
//! no VM answers, and a slow VM.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const LIMIT: Duration = Duration::from_secs(120);

/// `w01`…`wNN`, odd ones on VM `a`, even ones on `b`.
fn fleet(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("w{i:02}")).collect()
}

fn bed_with(n: usize) -> TestBed {
    let names = fleet(n);
    let (odd, even): (Vec<_>, Vec<_>) = names.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let bed = TestBed::builder()
        .vm("a")
        .vm("b")
        .vm("slow")
        .names(odd.into_iter().map(|(_, n)| n.clone()), "a")
        .names(even.into_iter().map(|(_, n)| n.clone()), "b")
        .start();
    for vm in ["a", "b", "slow"] {
        std::fs::write(bed.vm(vm).home().join("who"), vm).unwrap();
    }
    std::fs::write(bed.vm("slow").home().join("slow"), "").unwrap();
    bed
}

fn which_vm(name: &str) -> &'static str {
    let i: usize = name[1..].parse().unwrap();
    if i % 2 == 1 {
        "a"
    } else {
        "b"
    }
}

fn exec(bed: &TestBed, args: &[&str]) -> Out {
    run_with_timeout(bed.vtun().args(["--wait", "0.5", "exec"]).args(args), LIMIT)
}

#[test]
fn fifty_vms_lines_stay_whole_prefixed_and_apart_with_a_summary() {
    let bed = bed_with(50);
    let dir = bed.dir("out");
    let failed = dir.join("failed.txt");
    let mut list = fleet(50);
    list.extend(["gone1".to_string(), "gone2".to_string()]);
    let list = list.join(",");
    // Lines of 3000 bytes, many of them, from 50 VMs at once: far more than one pipe write.
    let script = "x=$(head -c 3000 /dev/zero | tr '\\0' x); \
                  for i in $(seq 1 40); do echo \"$(cat ~/who) $i $x\"; done; \
                  echo \"err $(cat ~/who)\" >&2";
    let out = exec(
        &bed,
        &[
            "--failed",
            failed.to_str().unwrap(),
            &list,
            "--sh",
            "--",
            script,
        ],
    );
    assert_eq!(
        out.code(),
        255,
        "unreachable VMs make it 255: {}",
        out.stderr
    );

    let x = "x".repeat(3000);
    let mut per: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for line in out.stdout_str().lines() {
        let (name, rest) = line
            .split_once(": ")
            .unwrap_or_else(|| panic!("no prefix: {line:.80}"));
        let vm = which_vm(name);
        let mut f = rest.splitn(3, ' ');
        assert_eq!(f.next(), Some(vm), "{name} answered by the wrong sshd");
        let i: u32 = f.next().unwrap().parse().unwrap();
        assert_eq!(
            f.next(),
            Some(x.as_str()),
            "torn or interleaved line for {name}"
        );
        per.entry(name.to_string()).or_default().push(i);
    }
    assert_eq!(per.len(), 50, "every reachable VM printed");
    for (name, lines) in &per {
        assert_eq!(
            lines,
            &(1..=40).collect::<Vec<_>>(),
            "{name}: lines in order, none lost"
        );
    }
    for name in fleet(50) {
        let want = format!("{name}: err {}", which_vm(&name));
        assert!(
            out.stderr.lines().any(|l| l == want),
            "stderr kept apart: {want}"
        );
    }
    assert!(!out.stdout_str().contains("err "), "stderr never on stdout");
    for gone in ["gone1", "gone2"] {
        assert!(
            out.stderr
                .lines()
                .any(|l| l.starts_with(&format!("{gone}: vtun: "))),
            "{gone}'s error named: {}",
            out.stderr
        );
    }
    let summary = out.stderr.lines().last().unwrap();
    assert!(
        summary.starts_with("vtun: 52 VMs in ")
            && summary.ends_with(&format!(
                ": 50 ok ({}), 2 unreachable (gone1 gone2)",
                fleet(50).join(" ")
            )),
        "{summary}"
    );
    assert_eq!(std::fs::read_to_string(&failed).unwrap(), "gone1\ngone2\n");
}

#[test]
fn exit_status_is_the_highest_remote_status_then_timeout_then_connection() {
    let bed = bed_with(4);
    // `a` exits 3, `b` exits 5.
    let code = "case $(cat ~/who) in a) exit 3;; b) exit 5;; esac";
    let out = exec(&bed, &["w01,w02,w03", "--sh", "--", code]);
    assert_eq!(out.code(), 5, "{}", out.stderr);
    assert!(
        out.stderr.contains(": 0 ok, 3 failed (w01 w02 w03)"),
        "{}",
        out.stderr
    );
    let out = exec(&bed, &["w01,w03", "--sh", "--", code]);
    assert_eq!(out.code(), 3, "{}", out.stderr);
    let out = exec(&bed, &["w01,w02", "true"]);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(out.stderr.ends_with(": 2 ok (w01 w02)\n"), "{}", out.stderr);
    // A timeout outranks remote statuses; a connection failure outranks a timeout.
    let out = exec(
        &bed,
        &[
            "--timeout",
            "1",
            "w02,slow",
            "--sh",
            "--",
            "test -e ~/slow && sleep 5; exit 5",
        ],
    );
    assert_eq!(out.code(), 124, "{}", out.stderr);
    assert!(
        out.stderr.contains("1 failed (w02), 1 timed out (slow)"),
        "{}",
        out.stderr
    );
    let out = exec(
        &bed,
        &["--timeout", "1", "gone,slow", "--sh", "--", "sleep 5"],
    );
    assert_eq!(out.code(), 255, "{}", out.stderr);
}

#[test]
fn timeout_stops_the_slow_vm_without_holding_up_the_rest() {
    let bed = bed_with(6);
    let marker = format!("vtun-fanout-slow-{}", std::process::id());
    let script =
        format!("if [ -e ~/slow ]; then while :; do echo {marker}; sleep 0.2; done; fi; echo done");
    let list = [fleet(6), vec!["slow".into()]].concat().join(",");
    let t0 = Instant::now();
    let out = exec(&bed, &["--timeout", "3", &list, "--sh", "--", &script]);
    let took = t0.elapsed();
    assert_eq!(out.code(), 124, "{}", out.stderr);
    for name in fleet(6) {
        assert!(
            out.stdout_str().contains(&format!("{name}: done\n")),
            "{name}"
        );
    }
    assert!(out.stdout_str().contains(&format!("slow: {marker}\n")));
    assert!(
        took < Duration::from_secs(20),
        "the run waited for the slow VM: {took:?}"
    );
    assert!(
        out.stderr.contains(&format!(
            "6 ok ({}), 1 timed out (slow)",
            fleet(6).join(" ")
        )),
        "{}",
        out.stderr
    );
    wait_until(
        Duration::from_secs(10),
        "the slow VM's command to end",
        || {
            !Command::new("pgrep")
                .args(["-f", &marker])
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success()
        },
    );
}

#[test]
fn gather_groups_identical_output_and_json_gives_one_object_per_vm() {
    let bed = bed_with(6);
    let list = fleet(6).join(",");
    let out = exec(&bed, &["--gather", &list, "--sh", "--", "cat ~/who; echo"]);
    out.assert_ok();
    assert_eq!(
        out.stdout_str(),
        "----------------\nw01,w03,w05 (3)\n----------------\na\n\
         ----------------\nw02,w04,w06 (3)\n----------------\nb\n"
    );

    let out = exec(
        &bed,
        &[
            "--json",
            "w01,w02,gone",
            "--sh",
            "--",
            "cat ~/who; echo oops >&2; exit 2",
        ],
    );
    assert_eq!(out.code(), 255);
    let mut seen = BTreeMap::new();
    for line in out.stdout_str().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        seen.insert(v["name"].as_str().unwrap().to_string(), v);
    }
    assert_eq!(seen.len(), 3, "one line per VM: {}", out.stdout_str());
    assert_eq!(seen["w01"]["stdout"], "a");
    assert_eq!(seen["w02"]["stdout"], "b");
    assert_eq!(seen["w02"]["stderr"], "oops\n");
    assert_eq!(seen["w02"]["status"], 2);
    assert_eq!(seen["w02"]["outcome"], "failed");
    assert!(seen["w02"]["seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(seen["gone"]["outcome"], "unreachable");
    assert!(seen["gone"]["status"].is_null());
    assert!(seen["gone"]["error"].as_str().unwrap().len() > 3);
}

#[test]
fn stdin_goes_to_no_vm_unless_broadcast() {
    let bed = bed_with(3);
    let list = fleet(3).join(",");
    let run = |args: &[&str]| {
        let mut cmd = bed.vtun();
        cmd.args(["exec"]).args(args).stdin(Stdio::piped());
        let mut child = Spawned::start(&mut cmd);
        let mut stdin = child.take_stdin();
        std::io::Write::write_all(&mut stdin, b"hello\nworld\n").unwrap();
        drop(stdin);
        child.wait(LIMIT)
    };
    let out = run(&["--stdin", &list, "cat"]);
    out.assert_ok();
    let mut lines: Vec<String> = out.stdout_str().lines().map(String::from).collect();
    lines.sort();
    let mut want: Vec<String> = fleet(3)
        .iter()
        .flat_map(|n| [format!("{n}: hello"), format!("{n}: world")])
        .collect();
    want.sort();
    assert_eq!(lines, want);
    // Without --stdin, `cat` sees EOF at once: nothing printed, nothing waits.
    let out = run(&[&list, "cat"]);
    out.assert_ok();
    assert_eq!(out.stdout_str(), "");
}

#[test]
fn hosts_file_with_comments_and_from_stdin() {
    let bed = bed_with(4);
    let file = bed.dir("lists").join("fleet.txt");
    std::fs::write(&file, "# the fleet\nw01\n\nw02   # second\n").unwrap();
    let out = exec(
        &bed,
        &[
            "--hosts",
            file.to_str().unwrap(),
            "--sh",
            "--",
            "cat ~/who; echo",
        ],
    );
    out.assert_ok();
    let mut lines: Vec<String> = out.stdout_str().lines().map(String::from).collect();
    lines.sort();
    assert_eq!(lines, ["w01: a", "w02: b"]);

    let mut cmd = bed.vtun();
    cmd.args(["exec", "--hosts", "-", "cat", "/dev/null"])
        .stdin(Stdio::piped());
    let mut child = Spawned::start(&mut cmd);
    let mut stdin = child.take_stdin();
    std::io::Write::write_all(&mut stdin, b"w03\nw04\n").unwrap();
    drop(stdin);
    let out = child.wait(LIMIT);
    out.assert_ok();
    assert!(out.stderr.ends_with(": 2 ok (w03 w04)\n"), "{}", out.stderr);

    std::fs::write(&file, "# nobody\n").unwrap();
    let out = exec(&bed, &["--hosts", file.to_str().unwrap(), "true"]);
    assert_eq!(out.code(), 1);
    assert!(out.stderr.contains("no VMs"), "{}", out.stderr);
}

fn vtun(bed: &TestBed, args: &[&str]) -> Out {
    run_with_timeout(bed.vtun().args(["--wait", "0.5"]).args(args), LIMIT)
}

#[test]
fn cp_pushes_to_every_vm_and_pulls_into_a_directory_per_vm() {
    let bed = bed_with(4);
    let src = bed.dir("src");
    let data = random_bytes(3 << 20, 7);
    std::fs::write(src.join("app.bin"), &data).unwrap();
    std::fs::write(src.join("conf"), "v=1\n").unwrap();
    // Every sshd of the bed is this machine: w01 (on a) and w02 (on b) write the same path at
    // once, which atomic renames make safe.
    let remote = bed.dir("vms");
    std::fs::create_dir_all(remote.join("w01")).unwrap();
    let list = fleet(4).join(",");
    let to = format!("w01,w02:{}/", remote.join("w01").display());
    let out = vtun(
        &bed,
        &[
            "cp",
            src.join("app.bin").to_str().unwrap(),
            src.join("conf").to_str().unwrap(),
            &to,
        ],
    );
    out.assert_ok();
    assert!(out.stderr.ends_with(": 2 ok (w01 w02)\n"), "{}", out.stderr);
    assert_eq!(hash_file(&remote.join("w01/app.bin")), hash(&data));
    assert_eq!(
        std::fs::read_to_string(remote.join("w01/conf")).unwrap(),
        "v=1\n"
    );

    // Pull: DIR/<name>/… for each VM, as pslurp does.
    let got = bed.dir("got");
    let from = format!("{list}:{}", remote.join("w01/app.bin").display());
    let out = vtun(&bed, &["cp", &from, got.to_str().unwrap()]);
    out.assert_ok();
    for name in fleet(4) {
        assert_eq!(
            hash_file(&got.join(&name).join("app.bin")),
            hash(&data),
            "{name}"
        );
    }
    // One VM that has no such file: it is named, the others still arrive.
    std::fs::remove_dir_all(&got).unwrap();
    let from = format!("w01,gone:{}", remote.join("w01/app.bin").display());
    let out = vtun(&bed, &["cp", &from, got.to_str().unwrap()]);
    assert_eq!(out.code(), 255, "{}", out.stderr);
    assert_eq!(hash_file(&got.join("w01/app.bin")), hash(&data));
    assert!(
        out.stderr.contains("1 ok (w01), 1 unreachable (gone)"),
        "{}",
        out.stderr
    );
}

#[test]
fn sync_to_several_vms_including_two_that_share_a_directory() {
    let bed = bed_with(4);
    let src = bed.dir("tree");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/big"), random_bytes(2 << 20, 3)).unwrap();
    std::fs::write(src.join("small"), "s\n").unwrap();
    let dst = bed.dir("shared");
    // w01 and w03 are the same sshd and the same directory: two syncs into one place at once.
    let to = format!("w01,w02,w03,w04:{}/", dst.display());
    let out = vtun(&bed, &["sync", "-i", &format!("{}/", src.display()), &to]);
    out.assert_ok();
    assert!(
        out.stderr.ends_with(": 4 ok (w01 w02 w03 w04)\n"),
        "{}",
        out.stderr
    );
    assert_eq!(
        hash_file(&dst.join("sub/big")),
        hash_file(&src.join("sub/big"))
    );
    for line in out.stdout_str().lines() {
        let (name, _) = line.split_once(": ").unwrap();
        assert!(fleet(4).contains(&name.to_string()), "{line}");
    }
    let again = vtun(&bed, &["sync", "-i", &format!("{}/", src.display()), &to]);
    again.assert_ok();
    assert_eq!(again.stdout_str(), "", "a rerun changes nothing on any VM");

    // --hosts with `:PATH`.
    let file = bed.dir("lists").join("hosts");
    std::fs::write(&file, "w02\nw04\n").unwrap();
    let dst2 = bed.dir("other");
    let out = vtun(
        &bed,
        &[
            "sync",
            "--hosts",
            file.to_str().unwrap(),
            &format!("{}/", src.display()),
            &format!(":{}/", dst2.display()),
        ],
    );
    out.assert_ok();
    assert_eq!(std::fs::read_to_string(dst2.join("small")).unwrap(), "s\n");
}

#[test]
fn glob_patterns_match_vers_aliases_and_label_lines_with_them() {
    let bed = bed_with(4);
    std::fs::create_dir_all(bed.home.join(".vers")).unwrap();
    std::fs::write(
        bed.home.join(".vers/aliases.json"),
        r#"{"worker-1": "w01", "worker-2": "w02", "db": "w03"}"#,
    )
    .unwrap();
    let out = exec(&bed, &["worker-*", "--sh", "--", "cat ~/who; echo"]);
    out.assert_ok();
    let mut lines: Vec<String> = out.stdout_str().lines().map(String::from).collect();
    lines.sort();
    assert_eq!(lines, ["worker-1: a", "worker-2: b"]);
    let out = exec(&bed, &["web-*", "true"]);
    assert_eq!(out.code(), 1);
    assert!(
        out.stderr.contains("no vers alias matches \"web-*\""),
        "{}",
        out.stderr
    );
}

#[test]
fn cp_json_gives_one_object_per_vm_with_its_name_and_timeout_stops_a_copy() {
    let bed = bed_with(2);
    let src = bed.dir("src");
    std::fs::write(src.join("f"), "data\n").unwrap();
    let to = bed.dir("to");
    let out = vtun(
        &bed,
        &[
            "cp",
            "--json",
            src.join("f").to_str().unwrap(),
            &format!("w01,w02:{}/", to.display()),
        ],
    );
    out.assert_ok();
    let mut names: Vec<String> = out
        .stdout_str()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["files"], 1, "{l}");
            v["name"].as_str().unwrap().to_string()
        })
        .collect();
    names.sort();
    assert_eq!(names, ["w01", "w02"]);

    // A copy that cannot finish in time: counted as timed out, exit 124, nothing under the
    // final name.
    let big = src.join("big");
    std::fs::write(&big, random_bytes(64 << 20, 5)).unwrap();
    let slow = TestBed::builder()
        .vm("a")
        .names(["s1", "s2"], "a")
        .delay_ms(200)
        .start();
    let dst = slow.dir("dst");
    let out = run_with_timeout(
        slow.vtun()
            .args([
                "--wait",
                "0.5",
                "cp",
                "--timeout",
                "1",
                big.to_str().unwrap(),
            ])
            .arg(format!("s1,s2:{}/", dst.display())),
        LIMIT,
    );
    assert_eq!(out.code(), 124, "{}", out.stderr);
    assert!(out.stderr.contains("2 timed out (s1 s2)"), "{}", out.stderr);
    assert!(
        !dst.join("big").exists(),
        "no partial file under the final name"
    );
}
