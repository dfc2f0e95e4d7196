#!/usr/bin/env bash
# Whole-process wall-clock seconds of the bare training commands of a recipe, no workdir (no
# checkpoints), Flax and torch alternating, ROUNDS rounds; appended to DIR/command_time.txt.
# Usage: bash results/time_command.sh RECIPE DIR ROUNDS   e.g. results/time_command.sh fast results/fast 3
set -euo pipefail
recipe=$1 dir=$2 rounds=$3
mkdir -p "$dir"
echo "# $(date -u +%FT%TZ) python -m {flax_impl,torch_ref}.train --recipe $recipe; $(python -c 'from compare.machine import cpu_name, vector_extensions; import os; print(cpu_name(), vector_extensions(), os.cpu_count(), "cores")')" \
  >> "$dir/command_time.txt"
for round in $(seq "$rounds"); do
  for module in flax_impl.train torch_ref.train; do
    start=$(date +%s.%N)
    final=$(python -m "$module" --recipe "$recipe" 2>/dev/null | grep -o 'final test accuracy [0-9.]*%')
    printf '%s round%s %.1f s  %s\n' "${module%%.*}" "$round" \
      "$(awk "BEGIN {print $(date +%s.%N) - $start}")" "$final" | tee -a "$dir/command_time.txt"
  done
done
