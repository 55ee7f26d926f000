#!/usr/bin/env bash
# Issue 9's scripted scenario, end to end through the CLI (the README "Retraining as the zoo
# grows" section shows these commands and one run's output):
#
#   1. a zoo of the two MNIST teachers, imported from the mnist-fashion-4 zoo's safetensors
#      with `amalgam zoo import` (as teachers trained elsewhere would be);
#   2. `amalgam retrain`: no champion yet -> a full run, registered and promoted (v1);
#   3. `amalgam retrain` again: nothing changed -> "nothing to do", exit 0, no teacher loaded;
#   4. the two Fashion teachers added (the same import, four teachers, --force): the MNIST
#      teachers come out byte-identical, so the diff sees them unchanged;
#   5. `amalgam retrain --dry-run`, then `amalgam retrain`: only the Fashion teachers run;
#      the MNIST teachers' codes and logits come from the store; v2 is judged against v1;
#   6. the registry, and what each retrain ran (from retrain.json).
#
#     bash bench/retrain_scenario.sh [WORK_DIR]     # WORK_DIR must not exist (default: a new temp dir)
#
# Needs the demo zoo ($AMALGAM_HOME/zoos/mnist-fashion-4, `make demo` or `amalgam zoo train
# --preset mnist-fashion-4`) and the data (`amalgam data fetch`). Everything it writes is under
# WORK_DIR (zoo, job, store, runs). POOL (default 4000 images, half MNIST, half Fashion),
# STAGE_EPOCHS (3) and JOINT_EPOCHS (2) size the runs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
AMALGAM="${AMALGAM:-$ROOT/.venv/bin/amalgam}"
PY="${PY:-$ROOT/.venv/bin/python}"
HOME_DIR="${AMALGAM_HOME:-$HOME/.cache/amalgam}"
SRC="$HOME_DIR/zoos/mnist-fashion-4"
POOL="${POOL:-4000}"
STAGE_EPOCHS="${STAGE_EPOCHS:-3}"
JOINT_EPOCHS="${JOINT_EPOCHS:-2}"

