#!/bin/bash
# Times every experiments/*.yaml from the CLI, as a user runs it, for the
# durations stated in each file's header. Pretraining of the models other
# than LeNet-5 is timed separately first (the zoo caches it).
#   bash benchmarks/time_experiments.sh [OUT_DIR]
set -u
cd "$(dirname "$0")/.."
out=${1:-runs/timing}
mkdir -p "$out"
recovjax=.venv/bin/recovjax
for model in mlp rescnn vit; do
  start=$(date +%s.%N)
  $recovjax pretrain --model "$model" > "$out/pretrain-$model.log" 2>&1
  status=$?
  echo "pretrain $model rc=$status $(echo "$(date +%s.%N) - $start" | bc) s" | tee -a "$out/times.txt"
done
for config in experiments/*.yaml; do
  name=$(basename "$config" .yaml)
  rm -rf "$out/$name"
  start=$(date +%s.%N)
  $recovjax --quiet recover --config "$config" --run-dir "$out/$name" > "$out/$name.log" 2>&1
  status=$?
  echo "experiment $name rc=$status $(echo "$(date +%s.%N) - $start" | bc) s" | tee -a "$out/times.txt"
done
