#!/usr/bin/env bash
# `make demo`: the main Confide scenario against a real platform server on loopback (SQLite, two
# SIMULATED enclave workers): two hospitals, one research lab, consent enforced in the enclave.
# See examples/hospitals.py for the story; examples/local_run.sh shows the single-machine flow.
# Then a confidential word count on this machine's enclave workers (examples/flow_wordcount.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${DEMO_DIR:-demo-work}
rm -rf "$WORK" && mkdir -p "$WORK"
export CONFIDE_HOME="$WORK/home"
.venv/bin/python examples/hospitals.py "$WORK"
echo
echo "=== confidential dataflow: a word count whose result only the reader can open ==="
examples/flow_wordcount.sh "$WORK"