if [ $# -ge 1 ]; then
  W="$1"
  [ ! -e "$W" ] || { echo "retrain_scenario: $W exists; name a new directory" >&2; exit 2; }
  mkdir -p "$W"
else
  W="$(mktemp -d "${TMPDIR:-/tmp}/amalgam-retrain-scenario-XXXXXX")"
fi
[ -f "$SRC/zoo.yaml" ] || { echo "retrain_scenario: no zoo at $SRC (run make demo)" >&2; exit 2; }
step() { printf '\n=== %s\n$ %s\n' "$1" "${*:2}"; }
t_start=$SECONDS

# The import spec: weights from the demo zoo, architecture read off the tensors, classes,
# preprocessing presets. ALL=1 adds the two Fashion teachers.
import_spec() {
  cat <<EOF
name: scenario
teachers:
  - {name: mnist-0-4, weights: $SRC/mnist-0-4.safetensors, arch: tapped_cnn, input: mnist,
     classes: [mnist/0, mnist/1, mnist/2, mnist/3, mnist/4]}
  - {name: mnist-5-9, weights: $SRC/mnist-5-9.safetensors, arch: tapped_cnn, input: mnist,
     classes: [mnist/5, mnist/6, mnist/7, mnist/8, mnist/9]}
EOF
  if [ "${1:-}" = all ]; then
    cat <<EOF
  - {name: fashion-0-4, weights: $SRC/fashion-0-4.safetensors, arch: tapped_cnn, input: fashion,
     classes: [fashion/T-shirt/top, fashion/Trouser, fashion/Pullover, fashion/Dress, fashion/Coat]}
  - {name: fashion-5-9, weights: $SRC/fashion-5-9.safetensors, arch: tapped_cnn, input: fashion,
     classes: [fashion/Sandal, fashion/Shirt, fashion/Sneaker, fashion/Bag, fashion/Ankle boot]}
EOF
  fi
}
import_spec > "$W/import-mnist.yaml"
import_spec all > "$W/import-all.yaml"

# One job for the whole scenario: the pool (both datasets, fixed) and the store do not change;
# only the zoo grows. The pool has Fashion images from the start: it is unlabeled data.
cat > "$W/job.yaml" <<EOF
version: 1
name: scenario
zoo: zoo/zoo.yaml
pool:
  sources: [{dataset: mnist, count: $((POOL / 2))}, {dataset: fashion, count: $((POOL - POOL / 2))}]
calibration: standardize
amalgamation: {mode: pca, strategy: dfa, widths: {default: 0.4}}
stages: {epochs: $STAGE_EPOCHS, lr: 0.01, workers: 2}
joint: {epochs: $JOINT_EPOCHS}
baselines: {kd: false, supervised: false}
evaluation:
  test: {sources: [{dataset: mnist, split: test, count: 2000}, {dataset: fashion, split: test, count: 2000}]}
  latency: false
store: {uri: store}
extraction: {actors: 2, shard_size: 1024}
retrain: {holdout: 0.1, tolerance: 0.01}
EOF

step "1. two MNIST teachers, imported" "$AMALGAM" zoo import "$W/import-mnist.yaml" --out "$W/zoo"
"$AMALGAM" zoo import "$W/import-mnist.yaml" --out "$W/zoo"

step "2. first retrain: no champion" "$AMALGAM" retrain "$W/job.yaml" --out "$W/runs/v1"
t0=$SECONDS
"$AMALGAM" retrain "$W/job.yaml" --out "$W/runs/v1" 2>&1 | grep -E '^\[retrain\]|^  (unchanged|new|changed|removed):|^amalgam: error'
t_v1=$((SECONDS - t0))

step "3. same zoo again (what the nightly RayCronJob does)" "$AMALGAM" retrain "$W/job.yaml"
t0=$SECONDS
"$AMALGAM" retrain "$W/job.yaml"
t_noop=$((SECONDS - t0))

step "4. the two Fashion teachers added" "$AMALGAM" zoo import "$W/import-all.yaml" --out "$W/zoo" --force
sha_before=$(sha256sum "$W/zoo/mnist-0-4.safetensors" "$W/zoo/mnist-5-9.safetensors")
"$AMALGAM" zoo import "$W/import-all.yaml" --out "$W/zoo" --force
sha_after=$(sha256sum "$W/zoo/mnist-0-4.safetensors" "$W/zoo/mnist-5-9.safetensors")
[ "$sha_before" = "$sha_after" ] && echo "(the MNIST teachers' files are byte-identical after the re-import)"

step "5a. what a retrain would do" "$AMALGAM" retrain "$W/job.yaml" --dry-run
"$AMALGAM" retrain "$W/job.yaml" --dry-run

step "5b. retrain" "$AMALGAM" retrain "$W/job.yaml" --out "$W/runs/v2"
t0=$SECONDS
"$AMALGAM" retrain "$W/job.yaml" --out "$W/runs/v2" 2>&1 | grep -E '^\[retrain\]|^  (unchanged|new|changed|removed):|^amalgam: error'
t_v2=$((SECONDS - t0))

step "6. the registry" "$AMALGAM" registry list --store "$W/store"
"$AMALGAM" registry list --store "$W/store"

printf '\n=== what each retrain ran (retrain.json)\n'
"$PY" - "$W" "$t_v1" "$t_noop" "$t_v2" <<'EOF'
import json, sys
from pathlib import Path

w, secs = Path(sys.argv[1]), dict(zip(["v1", "noop", "v2"], map(int, sys.argv[2:])))
print("| retrain | zoo | plan | teachers run | teacher forwards (extraction + held-out) | read from the store "
      "| comprehensive | promoted | wall s |")
print("|---|---|---|---|---:|---|---:|---|---:|")
for v in ("v1", "v2"):
    r = json.loads((w / "runs" / v / "retrain.json").read_text())
    d, fw = r["diff"], r["teacher_forwards"]
    ran = d["new"] + d["changed"] if r["mode"] == "incremental" else d["unchanged"] + d["new"] + d["changed"]
    kept = ", ".join(d["unchanged"]) + " (codes, logits, held-out logits)" if r["mode"] == "incremental" else "-"
    verdict = ("yes" if r["promoted"] else "no") + f": {r['decision']}"
    print(f"| {v} | {len(d['unchanged'] + d['new'] + d['changed'])} teachers | {r['mode']} "
          f"({r['amalgamation']['done']}) | {', '.join(ran)} | {fw['total']:,} ({fw['extraction']:,} + "
          f"{fw['holdout']:,}) | {kept} | {r['comprehensive']:.4f} | {verdict} | {secs[v]} |")
print(f"| (unchanged zoo) | 2 teachers | nothing to do | - | 0 | - | - | - | {secs['noop']} |")
EOF
printf '\nscenario: %d s in all; work directory %s\n' "$((SECONDS - t_start))" "$W"
