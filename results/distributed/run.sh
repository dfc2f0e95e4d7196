#!/usr/bin/env bash
# Two processes against one, both frameworks, on this machine (CPU, gloo): 2 epochs on the
# first 12,800 training images, dropout and rotation off. Writes the logs beside this script.
# Usage: bash results/distributed/run.sh   (from the repository root, venv active; ~5 min)
set -euo pipefail
out=results/distributed
work=$(mktemp -d)
flags=(--epochs 2 --train-examples 12800 --dropout 0 --max-rotation 0)
port=$((20000 + RANDOM % 20000))
{
  echo "# $(date -u +%FT%TZ) $(python -c 'from compare.machine import cpu_name, vector_extensions; print(cpu_name(), vector_extensions())')"
  echo "## flax, 2 processes"
  python -m flax_impl.train "${flags[@]}" --workdir "$work/flax2" \
      --coordinator-address 127.0.0.1:$port --num-processes 2 --process-id 1 > /dev/null 2>&1 &
  python -m flax_impl.train "${flags[@]}" --workdir "$work/flax2" \
      --coordinator-address 127.0.0.1:$port --num-processes 2 --process-id 0 2> /dev/null
  wait
  echo "## flax, 1 process"
  python -m flax_impl.train "${flags[@]}" --workdir "$work/flax1" 2> /dev/null
  echo "## torch, torchrun --nproc-per-node 2"
  torchrun --nproc-per-node 2 --master-port $((port + 1)) -m torch_ref.train "${flags[@]}" \
      --device cpu --workdir "$work/torch2" 2> /dev/null
  echo "## torch, 1 process"
  python -m torch_ref.train "${flags[@]}" --device cpu --workdir "$work/torch1" 2> /dev/null
} | tee "$out/two_processes.log"
for run in flax2 flax1 torch2 torch1; do
  cp "$work/$run/metrics.jsonl" "$out/$run.metrics.jsonl"
done
