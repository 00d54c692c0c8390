#!/usr/bin/env bash
# The embedded demo in one command: ./scripts/demo.sh [civicmesh demo options]
# (.venv is created or updated first; see scripts/bootstrap.sh). Try --help.
set -euo pipefail

# shellcheck source=scripts/bootstrap.sh
. "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$CIVICMESH_ROOT"
exec civicmesh demo "$@"
