#!/usr/bin/env bash
# The whole developer loop in one command: ./scripts/test.sh [pytest args]
#
#   1. .venv up to date (scripts/bootstrap.sh);
#   2. PostgreSQL on 127.0.0.1:5432 and Mosquitto on 127.0.0.1:1883, installed (Debian, as
#      root) and started only when nothing listens there yet; running services are never
#      stopped or reconfigured. The mosquitto binary is required either way: tests start
#      private brokers with it; Debian's chromium is installed for the browser tests;
#      docker-compose and promtool (unpacked from Debian's prometheus package) for the
#      compose tests; a real TimescaleDB server on private ports (scripts/timescaledb.sh: from
#      ../shared/timescaledb/ when no TimescaleDB package is installed; 5432 untouched);
#   3. lint: ruff check, ruff format --check, mypy --strict on every package, the package
#      boundaries of pyproject.toml (scripts/check_boundaries.py);
#   4. pytest with the given arguments (default: the whole suite).
#
# Exit status: pytest's when it failed (5, "no tests collected", counts as failure),
# otherwise 1 if lint failed, otherwise 0.
# Environment: CIVICMESH_TEST_PG_URL=postgresql://... and CIVICMESH_TEST_MQTT_URL=mqtt://...
# (and CIVICMESH_TEST_TSDB_URL, CIVICMESH_TEST_TSDB_NOPRELOAD_URL) use those servers as they are; CIVICMESH_SKIP_LINT=1 skips step 3 (handy while iterating).
set -euo pipefail

# shellcheck source=scripts/bootstrap.sh
. "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
# shellcheck source=scripts/timescaledb.sh
. "$(dirname "${BASH_SOURCE[0]}")/timescaledb.sh"
cd "$CIVICMESH_ROOT"

# Overridable only to rehearse a fresh machine next to running services.
PG_PORT="${CIVICMESH_DEV_PG_PORT:-5432}"
MQTT_PORT="${CIVICMESH_DEV_MQTT_PORT:-1883}"
DEFAULT_PG_URL="postgresql://postgres@127.0.0.1:$PG_PORT/postgres"

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

wait_for_port() {
    local port="$1" what="$2" i
    for i in $(seq 1 60); do
        port_open "$port" && return 0
        [ "$i" -eq 60 ] || sleep 0.5
    done
    civicmesh_die "$what did not start listening on 127.0.0.1:$port within 30 s"
}

mosquitto_bin() {
    # /usr/sbin is not on a normal user's PATH on Debian.
    command -v mosquitto 2>/dev/null || { [ -x /usr/sbin/mosquitto ] && echo /usr/sbin/mosquitto; }
}

# Set when this run installed PostgreSQL: Debian may start the new cluster during the
# install, and it is then ours to configure all the same.
PG_INSTALLED_HERE=0

install_missing_packages() {
    local packages=()
    if [ -z "${CIVICMESH_TEST_PG_URL:-}" ] && ! port_open "$PG_PORT" \
        && ! command -v pg_ctlcluster >/dev/null 2>&1; then
        packages+=(postgresql)
        PG_INSTALLED_HERE=1
    fi
    if ! mosquitto_bin >/dev/null; then
        packages+=(mosquitto)
    fi
    # The dashboard's browser tests drive Debian's Chromium (no browser downloads); the
    # deploy/ tests run shellcheck and `systemd-analyze verify`.
    if ! command -v chromium >/dev/null 2>&1; then
        packages+=(chromium)
    fi
    if ! command -v shellcheck >/dev/null 2>&1; then
        packages+=(shellcheck)
    fi
    if ! command -v systemd-analyze >/dev/null 2>&1; then
        packages+=(systemd)
    fi
    # tests/test_compose.py: `docker-compose config` reads deploy/compose.yaml
    if ! command -v docker-compose >/dev/null 2>&1; then
        packages+=(docker-compose)
    fi
    if [ "${#packages[@]}" -gt 0 ]; then
        civicmesh_apt_install "${packages[@]}"
    fi
}

