# shellcheck shell=bash
# Sourced by scripts/demo.sh and scripts/test.sh: make .venv ready, quietly and idempotently.
#
#   - finds Python >= 3.11 (python3.11 first, then python3; CIVICMESH_PYTHON overrides);
#   - creates .venv when missing (installs Debian's python3-venv when root and needed);
#   - runs `pip install -e '.[all,dev]'` only when pyproject.toml changed since the last
#     successful install (its sha256 is stamped in .venv), so a second run takes ~0.1 s.
#
# Sets CIVICMESH_ROOT and CIVICMESH_VENV and puts .venv/bin first on PATH.
# Prints nothing unless something is installed or goes wrong.

CIVICMESH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CIVICMESH_VENV="$CIVICMESH_ROOT/.venv"
CIVICMESH_STAMP="$CIVICMESH_VENV/.civicmesh-pyproject.sha256"
export CIVICMESH_ROOT CIVICMESH_VENV

civicmesh_say() {
    printf 'civicmesh: %s\n' "$*" >&2
}

civicmesh_die() {
    printf 'civicmesh: error: %s\n' "$*" >&2
    exit 1
}

civicmesh_is_root() {
    [ "$(id -u)" -eq 0 ]
}

# apt-get update runs at most once per script run.
CIVICMESH_APT_UPDATED=0
civicmesh_apt_install() {
    command -v apt-get >/dev/null 2>&1 \
        || civicmesh_die "need the packages: $*; install them with your package manager"
    civicmesh_is_root \
        || civicmesh_die "need the Debian packages: $*; run: sudo apt-get install -y $*"
    local log
    log="$(mktemp)"
    if [ "$CIVICMESH_APT_UPDATED" -eq 0 ]; then
        civicmesh_say "apt-get update"
        if ! DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null >"$log" 2>&1; then
            cat "$log" >&2
            rm -f "$log"
            civicmesh_die "apt-get update failed"
        fi
        CIVICMESH_APT_UPDATED=1
    fi
    civicmesh_say "apt-get install $*"
    # A UTF-8 locale, or Debian's postgresql creates its first cluster as SQL_ASCII.
    if ! LANG=C.UTF-8 LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q "$@" </dev/null >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        civicmesh_die "apt-get install $* failed"
    fi
    rm -f "$log"
}

civicmesh_python_ok() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}

civicmesh_find_python() {
    local candidate
    if [ -n "${CIVICMESH_PYTHON:-}" ]; then
        civicmesh_python_ok "$CIVICMESH_PYTHON" || return 1
        command -v "$CIVICMESH_PYTHON"
        return 0
    fi
    for candidate in python3.11 python3 python3.12 python3.13; do
        if command -v "$candidate" >/dev/null 2>&1 && civicmesh_python_ok "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

civicmesh_sha256() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        "$CIVICMESH_VENV/bin/python" -c \
            'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' \
            "$1"
    fi
}

civicmesh_make_venv() {
    local python log
    python="$(civicmesh_find_python)" || civicmesh_die \
        "Python 3.11 or newer not found (tried python3.11, python3). On Debian 12: apt-get install -y python3 python3-venv; elsewhere set CIVICMESH_PYTHON=/path/to/python3.11"
    # Debian ships the venv module without ensurepip unless python3-venv is installed.
    if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        civicmesh_apt_install python3-venv
    fi
    civicmesh_say "creating .venv with $python ($("$python" -c 'import platform; print(platform.python_version())'))"
    log="$(mktemp)"
    if ! "$python" -m venv "$CIVICMESH_VENV" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        rm -rf "$CIVICMESH_VENV"
        civicmesh_die "could not create .venv with $python"
    fi
    rm -f "$log"
}

civicmesh_bootstrap() {
    # A venv whose interpreter vanished (Python upgraded or removed) is rebuilt.
    if [ -d "$CIVICMESH_VENV" ] && ! civicmesh_python_ok "$CIVICMESH_VENV/bin/python"; then
        civicmesh_say ".venv is broken or older than Python 3.11; recreating it"
        rm -rf "$CIVICMESH_VENV"
    fi
    if [ ! -x "$CIVICMESH_VENV/bin/python" ]; then
        civicmesh_make_venv
    fi

    local wanted installed="" log
    wanted="$(civicmesh_sha256 "$CIVICMESH_ROOT/pyproject.toml")"
    if [ -f "$CIVICMESH_STAMP" ]; then
        installed="$(cat "$CIVICMESH_STAMP")"
    fi
    if [ "$wanted" != "$installed" ]; then
        # llama-cpp-python builds from source: it needs a C++ compiler (cmake comes
        # from PyPI when missing), and a portable build (see pyproject.toml).
        if ! command -v g++ >/dev/null 2>&1 && ! command -v c++ >/dev/null 2>&1; then
            civicmesh_apt_install g++
        fi
        civicmesh_say "installing civicmesh and its dependencies into .venv (pyproject.toml changed; a first llama.cpp build takes about 6 minutes)"
        log="$(mktemp)"
        if ! (cd "$CIVICMESH_ROOT" && CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" \
            "$CIVICMESH_VENV/bin/python" -m pip install \
            --disable-pip-version-check --no-input -e '.[all,dev]') </dev/null >"$log" 2>&1; then
            cat "$log" >&2
            rm -f "$log"
            civicmesh_die "pip install -e '.[all,dev]' failed (output above)"
        fi
        rm -f "$log"
        printf '%s\n' "$wanted" >"$CIVICMESH_STAMP"
    fi

    PATH="$CIVICMESH_VENV/bin:$PATH"
    VIRTUAL_ENV="$CIVICMESH_VENV"
    export PATH VIRTUAL_ENV
}

civicmesh_bootstrap
