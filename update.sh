#!/usr/bin/env bash
# Update SPN VPN Bot in place; run as root:  sudo /opt/vpn-bot/update.sh
#
# Backs up the database, pulls (fast-forward only), installs requirements, migrates, restarts the
# service and waits until it is active and the doctor's update gate passes (`python doctor.py --update`:
# settings, the database and its migrations, backups, Telegram). An outage of the panel or Crypto Pay is
# shown as a warning: an update cannot cause it, and a rollback would not cure it. If any step after
# the pull fails, it goes back to the previous commit, restarts that, and exits 1.
# Packages come from requirements.lock, every file checked against its hash.
# Settings (environment): APP_USER (vpnbot), SERVICE (vpn-bot), WAIT_SECONDS (60), PYTHON, PIP.
set -euo pipefail

APP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
APP_USER=${APP_USER:-vpnbot}
SERVICE=${SERVICE:-vpn-bot}
WAIT_SECONDS=${WAIT_SECONDS:-60}
PYTHON=${PYTHON:-$APP_DIR/.venv/bin/python}
PIP=${PIP:-$APP_DIR/.venv/bin/pip}
MIGRATE='import os; os.umask(0o077); import config, models; s = config.load(); models.connect_database(s.database_url); models.create_schema()'

say() { printf '==> %s\n' "$*"; }
fail() { printf 'update.sh: %s\n' "$*" >&2; exit 1; }

# Run as the bot's user, so files the step creates (SQLite journal, backups) stay the bot's.
as_app() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u "$APP_USER" -- "$@"
    else
        "$@"
    fi
}

install_requirements() {
    "$PIP" install -q --disable-pip-version-check --require-hashes -r requirements.lock
}

# Wait until the service is active and the doctor's update gate passes, at most WAIT_SECONDS.
healthy() {
    local deadline=$((SECONDS + WAIT_SECONDS))
    while true; do
        # active before and after the check: a bot that crashes at start is restarting by then
        if systemctl is-active --quiet "$SERVICE" && as_app "$PYTHON" doctor.py --update >"$check_log" 2>&1 \
                && systemctl is-active --quiet "$SERVICE"; then
            return 0
        fi
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 2
    done
}

rollback() {
    printf 'update.sh: %s; rolling back to %s\n' "$1" "${previous:0:12}" >&2
    local said
    said=$(cat "$check_log")
    git reset -q --hard "$previous"
    install_requirements || printf 'update.sh: reinstalling the old requirements failed\n' >&2
    systemctl restart "$SERVICE" || true
    if healthy; then
        printf 'update.sh: rolled back; the bot runs %s again\n' "${previous:0:12}" >&2
    else
        printf 'update.sh: rolled back, but the bot is still not up: see journalctl -u %s -n 50\n' "$SERVICE" >&2
    fi
    if [[ -n $said ]]; then
        printf '\nWhat the doctor said about the new version:\n%s\n' "$said" >&2
    fi
    printf '\nThe backup taken before the update: %s\n' "$backup" >&2
    printf 'update.sh: update failed\n' >&2
    exit 1
}

# Everything runs from this function, read whole before it starts: git rewrites this very file.
main() {
    cd "$APP_DIR"
    [[ $(id -u) -eq 0 ]] || fail "run me as root (sudo $0)"
    if ! git diff --quiet || ! git diff --cached --quiet; then
        fail "$APP_DIR has local changes to tracked files; commit or discard them first (git status)"
    fi
    check_log=$(mktemp)
    trap 'rm -f "$check_log"' EXIT

    previous=$(git rev-parse HEAD)
    say "backing up the database"
    backup=$(as_app "$PYTHON" backup.py make) || fail "the backup failed; nothing was changed"
    say "backup: $backup"

    say "pulling"
    git pull -q --ff-only || fail "git pull --ff-only failed (diverged branch or no network?); nothing was changed"
    local current
    current=$(git rev-parse HEAD)
    if [[ $current == "$previous" ]]; then
        say "already up to date at ${previous:0:12}"
        exit 0
    fi
    say "updating ${previous:0:12} -> ${current:0:12}"

    install_requirements || rollback "installing the requirements failed"
    as_app "$PYTHON" -c "$MIGRATE" || rollback "migrating the database failed"
    systemctl restart "$SERVICE" || rollback "systemctl restart $SERVICE failed"
    healthy || rollback "the bot did not come up (active and passing doctor.py --update) within ${WAIT_SECONDS}s"
    say "updated to ${current:0:12}; the bot is up"
    if grep -q '^WARN' "$check_log"; then
        printf '\nWarnings (not caused by the update; the bot serves what it can meanwhile):\n'
        grep '^WARN' "$check_log"
    fi
    exit 0
}

main "$@"
