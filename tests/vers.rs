//! vtun as a Vers user meets it: VM names from the vers CLI (aliases, HEAD), keys from the Vers
//! API and its shared cache, and VMs that are paused or do not exist — against real sshd behind
//! the gateway and a stand-in Vers API (tests/support/vers_api.rs) that records every request.
//!
//! Every test runs the built binary with the bed's clean environment (HOME, TMPDIR and VTUN_*
//! set, SSH_AUTH_SOCK removed), so nothing in-process reads the developer's environment and
//! `rerun_in_clean_env` is not needed here.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use support::vers_api::{FakeVm, VersApi};
use support::*;

const LIMIT: Duration = Duration::from_secs(30);
/// A VM id shaped like the API's: the bed routes `<id>.vm.test` to its sshd.
const ID: &str = "5d3e9a4c-1b2f-4c6d-8e7f-0a1b2c3d4e5f";
const API_KEY: &str = "vers-test-key-8f2e1c";

fn write_aliases(bed: &TestBed, json: &str) {
    let dir = bed.home.join(".vers");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("aliases.json"), json).expect("aliases");
}

fn cache_file(bed: &TestBed, id: &str) -> PathBuf {
    bed.root
        .join("tmp")
        .join("vers-ssh-keys")
        .join(format!("{id}.key"))
}

/// The API knows VM `ID`, running, with the bed's user key as its key.
fn api_with_vm(bed: &TestBed, state: &str) -> VersApi {
    let api = VersApi::start(API_KEY);
    api.add_vm(
        ID,
        FakeVm {
            state: state.into(),
            private_key: read(&bed.user_key),
            on_resume: Some(bed.vm(ID).power()),
        },
    );
    api
}

/// `vtun` with no key configured, the API at `api` and the API key in VERS_API_KEY.
fn vtun_api(bed: &TestBed, api: &VersApi) -> Command {
    let mut cmd = bed.vtun_bare();
    cmd.env("VERS_URL", api.url()).env("VERS_API_KEY", API_KEY);
    cmd
}

fn echo(mut cmd: Command, vm: &str, word: &str) -> Out {
    cmd.args(["exec", vm, "--", "echo", word]);
    run_with_timeout(&mut cmd, LIMIT)
}

