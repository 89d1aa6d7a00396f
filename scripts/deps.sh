# Shared by test.sh, demo.sh and bench.sh: make sure the system tools the test bed runs exist.
# As root on Debian/Ubuntu they are installed with apt-get; otherwise the missing ones are named.

missing_packages() {
    local need=()
    [ -x /usr/sbin/sshd ] || [ -x /usr/local/sbin/sshd ] || need+=(openssh-server)
    command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
    command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
    command -v rsync >/dev/null 2>&1 || need+=(rsync)
    command -v tmux >/dev/null 2>&1 || need+=(tmux)
    command -v openssl >/dev/null 2>&1 || need+=(openssl)
    [ -x /usr/bin/time ] || need+=(time)
    command -v pgrep >/dev/null 2>&1 || need+=(procps)
    command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
    command -v setsid >/dev/null 2>&1 || need+=(util-linux)
    # The full-disk and read-only cases mount a small tmpfs (as root, as CI runs).
    command -v mount >/dev/null 2>&1 || need+=(mount)
    # Forward tests fetch through -L/-D with curl; the master's uid check runs a client as
    # nobody with the system python3 (runuser is util-linux).
    command -v curl >/dev/null 2>&1 || need+=(curl)
    [ -x /usr/bin/python3 ] || need+=(python3-minimal)
    command -v runuser >/dev/null 2>&1 || need+=(util-linux)
    # Benchmarks only (bench.sh sets VTUN_BENCH_DEPS): pssh for the fan-out comparison.
    if [ -n "${VTUN_BENCH_DEPS:-}" ]; then
        command -v parallel-ssh >/dev/null 2>&1 || need+=(pssh)
    fi
    if [ "${#need[@]}" -gt 0 ]; then
        printf '%s\n' "${need[@]}" | sort -u | tr '\n' ' '
    fi
}

ensure_test_deps() {
    local need
    need="$(missing_packages)"
    [ -z "$need" ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing: $need"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # shellcheck disable=SC2086
        apt-get install -y -qq --no-install-recommends $need >/dev/null
    else
        echo "missing system packages: $need" >&2
        echo "install them (e.g. sudo apt-get install $need) and run again" >&2
        exit 1
    fi
    need="$(missing_packages)"
    if [ -n "$need" ]; then
        echo "still missing after install: $need" >&2
        exit 1
    fi
}
