#!/usr/bin/env bash
# Set up .venv if needed, then run the study (extra arguments go to reproduce.py, e.g. --quick).
# MNIST comes from ../shared/mnist when that folder exists, otherwise torchvision downloads it into data/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
data=data
if [ -d ../shared/mnist ]; then data=../shared/mnist; fi
exec .venv/bin/python reproduce.py --data-dir "$data" "$@"
