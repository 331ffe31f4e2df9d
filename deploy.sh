#!/usr/bin/env bash
# First install of SPN VPN Bot on a fresh Debian/Ubuntu server. Run as root from a clone:
#
#   git clone <repo> /root/vpn-bot && sudo /root/vpn-bot/deploy.sh
#
# Safe to run again: it never overwrites .env, the database or the backups, and it keeps the venv.
# Settings (environment): APP_DIR (/opt/vpn-bot), APP_USER (vpnbot), SYSTEMD_DIR (/etc/systemd/system),
# PYTHONS (the interpreters to try, first that APP_USER can run wins; python3.11 first).
set -euo pipefail

SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
APP_DIR=${APP_DIR:-/opt/vpn-bot}
APP_USER=${APP_USER:-vpnbot}
SYSTEMD_DIR=${SYSTEMD_DIR:-/etc/systemd/system}
SERVICE=vpn-bot
PYTHONS=${PYTHONS:-python3.11 /usr/bin/python3.11 /usr/local/bin/python3.11 python3 /usr/bin/python3}

say() { printf '==> %s\n' "$*"; }
fail() { printf 'deploy.sh: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || fail "run me as root (sudo $0)"
[[ $APP_DIR == /* ]] || fail "APP_DIR must be an absolute path, not $APP_DIR"

if ! getent passwd "$APP_USER" >/dev/null; then
    say "creating system user $APP_USER"
    useradd --system --user-group --home-dir "$APP_DIR" --no-create-home --shell /usr/sbin/nologin "$APP_USER"
fi

# The venv links to its interpreter, so the service user must be able to run that very file: root's
# own Python (a pyenv under /root, say) would leave the service unable to start.
pick_python() {
    local candidate path
    for candidate in $PYTHONS; do
        path=$(type -P "$candidate") || continue
        if runuser -u "$APP_USER" -- "$path" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
            echo "$path"
            return 0
        fi
        say "skipping $path: $APP_USER cannot run it (or it is older than 3.11)" >&2
    done
    return 1
}
PYTHON=$(pick_python) || fail "no Python 3.11 or newer that $APP_USER can run (tried: $PYTHONS); apt-get install python3.11"
say "using $PYTHON"

if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    say "installing python3-venv"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
fi

mkdir -p "$APP_DIR"
if [[ $SRC_DIR != "$(cd "$APP_DIR" && pwd)" ]]; then
    say "copying the code to $APP_DIR"
    # .git comes along, so update.sh can pull; the server's own files stay untouched.
    tar -C "$SRC_DIR" --exclude=./.venv --exclude=./.env --exclude=./data --exclude=./backups \
        --exclude='*.db' --exclude='*.db-wal' --exclude='*.db-shm' --exclude=__pycache__ \
        --exclude=.pytest_cache --exclude=.hypothesis -cf - . \
        | tar -C "$APP_DIR" --no-same-owner -xf -
fi

# The code stays root's; the bot may write only its database and its backups.
mkdir -p "$APP_DIR/data" "$APP_DIR/backups"
chown "$APP_USER:$APP_USER" "$APP_DIR/data" "$APP_DIR/backups"
chmod 700 "$APP_DIR/data" "$APP_DIR/backups"

if [[ -x $APP_DIR/.venv/bin/python ]] && ! runuser -u "$APP_USER" -- "$APP_DIR/.venv/bin/python" -c '' 2>/dev/null; then
    say "rebuilding the virtualenv: $APP_USER cannot run its interpreter"
    rm -rf "$APP_DIR/.venv"
fi
if [[ ! -x $APP_DIR/.venv/bin/python ]]; then
    say "creating the virtualenv"
    "$PYTHON" -m venv "$APP_DIR/.venv"
fi
say "installing requirements (hash-checked, from requirements.lock)"
"$APP_DIR/.venv/bin/pip" install -q --disable-pip-version-check --require-hashes -r "$APP_DIR/requirements.lock"

if [[ ! -e $APP_DIR/.env ]]; then
    say "creating $APP_DIR/.env from .env.example"
    # the SQLite database lives in data/, the one folder besides backups/ the service may write
    sed "s|^# DATABASE_URL=sqlite:.*|DATABASE_URL=sqlite:///$APP_DIR/data/bot.db|" "$APP_DIR/.env.example" \
        > "$APP_DIR/.env.new"
    chmod 600 "$APP_DIR/.env.new"
    chown "$APP_USER:$APP_USER" "$APP_DIR/.env.new"
    mv "$APP_DIR/.env.new" "$APP_DIR/.env"
    env_created=yes
else
    say "keeping the existing $APP_DIR/.env"
    env_created=no
fi

say "installing the systemd unit $SYSTEMD_DIR/$SERVICE.service"
sed -e "s|/opt/vpn-bot|$APP_DIR|g" -e "s|^User=vpnbot$|User=$APP_USER|" -e "s|^Group=vpnbot$|Group=$APP_USER|" \
    "$APP_DIR/$SERVICE.service" > "$SYSTEMD_DIR/$SERVICE.service"
chmod 644 "$SYSTEMD_DIR/$SERVICE.service"
systemctl daemon-reload
systemctl enable "$SERVICE"

# Check as the service user, with its own interpreter: the settings on a fresh .env, the doctor after.
cd "$APP_DIR"
if [[ $env_created == yes ]]; then
    say "checking that $APP_USER can run the bot"
    set +e
    runuser -u "$APP_USER" -- "$APP_DIR/.venv/bin/python" config.py
    code=$?
    set -e
    # 2 is the expected "fill in .env"; anything else means the bot cannot even start
    [[ $code -eq 0 || $code -eq 2 ]] || fail "$APP_USER cannot run the bot ($APP_DIR/.venv/bin/python config.py: exit $code)"
else
    say "running the doctor as $APP_USER"
    if runuser -u "$APP_USER" -- "$APP_DIR/.venv/bin/python" bot.py check; then
        doctor=passed
    else
        doctor=failed
    fi
fi

placeholders=''
if [[ $env_created == yes ]]; then
    placeholders=' (every value in it is a placeholder)'
elif [[ $doctor == failed ]]; then
    placeholders=' (the doctor above says what to fix)'
fi
cat <<EOF

Installed in $APP_DIR. Next steps:
  1. Fill in the settings$placeholders:
       nano $APP_DIR/.env
  2. Check them; it says what to fix:
       cd $APP_DIR && runuser -u $APP_USER -- .venv/bin/python bot.py check
  3. Start the bot and watch its log:
       systemctl start $SERVICE && journalctl -u $SERVICE -f
Later updates: sudo $APP_DIR/update.sh
EOF
