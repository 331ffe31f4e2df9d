#!/usr/bin/env bash
# Set up (virtualenv, requirements, .env from the example) and run the bot in the foreground.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
if [ ! -f .env ]; then
    install -m 600 .env.example .env
    echo "Created .env from .env.example: fill in your tokens, then run this again." >&2
fi
exec .venv/bin/python bot.py "$@"
