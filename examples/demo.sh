#!/usr/bin/env bash
# The README's first command: wakepoint's core promise, end to end, on the embedded default.
#
# On a fresh Debian machine with Python >= 3.11 it sets everything up itself: a .venv in the
# repository root (created when missing), the package installed into it, then
# examples/ask_user.py demo, which runs three separate processes against one JSONL store in
# ./.wakepoint-demo: the first starts a run that pauses for a person's answer and exits, the
# second answers it and the run completes, the third verifies the run's signed hash chain
# with the store's key file.  Exits non-zero if any step fails.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "demo.sh: wakepoint needs Python >= 3.11; python3 is $(python3 --version 2>&1)" >&2
    exit 1
fi
if [[ ! -x .venv/bin/python ]]; then
    echo "creating .venv"
    if ! python3 -m venv .venv; then
        rm -rf .venv
        echo "demo.sh: 'python3 -m venv' failed; on Debian: apt-get install python3-venv" >&2
        exit 1
    fi
fi
echo "installing wakepoint into .venv"
.venv/bin/pip install -q .

rm -rf ./.wakepoint-demo
.venv/bin/python examples/ask_user.py demo --home ./.wakepoint-demo
