#!/usr/bin/env bash
# cluster/down.sh: see local_cluster.py. Runs with the repository's .venv when there is one.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${AMALGAM_PYTHON:-$here/../.venv/bin/python}
[ -x "$py" ] || py=python3
exec "$py" "$here/local_cluster.py" down "$@"
