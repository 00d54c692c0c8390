# shellcheck shell=bash
# A real TimescaleDB server for the test suite, never the shared server on 5432.
# Sourced by scripts/test.sh (which defines civicmesh_say/civicmesh_die and port_open).
#
# Where the extension comes from, in order:
#   1. CIVICMESH_TEST_TSDB_URL already set: that server is used as it is;
#   2. a TimescaleDB package installed for PostgreSQL 15 (timescaledb.control in its share
#      folder): private clusters from the system binaries;
#   3. the binary build in ../shared/timescaledb/ (beside the repository; for a git
#      worktree, beside its main checkout; or CIVICMESH_TIMESCALEDB_DIR): its SHA256SUMS
#      checked, the PostgreSQL 15 tree copied under a private prefix and the tarball
#      unpacked into that copy, so the system tree (and the server on 5432) never change.
# Two clusters are made from the same binaries, on free private ports, as the postgres user
# when run as root, and reused by later runs while they are up:
#   - "preload": shared_preload_libraries=timescaledb -> CIVICMESH_TEST_TSDB_URL
#   - "nopreload": the extension files are there but not preloaded (what a user has right
#     after installing the package without a restart) -> CIVICMESH_TEST_TSDB_NOPRELOAD_URL
# With none of the three, nothing is exported and the TimescaleDB tests fail saying how to
# get one (or are deselected with -m "not timescaledb").

# scripts/test.sh defines port_open; scripts/bench.sh does not.
if ! declare -F port_open >/dev/null; then
    port_open() {
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
    }
fi

TSDB_PG_MAJOR=15
TSDB_TARBALL_GLOB="timescaledb-pg${TSDB_PG_MAJOR}-*-x86_64.tar.gz"

tsdb_shared_dir() {
    local candidate common
    if [ -n "${CIVICMESH_TIMESCALEDB_DIR:-}" ]; then
        echo "$CIVICMESH_TIMESCALEDB_DIR"
        return 0
    fi
    candidate="$CIVICMESH_ROOT/../shared/timescaledb"
    if [ -d "$candidate" ]; then
        echo "$candidate"
        return 0
    fi
    # A git worktree: ../shared beside the main checkout.
    common="$(git -C "$CIVICMESH_ROOT" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)"
    if [ -n "$common" ] && [ -d "$(dirname "$common")/../shared/timescaledb" ]; then
        echo "$(dirname "$common")/../shared/timescaledb"
        return 0
    fi
    return 1
}

tsdb_state_root() {
    if civicmesh_is_root; then
        echo /var/lib/civicmesh-dev
    else
        echo "$CIVICMESH_ROOT/var"
    fi
}

