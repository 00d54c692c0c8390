#!/usr/bin/env bash
# Install a civicmesh edge agent or site gateway on Raspberry Pi OS (arm64/armhf),
# NVIDIA Jetson (Ubuntu L4T, arm64) or Debian, as a systemd service.
#
#   sudo deploy/install.sh --role edge [--broker mqtts://HOST:8883] [--source DIR|SPEC]
#   sudo deploy/install.sh --role gateway [--broker mqtts://CENTRAL:8883] [--dry-run]
#
# Supported: 64-bit Raspberry Pi OS / Debian 12 (arm64, x86-64) and NVIDIA Jetson
# (JetPack 6, arm64) with models; 32-bit Raspberry Pi OS (armhf) without the on-device
# models (onnxruntime has no 32-bit ARM wheel: the agent runs with models disabled).
# What it does, in order (each step is skipped when already done, so it can be re-run):
#   1. checks the machine (root, systemd, Python >= 3.11) and installs python3-venv;
#   2. creates the system user "civicmesh" (in "dialout" and "i2c" when they exist);
#   3. creates /opt/civicmesh/venv and installs civicmesh[ROLE] into it: the edge extra
#      carries no web framework, database driver or LLM runtime;
#   4. `civicmesh setup ROLE`: the key (mode 0600, /var/lib/civicmesh/device.key or
#      gateway.key), /etc/civicmesh/ROLE.toml naming that key, and the enrolment request
#      to take to the central server (`civicmesh setup enrol`);
#   5. installs and enables the systemd unit (it starts once the TLS files are in place:
#      `civicmesh setup ROLE --check` says what is still missing).
# --dry-run prints every command instead of running it (CI runs it that way).
set -euo pipefail

ROLE=""
DRY_RUN=0
BROKER=""
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
        --broker) BROKER="${2:-}"; shift 2 ;;
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

check_machine() {
    local arch os_id
    arch="$(uname -m)"
    os_id="unknown"
    if [ -r /etc/os-release ]; then
        # shellcheck disable=SC1091
        os_id="$(. /etc/os-release && echo "${ID:-unknown}")"
    fi
    case "$arch" in
        aarch64|x86_64) ;;
        armv7l|armv6l)
            say "32-bit ARM: onnxruntime has no wheel here, the edge agent runs without models" ;;
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
    run install -d -m 0755 "$CONFIG_DIR" "$CONFIG_DIR/pki"
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

setup_role() {
    # Key, config and enrolment request in one idempotent step: the config names the key
    # file setup made, so the service never looks for a key that is not there.
    local flag=--broker
    [ "$ROLE" = gateway ] && flag=--upstream
    run "$VENV/bin/civicmesh" setup "$ROLE" --config "$CONFIG" --state-dir "$STATE_DIR" \
        --pki-dir "$CONFIG_DIR/pki" ${BROKER:+"$flag" "$BROKER"}
    say "take the enrolment request above to the central server; then check with:"
    say "  $VENV/bin/civicmesh setup $ROLE --check --config $CONFIG"
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
setup_role
install_unit
say "installed $UNIT; logs: journalctl -u $UNIT -f"
