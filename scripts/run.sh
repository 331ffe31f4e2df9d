#!/usr/bin/env bash
# Set up (virtualenv, locked requirements, .env from the example) and run the bot in the foreground.
#
# The first run creates .env and stops (exit 2): fill it in, then run this again. The bot runs only
# once every setting is well-formed and none still holds the example's placeholder.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# every package of the tree pinned, each file checked against its sha256 (scripts/lock.sh makes the lock)
.venv/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
if [ ! -f .env ]; then
    install -m 600 .env.example .env
    echo "Created .env from .env.example: fill in your settings (nano .env), then run scripts/run.sh again." >&2
    exit 2
fi
# one line naming a malformed setting or a placeholder left in .env, exit 2
.venv/bin/python config.py
exec .venv/bin/python bot.py "$@"
