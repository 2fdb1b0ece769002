#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then the project's virtualenv:
#   - Debian packages, when missing and this user can install them: Chromium and its driver (the
#     demo's browser test) and PostgreSQL (the scale-out test's MLflow database);
#   - .venv with the project and its test tools, at the versions in constraints.txt.
# What could not be installed is said here, and recorded in .venv/missing-system-packages: the
# tests that need it are then skipped with that reason instead of failing.
set -euo pipefail
cd "$(dirname "$0")"

missing=()
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)

if [ ${#missing[@]} -gt 0 ]; then
  as_root=()
  [ "$(id -u)" = 0 ] || as_root=(sudo -n)
  if command -v apt-get >/dev/null && "${as_root[@]}" true 2>/dev/null; then
    echo "setup: installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    "${as_root[@]}" apt-get update -qq && "${as_root[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null \
      || echo "setup: apt-get could not install ${missing[*]}" >&2
  fi
  still=()
  for package in "${missing[@]}"; do
    case $package in
      chromium) command -v chromium >/dev/null || command -v chromium-browser >/dev/null || still+=(chromium) ;;
      chromium-driver) command -v chromedriver >/dev/null || still+=(chromium-driver) ;;
      postgresql) compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || still+=(postgresql) ;;
    esac
  done
  missing=("${still[@]+"${still[@]}"}")
fi

python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"

printf '%s\n' "${missing[@]+"${missing[@]}"}" | sed '/^$/d' > .venv/missing-system-packages
if [ -s .venv/missing-system-packages ]; then
  echo "setup: NOT installed: $(tr '\n' ' ' < .venv/missing-system-packages)(needs apt-get and root or passwordless sudo)." >&2
  echo "setup: the tests that need them will be skipped and say so; install them and run ./setup.sh again." >&2
fi
echo "setup: done. Run the tests with: .venv/bin/python -m pytest"
