#!/usr/bin/env bash
# A local tour of vtun on the built-in test bed: a real OpenSSH sshd (the "VM" demo.vm.test) on a
# loopback port behind `vtun gateway --self-signed`, then the things users do with it.
# Nothing leaves this machine; everything is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/deps.sh
source scripts/deps.sh
ensure_test_deps

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

echo "== building vtun"
cargo build -q
VTUN="$PWD/target/debug/vtun"

WORK="$(mktemp -d -t vtun-demo.XXXXXX)"
PIDS=()
cleanup() {
    # The connection masters the demo's commands left behind (their sockets are under $WORK).
    XDG_RUNTIME_DIR="$WORK/run" "$VTUN" master stop 2>/dev/null || true
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# The "VM": sshd with its own host key, accepting a throwaway user key.
[ "$(id -u)" = 0 ] && mkdir -p /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$WORK/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/id_ed25519"
cp "$WORK/id_ed25519.pub" "$WORK/authorized_keys"
PORT=$(( 20000 + RANDOM % 20000 ))
cat > "$WORK/sshd_config" <<CONF
Port $PORT
ListenAddress 127.0.0.1
HostKey $WORK/host_key
PidFile none
AuthorizedKeysFile $WORK/authorized_keys
StrictModes no
UsePAM no
PermitRootLogin yes
PasswordAuthentication no
KbdInteractiveAuthentication no
Subsystem sftp internal-sftp
LogLevel ERROR
SetEnv HOME=$WORK/vm-home
CONF
mkdir -p "$WORK/vm-home"
SSHD=$(command -v sshd || echo /usr/sbin/sshd)
"$SSHD" -D -e -f "$WORK/sshd_config" 2>"$WORK/sshd.log" &
PIDS+=($!)

# The edge: TLS with SNI routing, a throwaway CA created on first start.
"$VTUN" gateway --listen 127.0.0.1:0 --print-addr --self-signed "$WORK/ca" \
    --route "*.vm.test=127.0.0.1:$PORT" >"$WORK/gateway.addr" 2>"$WORK/gateway.log" &
PIDS+=($!)
for _ in $(seq 100); do [ -s "$WORK/gateway.addr" ] && break; sleep 0.05; done
GATEWAY=$(head -1 "$WORK/gateway.addr")

# Point vtun at the local edge; on a real Vers account none of this is needed.
export VTUN_CONNECT="$GATEWAY" VTUN_CA_FILE="$WORK/ca/ca.pem" VTUN_DOMAIN=vm.test
export VTUN_KNOWN_HOSTS="$WORK/known_hosts" VTUN_IDENTITY="$WORK/id_ed25519" VTUN_USER="$(id -un)"
# Connection masters (reuse between commands) keep their sockets with the demo, not in yours.
mkdir -p "$WORK/run" && chmod 700 "$WORK/run" && export XDG_RUNTIME_DIR="$WORK/run"
SSH=(ssh -F /dev/null -o "ProxyCommand=$VTUN proxy %h" -o UserKnownHostsFile="$WORK/ssh_known_hosts"
     -o StrictHostKeyChecking=accept-new -o LogLevel=ERROR -i "$WORK/id_ed25519" -l "$(id -un)")
echo "== test bed up: sshd on 127.0.0.1:$PORT behind vtun gateway on $GATEWAY"

say "ssh -o ProxyCommand=\"vtun proxy %h\" demo.vm.test 'echo hello from \$(hostname)'"
"${SSH[@]}" demo.vm.test 'echo hello from $(hostname)'

say "vtun proxy untrusted.example.org   # an unknown name: one clear line, exit 255"
"$VTUN" proxy untrusted.example.org </dev/null || echo "(exit $?)"

say "vtun ssh-config   # append to ~/.ssh/config and plain ssh/scp/rsync just work"
"$VTUN" ssh-config

if "$VTUN" exec --help >/dev/null 2>&1 && "$VTUN" exec demo -- true 2>/dev/null; then
    say "vtun exec demo -- uname -sm"
    "$VTUN" exec demo -- uname -sm
    say "vtun exec demo -- sh -c 'exit 3'   # the remote exit status comes back"
    "$VTUN" exec demo -- sh -c 'exit 3' || echo "(exit $?)"
fi

if "$VTUN" cp --help >/dev/null 2>&1 && "$VTUN" exec demo -- true 2>/dev/null; then
    mkdir -p "$WORK/dist/assets" && head -c 8M /dev/urandom >"$WORK/dist/app.bin"
    echo '<h1>hi</h1>' >"$WORK/dist/assets/index.html"
    say "vtun cp -rp ./dist demo:$WORK/deployed"
    "$VTUN" cp -rp "$WORK/dist" "demo:$WORK/deployed"
    ls -lR "$WORK/deployed" | sed -n 1,12p
fi

if "$VTUN" sync --help >/dev/null 2>&1 && "$VTUN" exec demo -- true 2>/dev/null; then
    echo 'changed' >>"$WORK/dist/assets/index.html"
    say "vtun sync -i ./dist/ demo:$WORK/deployed/   # only what changed moves"
    "$VTUN" sync -i "$WORK/dist/" "demo:$WORK/deployed/" || true
fi

echo
echo "== done; everything under $WORK is removed now"
