#!/usr/bin/env bash
# The benchmarks in one command: ./scripts/bench.sh [--quick] [--only ingest|queries]
# Needs what the tests need: PostgreSQL on 127.0.0.1:5432 (or CIVICMESH_TEST_PG_URL) and
# the mosquitto binary (./scripts/test.sh installs both on a fresh machine). Takes about
# 15 minutes in full: most of it loads 69 million readings for the query benchmark.
set -euo pipefail

# shellcheck source=scripts/bootstrap.sh
. "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$CIVICMESH_ROOT"
exec python -m bench "$@"