# Run as the cluster owner (initdb refuses root).
tsdb_as_owner() {
    if civicmesh_is_root; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

tsdb_free_port() {
    local port
    for port in $(seq "${1:-55432}" "$((${1:-55432} + 200))"); do
        port_open "$port" || { echo "$port"; return 0; }
    done
    return 1
}

# Prints the bin folder of a PostgreSQL 15 whose tree holds TimescaleDB, making the private
# copy first when needed; fails (status 1) when there is no TimescaleDB to be had.
tsdb_binaries() {
    local sysbin="/usr/lib/postgresql/$TSDB_PG_MAJOR/bin" shared tarball prefix sums
    [ -x "$sysbin/postgres" ] || return 1
    if [ -f "/usr/share/postgresql/$TSDB_PG_MAJOR/extension/timescaledb.control" ]; then
        echo "$sysbin"
        return 0
    fi
    shared="$(tsdb_shared_dir)" || return 1
    tarball="$(find "$shared" -maxdepth 1 -name "$TSDB_TARBALL_GLOB" | sort -V | tail -n 1)"
    [ -n "$tarball" ] || return 1
    prefix="$(tsdb_state_root)/$(basename "$tarball" .tar.gz)"
    if [ ! -f "$prefix/.complete" ]; then
        sums="$shared/SHA256SUMS"
        [ -f "$sums" ] || civicmesh_die "$sums is missing: cannot check $tarball"
        (cd "$shared" && grep " $(basename "$tarball")\$" SHA256SUMS | sha256sum --check --status) \
            || civicmesh_die "$tarball does not match $sums; not using it"
        civicmesh_say "TimescaleDB for the tests: copying PostgreSQL $TSDB_PG_MAJOR into $prefix and unpacking $(basename "$tarball")"
        rm -rf "$prefix"
        mkdir -p "$prefix/usr/lib/postgresql" "$prefix/usr/share/postgresql"
        cp -a "/usr/lib/postgresql/$TSDB_PG_MAJOR" "$prefix/usr/lib/postgresql/"
        cp -a "/usr/share/postgresql/$TSDB_PG_MAJOR" "$prefix/usr/share/postgresql/"
        tar -xzf "$tarball" -C "$prefix" --no-same-owner
        touch "$prefix/.complete"
    fi
    echo "$prefix/usr/lib/postgresql/$TSDB_PG_MAJOR/bin"
}

# The settings of a test cluster (port aside), the same on every start.
tsdb_settings() {
    local dir="$1" preload="$2"
    echo "listen_addresses = '127.0.0.1'"
    echo "unix_socket_directories = '$dir'"
    echo "max_connections = 200"
    # One scheduler per database with the extension plus the jobs it runs: the suite keeps
    # a few such databases open at once, each with many schemas' policies.
    echo "max_worker_processes = 40"
    echo "timescaledb.max_background_workers = 32"
    echo "timescaledb.telemetry_level = off"
    # A throw-away test cluster: durability is not needed, speed is.
    echo "fsync = off"
    echo "synchronous_commit = off"
    echo "full_page_writes = off"
    if [ "$preload" -eq 1 ]; then
        echo "shared_preload_libraries = 'timescaledb'"
    else
        echo "shared_preload_libraries = ''"
    fi
}

# tsdb_cluster BIN NAME PRELOAD(0|1): start (or find running) the cluster; prints its port.
# A running cluster whose settings changed (a newer checkout) is restarted with them.
tsdb_cluster() {
    local bin="$1" name="$2" preload="$3" dir port conf settings
    dir="$(tsdb_state_root)/timescaledb-clusters/$name"
    conf="$dir/data/civicmesh.conf"
    settings="$(tsdb_settings "$dir" "$preload")"
    if [ -f "$dir/port" ] && [ -f "$dir/data/postmaster.pid" ]; then
        port="$(cat "$dir/port")"
        if port_open "$port" && tsdb_as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
            if [ "$(tail -n +2 "$conf" 2>/dev/null | grep -v '^port = ')" = "$settings" ]; then
                echo "$port"
                return 0
            fi
            civicmesh_say "restarting the $name TimescaleDB test cluster with new settings"
            tsdb_as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
        fi
    fi
    mkdir -p "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        rm -rf "$dir/data"
        civicmesh_is_root && chown postgres: "$dir"
        tsdb_as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust \
            --encoding=UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
            || civicmesh_die "initdb of the $name TimescaleDB test cluster failed; see $dir/initdb.log"
    fi
    port="$(tsdb_free_port 55432)" || civicmesh_die "no free port for the $name test cluster"
    {
        echo "# written by scripts/timescaledb.sh on every start"
        echo "$settings"
        echo "port = $port"
    } >"$conf"
    grep -q "^include_if_exists = 'civicmesh.conf'" "$dir/data/postgresql.conf" \
        || echo "include_if_exists = 'civicmesh.conf'" >>"$dir/data/postgresql.conf"
    civicmesh_is_root && chown -R postgres: "$dir"
    echo "$port" >"$dir/port"
    tsdb_as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null \
        || civicmesh_die "the $name TimescaleDB test cluster did not start; see $dir/server.log"
    echo "$port"
}

ensure_timescaledb() {
    [ -n "${CIVICMESH_TEST_TSDB_URL:-}" ] && return 0
    local bin lock port
    mkdir -p "$(tsdb_state_root)"
    # Several checkouts may start at once: one makes the copy and the clusters.
    lock="$(tsdb_state_root)/timescaledb.lock"
    exec 8>"$lock"
    flock 8
    bin="$(tsdb_binaries)" || {
        flock -u 8
        civicmesh_say "no TimescaleDB found (no package, no ../shared/timescaledb): the timescaledb tests will fail; deselect them with -m 'not timescaledb'"
        return 0
    }
    port="$(tsdb_cluster "$bin" preload 1)"
    export CIVICMESH_TEST_TSDB_URL="postgresql://postgres@127.0.0.1:$port/postgres"
    port="$(tsdb_cluster "$bin" nopreload 0)"
    export CIVICMESH_TEST_TSDB_NOPRELOAD_URL="postgresql://postgres@127.0.0.1:$port/postgres"
    flock -u 8
    exec 8>&-
}
