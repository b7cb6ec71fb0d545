#!/usr/bin/env bash
# Install the pinned environment into .venv and run the test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
# Headless Chromium for the browser test of the Gradio apps (Debian package; needs root, as in CI).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "note: chromium is not installed and this is not root; the browser test will be skipped" >&2
    fi
fi
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements-test.txt
exec .venv/bin/python -m pytest -q "$@"
