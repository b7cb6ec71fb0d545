#!/usr/bin/env bash
# Install the pinned environment into .venv and run the offline demo (the README's main command).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
exec .venv/bin/python demo.py "$@"
