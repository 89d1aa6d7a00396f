#!/usr/bin/env bash
# Install what the tests need (real OpenSSH sshd/ssh, rsync, tmux), then run fmt, clippy and the
# whole test suite. This is the command CI runs (.ci/run) and the README's second command.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/deps.sh
source scripts/deps.sh
ensure_test_deps

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== cargo test"
cargo test
