#!/usr/bin/env bash
# The one test command: sets up what the tests need on a fresh machine (the Threat Bus venv),
# then runs rustfmt, clippy and every test. CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

shared="${SHARED_DIR:-../shared}"
venv="${THREATBUS_VENV:-.venv-threatbus}"
# An absolute THREATBUS_VENV (a venv shared by several checkouts) is used as it is.
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac
requirements="$shared/threatbus/requirements.txt"

# The real Threat Bus, pinned, in a venv of its own: reinstalled only when the pins change.
if [ ! -x "$venv/bin/threatbus" ] || ! cmp -s "$requirements" "$venv/requirements.txt"; then
    python="$(command -v python3.11 || command -v python3)"
    echo "== creating the Threat Bus venv in $venv ($($python --version))"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/requirements.txt"
fi
export THREATBUS_BIN="$venv/bin/threatbus"
export THREATBUS_PYTHON="$venv/bin/python"
export OPENCTI_SHARED_DIR="$(cd "$shared/opencti" && pwd)"
export THREATBUS_CONFIG="$(cd "$shared/threatbus" && pwd)/config.yaml"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# Doc tests are left out: the crate has no runnable examples, and an empty doc-test run
# would be the last "test result" line.
cargo test --locked --lib --bins --tests 2>&1 | tee "$log"
passed=$(grep -oE 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -oE '; [0-9]+ failed' "$log" | awk '{s+=$2} END {print s+0}')
echo "cargo: $passed passed, $failed failed"
