#!/usr/bin/env bash
# A confidential word count (confide flow): the text stays sealed to its owner; the job's functions
# run in SIMULATED enclave workers on this machine; only the reader can open the result.
# Usage: examples/flow_wordcount.sh WORKDIR [--engine spark]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:?usage: flow_wordcount.sh WORKDIR [confide flow run options]}
shift
C=.venv/bin/confide
mkdir -p "$WORK/flow"
export CONFIDE_HOME=${CONFIDE_HOME:-$WORK/home}
[ -f "$CONFIDE_HOME/policy.toml" ] || $C policy init --dev --out "$CONFIDE_HOME/policy.toml" >/dev/null
$C keygen owner --out-dir "$WORK/flow" >/dev/null
$C keygen reader --out-dir "$WORK/flow" >/dev/null
.venv/bin/python - "$WORK/flow/corpus.txt" <<'PY'
import random, sys
random.seed(7)
vocab = [f"w{i}" for i in range(1, 2001)]
weights = [1 / i for i in range(1, 2001)]  # Zipf
with open(sys.argv[1], "w") as fh:
    for _ in range(20000):
        fh.write(" ".join(random.choices(vocab, weights, k=12)) + "\n")
PY
$C encrypt "$WORK/flow/corpus.txt" --to "$WORK/flow/owner.pub" --out "$WORK/flow/corpus.cnf" \
  --chunk-size 262144 --no-progress  # 256 KiB chunks: a few partitions
rm "$WORK/flow/corpus.txt"  # only the sealed copy is left
echo "== the owner runs the word count; the engine moves only ciphertext"
$C flow run examples/wordcount_job.py --input text="$WORK/flow/corpus.cnf" --identity "$WORK/flow/owner.key" \
  --to "$WORK/flow/reader.pub" --out "$WORK/flow/result" "$@"
echo "== the reader opens the five most frequent words"
$C flow open "$WORK/flow/result" word_counts --identity "$WORK/flow/reader.key" --limit 5
echo "== the owner is not a recipient of the result:"
$C flow open "$WORK/flow/result" word_counts --identity "$WORK/flow/owner.key" --limit 1 || true
