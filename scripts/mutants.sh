#!/usr/bin/env bash
# Mutation testing of dpm's core, one group of modules at a time:
#   scripts/mutants.sh exec|comm|parallel|autodiff|checkpoint|proto|deploy|fusion|pool|lanes|sum|snapshot|conv|host|update [extra cargo-mutants flags]
# Each group's mutants are judged by the integration tests that exercise it
# (they live in the facade package, hence --baseline skip: run
# `cargo test --workspace` first). Results land in target/mutants-report/GROUP/mutants.out/.
# The README's "Testing" section has the catch rates.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-mutants >/dev/null || cargo install --locked cargo-mutants
group=${1:?usage: scripts/mutants.sh exec|comm|parallel|autodiff|checkpoint|proto|deploy|fusion|pool|lanes|sum|snapshot|conv|host|update}
shift
case $group in
  exec) files=('dpm-core/src/exec/*.rs'); tests=(executors collectives parallel checkpoints) ;;
  comm) files=('dpm-core/src/comm/*.rs'); tests=(collectives executors parallel) ;;
  parallel) files=('dpm-core/src/parallel/*.rs'); tests=(parallel checkpoints device_model data_parallel) ;;
  autodiff) files=('dpm-core/src/autodiff/*.rs'); tests=(gradients conv_ops parallel) ;;
  checkpoint) files=(dpm-core/src/checkpoint.rs); tests=(checkpoints parallel) ;;
  proto) files=(dpm-core/src/proto.rs); tests=(proto executors parallel) ;;
  deploy) files=('dpm-core/src/deploy/*.rs' 'dpm-core/src/deploy/onnx/*.rs'); tests=(deploy onnx summary caffe2_compat) ;;
  # Gradient buckets' flat buffers and the executor's fusions (with their unit tests).
  fusion) files=(dpm-core/src/tensor/flat.rs dpm-core/src/exec/fuse.rs); tests=(parallel fusion reliability trace --lib) ;;
  # The dag executor's kept threads and its pool-or-inline choice (with their unit tests).
  pool) files=(dpm-core/src/exec/pool.rs dpm-core/src/exec/tune.rs); tests=(executors parallel --lib) ;;
  # The fixed order of data-parallel nets' replicas (with its unit test).
  lanes) files=(dpm-core/src/exec/lanes.rs); tests=(executors parallel --lib) ;;
  # Sums: the kernel that reads its first input itself and the fused sum + relu
  # (their mutants only: add --re 'Sum|sum_|absorbable_relu' to skip the other
  # elementwise kernels, which other tests judge).
  sum) files=(dpm-core/src/ops/cpu/elementwise.rs dpm-core/src/exec/fuse.rs dpm-core/src/exec/plan.rs); tests=(fusion gradients parallel executors --lib) ;;
  # What atomic steps save, op by op (with its unit test).
  snapshot) files=(dpm-core/src/exec/snapshot.rs); tests=(reliability checkpoints --lib) ;;
  # Direct convolution: layouts (and reading in place) and register tiles
  # (add --re to pick functions: the whole of it is some 400 mutants).
  conv) files=('dpm-core/src/ops/cpu/conv/*.rs'); tests=(conv_ops gradients --lib) ;;
  # Host memory aligned to cache lines (with its unit tests).
  host) files=(dpm-core/src/tensor/host.rs); tests=(proto checkpoints --lib) ;;
  # Momentum updates and the decay fused into them (add --re
  # 'decay_then_momentum|DecayMomentumSgdUpdate|Momentum>::step|MomentumSgdUpdate|update_outputs|next_reader'
  # to skip the other optimizers and fusions).
  update) files=(dpm-core/src/ops/cpu/optim.rs dpm-core/src/exec/fuse.rs); tests=(fusion optimizers reliability --lib) ;;
  *) echo "unknown group $group" >&2; exit 2 ;;
esac
args=()
for f in "${files[@]}"; do args+=(-f "$f"); done
testargs=()
for t in "${tests[@]}"; do
  case $t in --*) testargs+=("$t") ;; *) testargs+=(--test "$t") ;; esac
done
mkdir -p "target/mutants-report/$group"
exec cargo mutants -p dpm-core --baseline skip --timeout 60 --build-timeout 900 \
  "${args[@]}" -o "target/mutants-report/$group" "$@" -- "${testargs[@]}"
