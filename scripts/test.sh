#!/usr/bin/env bash
# Run the test suite (fast tests by default; pass -m slow for the long ones). Extra args go to pytest.
# shellcheck source=scripts/env.sh
source "$(dirname "$0")/env.sh"
ruff check .
python -m pytest "$@"
