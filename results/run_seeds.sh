#!/usr/bin/env bash
# Train one recipe for several seeds in both frameworks, one run at a time (the machine alone),
# and keep what each run left: DIR/<framework>/seed<N>.{jsonl,config.json,log}, and the whole
# process's wall-clock seconds (start-up, data, compilation and evaluation included) in
# DIR/whole_process.txt. Usage: bash results/run_seeds.sh RECIPE DIR SEED...
# e.g. bash results/run_seeds.sh fast results/fast 0 1 2 3 4
set -euo pipefail
recipe=$1 dir=$2
shift 2
mkdir -p "$dir"
echo "# $(date -u +%FT%TZ) recipe $recipe; $(python -c 'from compare.machine import cpu_name, vector_extensions; import os; print(cpu_name(), vector_extensions(), os.cpu_count(), "cores")')" \
  >> "$dir/whole_process.txt"
for framework in flax torch; do
  module=$([ "$framework" = flax ] && echo flax_impl.train || echo torch_ref.train)
  mkdir -p "$dir/$framework"
  for seed in "$@"; do
    work=$(mktemp -d)
    start=$(date +%s.%N)
    python -m "$module" --recipe "$recipe" --seed "$seed" --workdir "$work/run" \
      > "$dir/$framework/seed$seed.log" 2>&1
    seconds=$(awk "BEGIN {print $(date +%s.%N) - $start}")
    cp "$work/run/metrics.jsonl" "$dir/$framework/seed$seed.jsonl"
    cp "$work/run/config.json" "$dir/$framework/seed$seed.config.json"
    rm -rf "$work"
    printf '%s seed%s %.1f s  %s\n' "$framework" "$seed" "$seconds" \
      "$(grep -o 'final test accuracy [0-9.]*%' "$dir/$framework/seed$seed.log")" \
      | tee -a "$dir/whole_process.txt"
  done
done
