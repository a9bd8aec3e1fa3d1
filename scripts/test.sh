#!/usr/bin/env bash
# Set up .venv if needed, then run the test suite (extra arguments go to pytest). A tuning test starts a real
# PostgreSQL server: where initdb is missing and this runs as root, install it with apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
for dir in /usr/lib/postgresql/*/bin; do  # Debian's packages keep initdb off the PATH
    if [ -x "$dir/initdb" ]; then PATH="$PATH:$dir"; fi
done
if ! command -v initdb >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql
    for dir in /usr/lib/postgresql/*/bin; do PATH="$PATH:$dir"; done
fi
export PATH
exec .venv/bin/python -m pytest -q "$@"
