#!/usr/bin/env bash
# Install a civicmesh edge agent or site gateway on Raspberry Pi OS (arm64/armhf),
# NVIDIA Jetson (Ubuntu L4T, arm64) or Debian, as a systemd service.
#
#   sudo deploy/install.sh --role edge [--source DIR|SPEC] [--dry-run]
#   sudo deploy/install.sh --role gateway
#
# What it does, in order (each step is skipped when already done, so it can be re-run):
#   1. checks the machine (root, systemd, Python >= 3.11) and installs python3-venv;
#   2. creates the system user "civicmesh" (in "dialout" and "i2c" when they exist);
#   3. creates /opt/civicmesh/venv and installs civicmesh[ROLE] into it: the edge extra
#      carries no web framework, database driver or LLM runtime;
#   4. copies the example config to /etc/civicmesh/ROLE.toml unless one exists;
#   5. makes the device or gateway key (mode 0600) and prints the registration request;
#   6. installs and enables the systemd unit (it starts once the config is filled in).
# --dry-run prints every command instead of running it (CI runs it that way).
set -euo pipefail

ROLE=""
DRY_RUN=0
PREFIX="/opt/civicmesh"
CONFIG_DIR="/etc/civicmesh"
STATE_DIR="/var/lib/civicmesh"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SOURCE="$(dirname "$HERE")"

usage() {
    sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

say() { printf 'civicmesh-install: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# Run a command, or print it under --dry-run.
run() {
    if [ "$DRY_RUN" -eq 1 ]; then
        printf '+ %s\n' "$*"
    else
        "$@"
    fi
}

while [ $# -gt 0 ]; do
    case "$1" in
        --role) ROLE="${2:-}"; shift 2 ;;
        --source) SOURCE="${2:-}"; shift 2 ;;
        --prefix) PREFIX="${2:-}"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage 0 ;;
        *) say "unknown option $1"; usage 2 ;;
    esac
done

case "$ROLE" in
    edge|gateway) ;;
    *) die "--role edge or --role gateway is required" ;;
esac

VENV="$PREFIX/venv"
UNIT="civicmesh-$ROLE.service"
CONFIG="$CONFIG_DIR/$ROLE.toml"
KEY="$STATE_DIR/$ROLE.key"

check_machine() {
    local arch os_id
    arch="$(uname -m)"
    os_id="unknown"
    if [ -r /etc/os-release ]; then
        # shellcheck disable=SC1091
        os_id="$(. /etc/os-release && echo "${ID:-unknown}")"
    fi
    case "$arch" in
        aarch64|armv7l|x86_64) ;;
        *) die "unsupported architecture $arch (aarch64, armv7l or x86_64)" ;;
    esac
    say "machine: $os_id on $arch"
    if [ -r /etc/nv_tegra_release ]; then
        say "NVIDIA Jetson detected (L4T)"
    fi
    if [ "$DRY_RUN" -eq 0 ]; then
        [ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 ...)"
        command -v systemctl >/dev/null 2>&1 || die "systemd is required"
    fi
}

python_bin() {
    local candidate
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
                2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

install_packages() {
    if ! python_bin >/dev/null; then
        die "Python 3.11 or newer is needed (Raspberry Pi OS 12 and JetPack 6 have it)"
    fi
    if ! "$(python_bin)" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        run apt-get update -q
        run apt-get install -y -q python3-venv
    fi
}

create_user() {
    local groups="" group
    for group in dialout i2c gpio; do
        if getent group "$group" >/dev/null 2>&1; then
            groups="${groups:+$groups,}$group"
        fi
    done
    if ! id civicmesh >/dev/null 2>&1; then
        run useradd --system --home-dir "$STATE_DIR" --shell /usr/sbin/nologin \
            ${groups:+--groups "$groups"} civicmesh
    fi
    run install -d -o civicmesh -g civicmesh -m 0700 "$STATE_DIR"
    run install -d -m 0755 "$CONFIG_DIR"
}

install_venv() {
    local python spec
    python="$(python_bin)"
    if [ ! -x "$VENV/bin/python" ]; then
        run "$python" -m venv "$VENV"
    fi
    if [ -d "$SOURCE" ]; then
        spec="${SOURCE}[${ROLE}]"
    else
        spec="$SOURCE"
    fi
    run "$VENV/bin/pip" install --disable-pip-version-check --no-input --upgrade "$spec"
}

install_config() {
    if [ ! -e "$CONFIG" ]; then
        run install -m 0640 -g civicmesh "$HERE/examples/$ROLE.toml" "$CONFIG"
        say "edit $CONFIG (broker URL, TLS files, driver), then: systemctl start $UNIT"
    fi
}

make_key() {
    if [ "$ROLE" = edge ]; then
        run runuser -u civicmesh -- "$VENV/bin/civicmesh" edge provision --key "$KEY"
    elif [ ! -e "$KEY" ]; then
        run runuser -u civicmesh -- "$VENV/bin/civicmesh" gateway keygen --key "$KEY"
    fi
}

install_unit() {
    run install -m 0644 "$HERE/systemd/$UNIT" "/etc/systemd/system/$UNIT"
    if [ "$PREFIX" != "/opt/civicmesh" ]; then
        run sed -i "s#/opt/civicmesh/venv#$VENV#" "/etc/systemd/system/$UNIT"
    fi
    run systemctl daemon-reload
    run systemctl enable "$UNIT"
}

check_machine
install_packages
create_user
install_venv
install_config
make_key
install_unit
say "installed $UNIT; logs: journalctl -u $UNIT -f"
