#!/usr/bin/env bash
# Creates .venv and installs mmops with its dev tools, pinned by infra/constraints.txt.
# Re-installs only when pyproject.toml or the constraints change. Needs Python >= 3.11 and git.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

python="${PYTHON:-}"
if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null; then python="$candidate"; break; fi
  done
fi
"$python" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' 2>/dev/null || {
  echo "mmops needs Python >= 3.11 (set PYTHON=/path/to/python)" >&2; exit 1; }

want="$(cat pyproject.toml infra/constraints.txt | sha256sum | cut -c1-16)"
stamp=.venv/.mmops-installed
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing mmops into .venv (first run takes a minute or two)..."
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c infra/constraints.txt -e ".[all,dev,local]"
  echo "$want" > "$stamp"
fi

# promtool checks and unit-tests the alert rules (tests/code/test_infra_monitoring.py, which skips
# without it unless CI is set). Best effort, and only where apt-get can install Debian's
# `prometheus` package, which ships it: never fails the set-up.
if ! command -v promtool >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing promtool (Debian package prometheus)..."
  apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
      >/dev/null 2>&1
  }
  # Without package lists (a fresh container), fetch them once and try again.
  apt_install || { apt-get update -qq >/dev/null 2>&1 && apt_install; } \
    || echo "could not install promtool: the alert-rule tests will skip" >&2
fi
