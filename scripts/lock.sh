#!/usr/bin/env bash
# Re-lock the dependency tree with hashes, after a change to requirements.txt or requirements-dev.txt:
#
#   scripts/lock.sh            writes requirements.lock and requirements-dev.lock; commit all four files
#
# requirements*.txt hold the packages we use, pinned by hand; the .lock files hold every package they
# pull in, each with its sha256 hashes, and are what run.sh, test.sh, deploy.sh and update.sh install
# (pip install --require-hashes). pip-tools runs in a throwaway venv, for Python 3.11 (the target).
set -euo pipefail
cd "$(dirname "$0")/.."

PIP_TOOLS=pip-tools==7.6.2
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
tools=$(mktemp -d /tmp/spn-lock.XXXXXX)
trap 'rm -rf "$tools"' EXIT

"$PYTHON" -m venv "$tools"
"$tools/bin/pip" install --quiet --disable-pip-version-check "$PIP_TOOLS"
for name in requirements requirements-dev; do
    # --allow-unsafe: setuptools and the like are locked too; no index or find-links of this machine is written
    CUSTOM_COMPILE_COMMAND=scripts/lock.sh "$tools/bin/pip-compile" --quiet --generate-hashes --allow-unsafe \
        --strip-extras --no-emit-index-url --no-emit-find-links --resolver=backtracking \
        --output-file "$name.lock" "$name.txt"
done
echo "lock.sh: wrote requirements.lock and requirements-dev.lock"
