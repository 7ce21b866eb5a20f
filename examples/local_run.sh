#!/usr/bin/env bash
# The single-machine flow (no platform server): a data owner seals a dataset, a function trains a GBDT on it inside a
# (SIMULATED) attested enclave, and only the named recipient can open the results.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
WORK=${DEMO_DIR:-demo-work}
rm -rf "$WORK" && mkdir -p "$WORK"
export CONFIDE_HOME="$WORK/home"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. A simulated TEE platform for this machine (protects NOTHING against the host)"
$BIN/confide platform init

step "2. Identities: alice owns the data, bob receives the results"
$BIN/confide keygen alice --out-dir "$WORK"
$BIN/confide keygen bob --out-dir "$WORK"

step "3. Alice seals her dataset; the host will only ever see this ciphertext"
$BIN/python examples/make_dataset.py "$WORK/patients.csv" 5000
$BIN/confide encrypt "$WORK/patients.csv" --to "$WORK/alice.pub" --meta dataset=patients-2026 --out "$WORK/patients.sealed"
rm "$WORK/patients.csv"

step "4. The enclave's measurement, and a development policy pinned to it"
$BIN/confide measure
$BIN/confide policy init --dev --out "$WORK/dev-policy.toml"

step "5. Attestation: evidence for a fresh nonce, checked against two policies"
NONCE=$($BIN/python -c 'import os; print(os.urandom(32).hex())')
$BIN/confide enclave evidence --nonce "$NONCE" --out "$WORK/evidence.json"
$BIN/confide verify "$WORK/evidence.json" --nonce "$NONCE" --policy "$WORK/dev-policy.toml"
echo "-- the built-in production policy must refuse simulated evidence:"
if $BIN/confide verify "$WORK/evidence.json" --nonce "$NONCE"; then
  echo "demo failed: the production policy accepted simulated evidence" >&2; exit 1
fi

step "6. Run the GBDT training function in the sandboxed enclave; outputs sealed to bob"
$BIN/confide run examples/functions/gbdt_train.py \
  --input data="$WORK/patients.sealed" \
  --output report="$WORK/report.sealed" --output model="$WORK/model.sealed" \
  --param label=outcome --param rounds=30 \
  --to "$WORK/bob.pub" --identity "$WORK/alice.key" \
  --policy "$WORK/dev-policy.toml" --receipt "$WORK/receipt.json"

step "7. Bob opens the report; alice cannot"
$BIN/confide decrypt "$WORK/report.sealed" --identity "$WORK/bob.key" --out "$WORK/report.json"
cat "$WORK/report.json"; echo
if $BIN/confide decrypt "$WORK/report.sealed" --identity "$WORK/alice.key" --out "$WORK/nope.json" 2>/dev/null; then
  echo "demo failed: alice opened bob's output" >&2; exit 1
fi
echo "alice: refused (the output is sealed to bob only)"
echo; echo "Receipt signed by the enclave: $WORK/receipt.json"