#[test]
fn an_alias_names_the_vm_and_the_pin_uses_its_real_name() {
    let bed = TestBed::builder().vm(ID).start();
    write_aliases(&bed, &format!(r#"{{"golden-builder": "{ID}"}}"#));
    let out = echo(bed.vtun(), "golden-builder", "hi");
    out.assert_ok();
    assert_eq!(out.stdout_str(), "hi\n");
    let pins = read(&bed.known_hosts);
    assert!(pins.contains(&format!("{ID}.{DOMAIN}")), "pinned: {pins}");
    assert!(
        !pins.contains("golden"),
        "the alias is never pinned: {pins}"
    );

    // cp and sync operands resolve the alias too.
    let src = bed.dir("src").join("f.txt");
    std::fs::write(&src, "through the alias\n").expect("write");
    let dst = bed.dir("dst").join("f.txt");
    let mut cmd = bed.vtun();
    cmd.arg("cp")
        .arg(&src)
        .arg(format!("golden-builder:{}", dst.display()));
    run_with_timeout(&mut cmd, LIMIT).assert_ok();
    assert_eq!(read(&dst), "through the alias\n");

    // A name that is not an alias passes through unchanged: an unknown VM, as before.
    let mut cmd = bed.vtun();
    cmd.args(["--wait", "0", "exec", "golden", "--", "true"]);
    let out = run_with_timeout(&mut cmd, LIMIT);
    assert_eq!(out.code(), 255, "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("golden.{DOMAIN}")),
        "{}",
        out.stderr
    );
}

#[test]
fn head_names_the_vm_and_vtun_ssh_without_a_vm_uses_it() {
    let bed = TestBed::builder().vm(ID).start();
    write_aliases(&bed, &format!(r#"{{"worker-3": "{ID}"}}"#));
    let project = bed.dir("project");
    std::fs::create_dir_all(project.join(".vers")).expect("mkdir");
    // HEAD may hold an alias, with whitespace around it.
    std::fs::write(project.join(".vers").join("HEAD"), " worker-3\n").expect("HEAD");

    let mut cmd = bed.vtun();
    cmd.current_dir(&project);
    let out = echo(cmd, "HEAD", "from-head");
    out.assert_ok();
    assert_eq!(out.stdout_str(), "from-head\n");

    // `vtun ssh` with no VM: a shell on HEAD's VM (commands on stdin, no terminal).
    let script = bed.root.join("script.sh");
    std::fs::write(&script, "echo shell-on-head; exit 3\n").expect("script");
    let mut cmd = bed.vtun();
    cmd.current_dir(&project)
        .arg("ssh")
        .stdin(std::fs::File::open(&script).expect("open"));
    let out = run_with_timeout(&mut cmd, LIMIT);
    assert_eq!(out.code(), 3, "{}", out.stderr);
    assert_eq!(out.stdout_str(), "shell-on-head\n");
    assert!(read(&bed.known_hosts).contains(&format!("{ID}.{DOMAIN}")));
}

#[test]
fn a_missing_head_or_a_broken_aliases_file_is_one_clear_line() {
    let bed = TestBed::builder().vm(ID).start();
    let empty = bed.dir("no-head-here");
    let mut cmd = bed.vtun();
    cmd.current_dir(&empty).args(["ssh"]);
    let out = run_with_timeout(&mut cmd, LIMIT);
    assert_eq!(out.code(), 1);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.starts_with("vtun: "), "{}", out.stderr);
    assert!(out.stderr.contains(".vers/HEAD"), "{}", out.stderr);

    write_aliases(&bed, "{not json");
    let out = echo(bed.vtun(), "anything", "x");
    assert_eq!(out.code(), 1);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("aliases.json"), "{}", out.stderr);
}

#[test]
fn the_key_is_fetched_cached_0600_and_then_used_without_asking_again() {
    let bed = TestBed::builder().vm(ID).start();
    let api = api_with_vm(&bed, "running");
    let cache = cache_file(&bed, ID);
    assert!(!cache.exists());

    // Loudest logging: neither the API key nor the VM's key may show up.
    let mut cmd = vtun_api(&bed, &api);
    cmd.env("RUST_LOG", "trace").arg("-vvv");
    let out = echo(cmd, ID, "fetched");
    out.assert_ok();
    assert_eq!(out.stdout_str(), "fetched\n");
    assert_eq!(api.lines(), [format!("GET /api/v1/vm/{ID}/ssh_key")]);
    let auth = api.requests()[0].authorization.clone();
    assert_eq!(auth.as_deref(), Some(format!("Bearer {API_KEY}").as_str()));
    assert!(!out.stderr.contains(API_KEY), "API key in logs");
    let key_body = read(&bed.user_key);
    let secret_line = key_body.lines().nth(1).expect("key body");
    assert!(!out.stderr.contains(secret_line), "private key in logs");

    // The shared cache: the API's key, 0600, in a 0700 directory it created.
    assert_eq!(read(&cache), key_body);
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode();
    assert_eq!(mode(&cache) & 0o777, 0o600);
    assert_eq!(mode(cache.parent().expect("dir")) & 0o777, 0o700);

    // The fast path: the cached key is accepted and the API is not asked at all.
    let before = api.requests().len();
    let out = echo(vtun_api(&bed, &api), ID, "cached");
    out.assert_ok();
    assert_eq!(out.stdout_str(), "cached\n");
    assert_eq!(api.requests().len(), before, "requests: {:?}", api.lines());
}

#[test]
fn a_cached_key_the_vm_refuses_is_fetched_again_once() {
    let bed = TestBed::builder().vm(ID).start();
    let api = api_with_vm(&bed, "running");
    // A key from before the VM was recreated.
    let cache = cache_file(&bed, ID);
    std::fs::create_dir_all(cache.parent().expect("dir")).expect("mkdir");
    keygen(&cache, "ed25519");
    let out = echo(vtun_api(&bed, &api), ID, "refetched");
    out.assert_ok();
    assert_eq!(out.stdout_str(), "refetched\n");
    assert_eq!(api.lines(), [format!("GET /api/v1/vm/{ID}/ssh_key")]);
    assert_eq!(read(&cache), read(&bed.user_key), "cache replaced");

    // If the API's key is refused too, vtun stops after that one fetch and says what it tried.
    let stale = bed.root.join("stale");
    keygen(&stale, "ed25519");
    api.add_vm(
        ID,
        FakeVm {
            state: "running".into(),
            private_key: read(&stale),
            on_resume: None,
        },
    );
    std::fs::copy(&stale, &cache).expect("copy");
    let before = api.requests().len();
    let out = echo(vtun_api(&bed, &api), ID, "x");
    assert_eq!(out.code(), 255, "{}", out.stderr);
    assert!(out.stderr.contains("permission denied"), "{}", out.stderr);
    assert_eq!(api.requests().len(), before + 1, "{:?}", api.lines());
}

#[test]
fn the_api_key_can_come_from_versrc() {
    let bed = TestBed::builder().vm(ID).start();
    let api = VersApi::start("from-versrc");
    api.add_vm(
        ID,
        FakeVm {
            state: "running".into(),
            private_key: read(&bed.user_key),
            on_resume: None,
        },
    );
    std::fs::write(bed.home.join(".versrc"), r#"{"apiKey": "from-versrc"}"#).expect("versrc");
    let mut cmd = bed.vtun_bare();
    cmd.env("VERS_URL", api.url());
    let out = echo(cmd, ID, "versrc");
    out.assert_ok();
    let auth = api.requests()[0].authorization.clone();
    assert_eq!(auth.as_deref(), Some("Bearer from-versrc"));
}

#[test]
fn a_wrong_api_key_is_named_as_such() {
    let bed = TestBed::builder().vm(ID).start();
    let api = api_with_vm(&bed, "running");
    let mut cmd = vtun_api(&bed, &api);
    cmd.env("VERS_API_KEY", "not-the-key");
    let out = echo(cmd, ID, "x");
    assert_eq!(out.code(), 255, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("the Vers API refused the key (check VERS_API_KEY or ~/.versrc)"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("401"),
        "no HTTP internals: {}",
        out.stderr
    );
    assert!(!cache_file(&bed, ID).exists());
}

#[test]
fn a_paused_vm_is_resumed_then_connected() {
    let mut bed = TestBed::builder().vm(ID).start();
    bed.vm_mut(ID).pause();
    let api = api_with_vm(&bed, "paused");
    write_aliases(&bed, &format!(r#"{{"sleepy": "{ID}"}}"#));
    let out = echo(vtun_api(&bed, &api), "sleepy", "awake");
    out.assert_ok();
    assert_eq!(out.stdout_str(), "awake\n");
    assert!(
        out.stderr.contains("sleepy is paused; resuming it"),
        "{}",
        out.stderr
    );
    let vm = format!("/api/v1/vm/{ID}");
    assert_eq!(
        api.lines(),
        [
            format!("GET {vm}/ssh_key"),
            format!("GET {vm}/status"),
            format!("PATCH {vm}/state"),
            format!("GET {vm}/ssh_key"),
        ]
    );
    assert_eq!(api.requests()[2].body, r#"{"state":"Running"}"#);
}

#[test]
fn a_paused_vm_with_a_cached_key_is_resumed_after_the_connection_fails() {
    let mut bed = TestBed::builder().vm(ID).start();
    bed.vm_mut(ID).pause();
    let api = api_with_vm(&bed, "sleeping");
    let cache = cache_file(&bed, ID);
    std::fs::create_dir_all(cache.parent().expect("dir")).expect("mkdir");
    std::fs::copy(&bed.user_key, &cache).expect("copy");
    let out = echo(vtun_api(&bed, &api), ID, "awake");
    out.assert_ok();
    assert!(
        out.stderr.contains("is sleeping; resuming it"),
        "{}",
        out.stderr
    );
    let vm = format!("/api/v1/vm/{ID}");
    assert_eq!(
        api.lines(),
        [format!("GET {vm}/status"), format!("PATCH {vm}/state")]
    );
}

#[test]
fn no_resume_says_how_to_resume_and_changes_nothing() {
    let mut bed = TestBed::builder().vm(ID).start();
    bed.vm_mut(ID).pause();
    let api = api_with_vm(&bed, "paused");
    let mut cmd = vtun_api(&bed, &api);
    cmd.env("VTUN_NO_RESUME", "true");
    let out = echo(cmd, ID, "x");
    assert_eq!(out.code(), 255, "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("vers resume {ID}")),
        "{}",
        out.stderr
    );
    assert!(!api.lines().iter().any(|l| l.starts_with("PATCH")));
    assert_eq!(api.state_of(ID).as_deref(), Some("paused"));
}

#[test]
fn an_unknown_vm_fails_at_once_with_its_name() {
    let bed = TestBed::builder().vm(ID).start();
    let api = api_with_vm(&bed, "running");
    let ghost = "0badc0de-0000-4000-8000-000000000000";
    write_aliases(&bed, &format!(r#"{{"ghost": "{ghost}"}}"#));
    let want = format!("vtun: no VM ghost ({ghost}) in this Vers account");

    // No cached key: the key request says 404.
    let t = Instant::now();
    let out = echo(vtun_api(&bed, &api), "ghost", "x");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(out.code(), 255, "{}", out.stderr);
    assert_eq!(out.stderr.trim_end(), want);

    // A cached key: the connection fails (nothing behind the name), then the status says 404,
    // long before the 30 s boot wait.
    let cache = cache_file(&bed, ghost);
    std::fs::create_dir_all(cache.parent().expect("dir")).expect("mkdir");
    std::fs::copy(&bed.user_key, &cache).expect("copy");
    let t = Instant::now();
    let out = echo(vtun_api(&bed, &api), "ghost", "x");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(out.code(), 255, "{}", out.stderr);
    assert_eq!(out.stderr.trim_end(), want);
    assert_eq!(
        api.lines().last().cloned(),
        Some(format!("GET /api/v1/vm/{ghost}/status"))
    );
}

#[test]
fn without_an_api_key_nothing_changes() {
    let bed = TestBed::builder().vm(ID).start();
    let api = api_with_vm(&bed, "running");
    // No key anywhere: vtun says so as before, and never calls the API.
    let mut cmd = bed.vtun_bare();
    cmd.env("VERS_URL", api.url());
    let out = echo(cmd, ID, "x");
    assert_eq!(out.code(), 255, "{}", out.stderr);
    assert!(out.stderr.contains("no keys found"), "{}", out.stderr);

    // An unknown VM waits out the boot race as before.
    let mut cmd = bed.vtun();
    cmd.env("VERS_URL", api.url())
        .args(["--wait", "1", "exec", "0badc0de", "--", "true"]);
    let out = run_with_timeout(&mut cmd, LIMIT);
    assert_eq!(out.code(), 255);
    assert!(
        out.stderr.contains("gave up after waiting"),
        "{}",
        out.stderr
    );
    assert!(api.requests().is_empty(), "{:?}", api.lines());
}

#[test]
fn vtun_proxy_resolves_an_alias_under_real_ssh() {
    let bed = TestBed::builder().vm(ID).start();
    write_aliases(&bed, &format!(r#"{{"golden": "{ID}"}}"#));
    let mut cmd = bed.ssh();
    cmd.args(["golden", "echo", "via-alias"]);
    let out = run_with_timeout(&mut cmd, LIMIT);
    out.assert_ok();
    assert_eq!(out.stdout_str(), "via-alias\n");
    // The edge saw the VM's real name as SNI.
    let log = bed.gateway_log();
    assert!(log.contains(&format!("{ID}.{DOMAIN}")), "{log}");
}

#[test]
fn a_booting_vm_is_waited_for_and_a_dead_one_is_one_line() {
    let mut bed = TestBed::builder().vm(ID).start();
    bed.vm_mut(ID).pause();
    let api = api_with_vm(&bed, "booting");
    let cache = cache_file(&bed, ID);
    std::fs::create_dir_all(cache.parent().expect("dir")).expect("mkdir");
    std::fs::copy(&bed.user_key, &cache).expect("copy");

    // Dead: said at once, nothing resumed.
    api.set_state(ID, "dead");
    let t = Instant::now();
    let out = echo(vtun_api(&bed, &api), ID, "x");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(out.code(), 255, "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("is dead"), "{}", out.stderr);

    // Booting: vtun keeps waiting (no resume) until sshd answers.
    api.set_state(ID, "booting");
    let before = api.requests().len();
    let power = bed.vm(ID).power();
    let boot = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(800));
        power.on();
    });
    let out = echo(vtun_api(&bed, &api), ID, "booted");
    boot.join().expect("boot thread");
    out.assert_ok();
    assert_eq!(out.stdout_str(), "booted\n");
    assert_eq!(
        api.lines()[before..],
        [format!("GET /api/v1/vm/{ID}/status")]
    );
}

#[test]
fn a_server_error_or_429_from_the_api_is_retried_once() {
    let bed = TestBed::builder().vm(ID).start();
    let api = api_with_vm(&bed, "running");
    api.fail_next(&[503]);
    let out = echo(vtun_api(&bed, &api), ID, "after-503");
    out.assert_ok();
    assert_eq!(api.requests().len(), 2, "{:?}", api.lines());

    // Two in a row: no key from the API, and the line says why (not "HTTP 503" alone).
    std::fs::remove_file(cache_file(&bed, ID)).expect("rm");
    api.fail_next(&[429, 500]);
    let out = echo(vtun_api(&bed, &api), ID, "x");
    assert_eq!(out.code(), 255, "{}", out.stderr);
    assert!(out.stderr.contains("the Vers API at"), "{}", out.stderr);
    assert_eq!(api.requests().len(), 4, "{:?}", api.lines());
}

#[test]
fn the_api_is_reached_over_tls_verified_with_the_ca_file() {
    // The bed's gateway terminates TLS for `localhost` with the bed's CA and hands the stream to
    // the stand-in API: the same roots as the edge, plus --ca-file.
    let api = VersApi::start(API_KEY);
    let bed = TestBed::builder()
        .vm(ID)
        .route(&format!("localhost=127.0.0.1:{}", api.port))
        .start();
    api.add_vm(
        ID,
        FakeVm {
            state: "running".into(),
            private_key: read(&bed.user_key),
            on_resume: None,
        },
    );
    let https = format!("https://localhost:{}", bed.gateway_addr.port());
    let mut cmd = bed.vtun_bare();
    cmd.env("VERS_URL", &https).env("VERS_API_KEY", API_KEY);
    let out = echo(cmd, ID, "over-tls");
    out.assert_ok();
    assert_eq!(api.lines(), [format!("GET /api/v1/vm/{ID}/ssh_key")]);

    // Without the CA the API's certificate is refused: no key, and nothing sent.
    std::fs::remove_file(cache_file(&bed, ID)).expect("rm");
    let mut cmd = bed.vtun_bare();
    cmd.env("VERS_URL", &https)
        .env("VERS_API_KEY", API_KEY)
        .env_remove("VTUN_CA_FILE")
        .args(["--insecure"]);
    let out = echo(cmd, ID, "x");
    assert_eq!(out.code(), 255, "{}", out.stderr);
    assert!(out.stderr.contains("cannot be reached"), "{}", out.stderr);
    assert_eq!(api.requests().len(), 1, "{:?}", api.lines());
}

/// Real ssh through `vtun proxy %h`, with the API in the environment ssh hands its ProxyCommand.
fn ssh_api(bed: &TestBed, api: &VersApi) -> Command {
    let mut cmd = bed.ssh();
    cmd.env("VERS_URL", api.url()).env("VERS_API_KEY", API_KEY);
    cmd
}

#[test]
fn ssh_through_vtun_proxy_resumes_a_paused_vm_transparently() {
    let mut bed = TestBed::builder().vm(ID).start();
    bed.vm_mut(ID).pause();
    let api = api_with_vm(&bed, "paused");
    write_aliases(&bed, &format!(r#"{{"sleepy": "{ID}"}}"#));
    let mut cmd = ssh_api(&bed, &api);
    cmd.args(["sleepy", "echo", "awake"]);
    let out = run_with_timeout(&mut cmd, LIMIT);
    out.assert_ok();
    assert_eq!(out.stdout_str(), "awake\n");
    assert!(
        out.stderr.contains("sleepy is paused; resuming it"),
        "{}",
        out.stderr
    );
    let vm = format!("/api/v1/vm/{ID}");
    assert_eq!(
        api.lines(),
        [format!("GET {vm}/status"), format!("PATCH {vm}/state")]
    );

    // Running now: the proxy makes no API request.
    let mut cmd = ssh_api(&bed, &api);
    cmd.args(["sleepy", "true"]);
    run_with_timeout(&mut cmd, LIMIT).assert_ok();
    assert_eq!(api.requests().len(), 2, "{:?}", api.lines());
}

#[test]
fn ssh_through_vtun_proxy_names_an_unknown_vm_at_once() {
    let bed = TestBed::builder().vm(ID).start();
    let api = api_with_vm(&bed, "running");
    let ghost = "0badc0de-0000-4000-8000-000000000000";
    write_aliases(&bed, &format!(r#"{{"ghost": "{ghost}"}}"#));
    let t = Instant::now();
    let mut cmd = ssh_api(&bed, &api);
    cmd.args(["ghost", "true"]);
    let out = run_with_timeout(&mut cmd, LIMIT);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(out.code(), 255, "{}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("vtun: no VM ghost ({ghost}) in this Vers account")),
        "{}",
        out.stderr
    );
}

#[test]
fn an_identity_the_vm_refuses_falls_back_to_the_api_key() {
    let bed = TestBed::builder().vm(ID).start();
    let api = api_with_vm(&bed, "running");
    let other = bed.root.join("other_key");
    keygen(&other, "ed25519");
    // With -i there is no fetch before dialing; the key comes after -i is refused.
    let mut cmd = vtun_api(&bed, &api);
    cmd.env("VTUN_IDENTITY", &other);
    let out = echo(cmd, ID, "fallback");
    out.assert_ok();
    assert_eq!(out.stdout_str(), "fallback\n");
    assert_eq!(api.lines(), [format!("GET /api/v1/vm/{ID}/ssh_key")]);

    // An accepted -i key: no request at all.
    let mut cmd = vtun_api(&bed, &api);
    cmd.env("VTUN_IDENTITY", &bed.user_key);
    std::fs::remove_file(cache_file(&bed, ID)).expect("rm");
    echo(cmd, ID, "x").assert_ok();
    assert_eq!(api.requests().len(), 1, "{:?}", api.lines());
}

#[test]
fn a_booting_vm_without_a_cached_key_gets_its_key_once_it_is_up() {
    let mut bed = TestBed::builder().vm(ID).start();
    bed.vm_mut(ID).pause();
    let api = api_with_vm(&bed, "booting");
    let power = bed.vm(ID).power();
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(800));
            api.set_state(ID, "running");
            power.on();
        });
        echo(vtun_api(&bed, &api), ID, "up")
    });
    out.assert_ok();
    assert_eq!(out.stdout_str(), "up\n");
    let vm = format!("/api/v1/vm/{ID}");
    assert_eq!(
        api.lines(),
        [
            format!("GET {vm}/ssh_key"),
            format!("GET {vm}/status"),
            format!("GET {vm}/ssh_key"),
        ]
    );
}

/// An ssh-agent with a key of its own: the agent is tried first, so when the VM accepts it no
/// key is fetched; when the VM refuses it, the API's key is fetched once and used.
#[test]
fn an_agent_key_the_vm_accepts_needs_no_api_request() {
    let bed = TestBed::builder().vm(ID).start();
    let api = api_with_vm(&bed, "running");
    let agent = Agent::start(&bed);
    agent.ssh_add(&bed, &bed.user_key);
    let mut cmd = vtun_api(&bed, &api);
    cmd.env("SSH_AUTH_SOCK", &agent.sock);
    let out = echo(cmd, ID, "agent");
    out.assert_ok();
    assert_eq!(out.stdout_str(), "agent\n");
    assert!(api.lines().is_empty(), "requests: {:?}", api.lines());
    assert!(!cache_file(&bed, ID).exists());

    // An agent key the VM refuses: then the API's key, once.
    agent.ssh_add(&bed, "-D");
    let other = bed.root.join("other_key");
    keygen(&other, "ed25519");
    agent.ssh_add(&bed, &other);
    let mut cmd = vtun_api(&bed, &api);
    cmd.env("SSH_AUTH_SOCK", &agent.sock);
    let out = echo(cmd, ID, "fetched");
    drop(agent);
    out.assert_ok();
    assert_eq!(api.lines(), [format!("GET /api/v1/vm/{ID}/ssh_key")]);
    assert!(cache_file(&bed, ID).exists());
}