# promtool (tests/test_compose.py checks deploy/prometheus.yml with it) comes from Debian's
# prometheus package, unpacked into a private folder and put on PATH: installing the
# package would also start a Prometheus server on the machine.
ensure_promtool() {
    command -v promtool >/dev/null 2>&1 && return 0
    local dir tmp
    if civicmesh_is_root; then
        dir=/var/lib/civicmesh-dev/promtool
    else
        dir="$CIVICMESH_ROOT/var/promtool"
    fi
    if [ ! -x "$dir/usr/bin/promtool" ]; then
        command -v apt-get >/dev/null 2>&1 \
            || civicmesh_die "promtool is missing; install Prometheus's promtool"
        civicmesh_say "unpacking promtool from Debian's prometheus package into $dir"
        tmp="$(mktemp -d)"
        if ! (cd "$tmp" && apt-get download prometheus </dev/null >/dev/null 2>&1); then
            civicmesh_is_root || civicmesh_die "apt-get download prometheus failed; run: sudo apt-get update"
            DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null >/dev/null 2>&1 \
                || civicmesh_die "apt-get update failed"
            (cd "$tmp" && apt-get download prometheus </dev/null >/dev/null 2>&1) \
                || civicmesh_die "apt-get download prometheus failed"
        fi
        mkdir -p "$dir"
        dpkg-deb -x "$tmp"/prometheus_*.deb "$dir"
        rm -rf "$tmp"
    fi
    export PATH="$dir/usr/bin:$PATH"
}

pg_can_connect() {
    python - "$1" <<'EOF' >/dev/null 2>&1
import sys

import psycopg

psycopg.connect(sys.argv[1], connect_timeout=5).close()
EOF
}

# "<version> <cluster>" of the local cluster configured for $PG_PORT, if any.
pg_cluster_on_port() {
    pg_lsclusters -h 2>/dev/null | awk -v port="$PG_PORT" '$3 == port { print $1, $2; exit }'
}

start_postgres() {
    command -v pg_ctlcluster >/dev/null 2>&1 \
        || civicmesh_die "nothing listens on 127.0.0.1:$PG_PORT and pg_ctlcluster is missing; install Debian's postgresql or set CIVICMESH_TEST_PG_URL"
    civicmesh_is_root || civicmesh_die \
        "PostgreSQL is not running on 127.0.0.1:$PG_PORT; start it (sudo pg_ctlcluster <version> main start) or set CIVICMESH_TEST_PG_URL"
    local cluster version name
    cluster="$(pg_cluster_on_port)"
    if [ -z "$cluster" ]; then
        version="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)"
        [ -n "$version" ] || civicmesh_die "no PostgreSQL server found under /usr/lib/postgresql"
        name=main
        if [ -d "/etc/postgresql/$version/main" ]; then
            name=civicmesh # "main" exists on another port; leave it alone
        fi
        civicmesh_say "creating PostgreSQL $version cluster $name on port $PG_PORT"
        pg_createcluster --locale=C.UTF-8 -p "$PG_PORT" "$version" "$name" </dev/null >/dev/null
        cluster="$version $name"
    fi
    read -r version name <<<"$cluster"
    # The package's own start (during apt-get install) may still be under way.
    if ! pg_lsclusters -h "$version" "$name" 2>/dev/null | grep -q ' online '; then
        civicmesh_say "starting PostgreSQL $version/$name"
        pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start </dev/null
    fi
    wait_for_port "$PG_PORT" PostgreSQL
}

# Let role postgres in over TCP from 127.0.0.1 without a password (Debian's default asks
# for one the role does not have). Only ever done to a cluster this run installed or started.
trust_local_postgres() {
    local cluster version name hba
    cluster="$(pg_cluster_on_port)"
    [ -n "$cluster" ] || return 0
    read -r version name <<<"$cluster"
    hba="/etc/postgresql/$version/$name/pg_hba.conf"
    [ -w "$hba" ] || return 0
    if ! grep -q 'civicmesh dev loop' "$hba"; then
        civicmesh_say "allowing role postgres from 127.0.0.1 without password in $hba"
        sed -i '1i host all postgres 127.0.0.1/32 trust # civicmesh dev loop (scripts/test.sh)' "$hba"
        pg_ctlcluster --skip-systemctl-redirect "$version" "$name" reload </dev/null
    fi
}

