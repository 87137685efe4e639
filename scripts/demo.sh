#!/usr/bin/env bash
# End-to-end demo on a built-in default (tiny model, data it makes itself, CPU). Args go to demo.py.
# shellcheck source=scripts/env.sh
source "$(dirname "$0")/env.sh"
python scripts/demo.py "$@"
