#!/usr/bin/env bash
# The test command: the README's second command and exactly what CI runs (.ci/run).
#
# On a fresh Debian machine with Python >= 3.11 it does all the set-up itself: a .venv in the
# repository root (created when missing), the package installed with its dev and postgres
# extras as a *strict* editable install (a link tree that mypy can follow, unlike the default
# import-hook editable), then the gates in order, stopping at the first failure:
#   1. ruff        lint of the whole repository
#   2. mypy        --strict type check of the installed package `wakepoint`
#   3. coverage    100% branch coverage of kernel/ by the kernel tests alone
#   4. pytest      the whole suite, two workers
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

stage() { printf '\n==== %s ====\n' "$*"; }

stage "setup: .venv and a strict editable install of wakepoint[dev,postgres]"
if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q -e '.[dev,postgres]' --config-settings editable_mode=strict

stage "1/4 ruff check ."
.venv/bin/ruff check .

stage "2/4 mypy --strict -p wakepoint (the installed package)"
# From outside the repository, so `wakepoint` resolves to the install, not to this directory
# under another name; the config (strict = true) still comes from pyproject.toml.
(
    cd /tmp
    "$root/.venv/bin/python" -c 'import wakepoint; print("wakepoint resolves to", wakepoint.__file__)'
    "$root/.venv/bin/mypy" --config-file "$root/pyproject.toml" --cache-dir "$root/.mypy_cache" \
        -p wakepoint
)

stage "3/4 kernel coverage: 100% branch coverage of kernel/ by tests/test_kernel_*.py"
shopt -s nullglob
kernel_tests=(tests/test_kernel_*.py)
shopt -u nullglob
if (( ${#kernel_tests[@]} == 0 )); then
    echo "no tests/test_kernel_*.py: the kernel coverage gate has nothing to measure" >&2
    exit 1
fi
export COVERAGE_FILE="$root/.coverage.kernel"
rm -f "$COVERAGE_FILE" "$COVERAGE_FILE".*
# --source, not --include: pyproject.toml sets [tool.coverage.run] source, which makes coverage
# ignore --include; a source directory also counts kernel files that no test imported.
# --parallel-mode always writes suffixed data files, so `combine` has something to merge
# whatever pyproject.toml says about `parallel`.
.venv/bin/coverage run --branch --parallel-mode --source="$root/kernel" \
    -m pytest -q -p no:cacheprovider "${kernel_tests[@]}"
.venv/bin/coverage combine -q
.venv/bin/coverage report -m --fail-under=100
rm -f "$COVERAGE_FILE" "$COVERAGE_FILE".*
unset COVERAGE_FILE

stage "4/4 pytest: the whole suite"
# pytest exits 5 when it collects no tests; `set -e` treats that as the failure it is.
.venv/bin/pytest -q -n 2 -p no:cacheprovider

stage "all gates passed"