ensure_postgres() {
    if [ -n "${CIVICMESH_TEST_PG_URL:-}" ]; then
        pg_can_connect "$CIVICMESH_TEST_PG_URL" \
            || civicmesh_die "cannot connect to CIVICMESH_TEST_PG_URL (${CIVICMESH_TEST_PG_URL%%@*}@...)"
        return 0
    fi
    local ours="$PG_INSTALLED_HERE"
    if ! port_open "$PG_PORT"; then
        start_postgres
        ours=1
    fi
    if [ "$ours" -eq 1 ] && ! pg_can_connect "$DEFAULT_PG_URL"; then
        trust_local_postgres
    fi
    pg_can_connect "$DEFAULT_PG_URL" || civicmesh_die \
        "PostgreSQL on 127.0.0.1:$PG_PORT refuses $DEFAULT_PG_URL; set CIVICMESH_TEST_PG_URL=postgresql://USER:PASSWORD@127.0.0.1:$PG_PORT/postgres (a role allowed to CREATE DATABASE)"
    export CIVICMESH_TEST_PG_URL="$DEFAULT_PG_URL"
}

ensure_mosquitto() {
    local bin state conf
    bin="$(mosquitto_bin)" || civicmesh_die "mosquitto is not installed; run: sudo apt-get install -y mosquitto"
    [ -n "${CIVICMESH_TEST_MQTT_URL:-}" ] && return 0
    export CIVICMESH_TEST_MQTT_URL="mqtt://127.0.0.1:$MQTT_PORT"
    port_open "$MQTT_PORT" && return 0
    # As root, mosquitto drops to user "mosquitto", which may not reach a clone under /root.
    if civicmesh_is_root; then
        state="/var/lib/civicmesh-dev/mosquitto-$MQTT_PORT"
    else
        state="$CIVICMESH_ROOT/var/mosquitto-$MQTT_PORT"
    fi
    mkdir -p "$state"
    conf="$state/mosquitto.conf"
    {
        echo "# Generated by scripts/test.sh from deploy/mosquitto/civicmesh-dev.conf"
        grep -Ev '^[[:space:]]*(listener|persistence_location|log_dest|pid_file|user)([[:space:]]|$)' \
            deploy/mosquitto/civicmesh-dev.conf
        echo "listener $MQTT_PORT 127.0.0.1"
        echo "persistence_location $state/"
        echo "log_dest file $state/mosquitto.log"
        echo "pid_file $state/mosquitto.pid"
    } >"$conf"
    if civicmesh_is_root; then
        if id mosquitto >/dev/null 2>&1; then
            chown mosquitto: "$state"
            chmod 0755 "$state"
        else
            echo "user root" >>"$conf"
        fi
    fi
    civicmesh_say "starting mosquitto on 127.0.0.1:$MQTT_PORT (state in $state)"
    "$bin" -d -c "$conf" </dev/null
    wait_for_port "$MQTT_PORT" mosquitto
}

run_lint() {
    local failed=0 log
    ruff check --quiet . || failed=1
    ruff format --check --quiet . || { civicmesh_say "to fix: ruff format ."; failed=1; }
    # mypy prints a success line; show its output only when it has something to say.
    log="$(mktemp)"
    mypy civicmesh gateway edge analytics firmware_sim training demo bench >"$log" 2>&1 || { cat "$log"; failed=1; }
    rm -f "$log"
    python scripts/check_boundaries.py || failed=1
    return "$failed"
}

install_missing_packages
ensure_promtool
ensure_postgres
ensure_timescaledb
ensure_mosquitto

lint_status=0
if [ "${CIVICMESH_SKIP_LINT:-0}" != 1 ]; then
    run_lint || lint_status=1
fi

pytest_status=0
python -m pytest "$@" </dev/null || pytest_status=$?

if [ "$lint_status" -ne 0 ]; then
    civicmesh_say "lint failed (ruff check / ruff format --check / mypy / boundaries output above)"
fi
if [ "$pytest_status" -ne 0 ]; then
    exit "$pytest_status"
fi
exit "$lint_status"
