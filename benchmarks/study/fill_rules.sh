#!/usr/bin/env bash
# The fill-rule study (issue 25; docs/results.md#noise-aware-fill-rules), stage by stage, resumable:
#   benchmarks/study/fill_rules.sh STUDY_TREE PYTHON
# STUDY_TREE: a worktree of this repository the cells run from (git worktree add --detach STUDY_TREE HEAD), so that
# commits in the main checkout never change the code a running cell imports. PYTHON: the venv's python.
# First the three base cells, then the full-data cells of the three matrices, seed by seed (the contrasts' validation:
# noisy minus clean), then the other four methods of both noisy matrices, seed by seed. Each stage runs a copy of a
# committed matrix with only `seeds` narrowed (same fingerprints); finished cells are skipped, so rerunning the script
# resumes.
set -u
tree=${1:?study worktree}; python=${2:?python of the venv}
stages=$(mktemp -d)
cd "$tree" || exit 1
stage() {  # matrix seed methods...
  local name=$1 seed=$2; shift 2
  local config=$stages/${name}_s${seed}.yaml
  sed "s/^seeds: .*/seeds: [${seed}]/" "recipes/bench/study_gsm8k_fill_${name}.yaml" > "$config"
  echo "== $(date -u +%FT%TZ) stage $name seed $seed: $*"
  PYTHONPATH="$tree" HF_HUB_OFFLINE=1 "$python" -m trl_qtuning.cli.main bench --config "$config" --only "$@"
  echo "== $(date -u +%FT%TZ) stage done ($?)"
}
for name in clean swap30 numbers30; do  # the untrained model first: every page can render once these landed
  stage "$name" 0 base
done
for seed in 0 1 2; do
  stage clean "$seed" base full
  stage swap30 "$seed" base full
  stage numbers30 "$seed" base full
done
for seed in 0 1 2; do
  for name in swap30 numbers30; do
    stage "$name" "$seed" random-random qtuning qtuning-q1-last qtuning-least-suspect
  done
done
echo "== all stages done"
