#!/usr/bin/env bash
# The benchmarks in one command: ./scripts/bench.sh [--quick] [--only ingest|queries]
# Needs what the tests need: PostgreSQL on 127.0.0.1:5432 (or CIVICMESH_TEST_PG_URL), the
# TimescaleDB test server for the ingest benchmark's --backend timescaledb and
# --compare-backends (started here as scripts/test.sh does), and the mosquitto binary
# (./scripts/test.sh installs them on a fresh machine). Takes about 15 minutes in full: most of it loads 69 million readings for the query benchmark.
set -euo pipefail

# shellcheck source=scripts/bootstrap.sh
. "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
# shellcheck source=scripts/timescaledb.sh
. "$(dirname "${BASH_SOURCE[0]}")/timescaledb.sh"
cd "$CIVICMESH_ROOT"
# The TimescaleDB test server for --backend timescaledb / --compare-backends (as in
# scripts/test.sh: private clusters from ../shared/timescaledb/, 5432 untouched).
ensure_timescaledb
exec python -m bench "$@"
