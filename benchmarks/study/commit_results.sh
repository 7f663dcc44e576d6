#!/usr/bin/env bash
# Lands the fill-rule study's cells as they finish (a cell not committed is lost with the machine):
#   benchmarks/study/commit_results.sh STUDY_TREE MAIN_CHECKOUT PYTHON
# Every 2 minutes: copies each new or changed docs/study/fill-*/*/result.json from the study worktree into the main
# checkout; when any landed, re-renders the three pages there (--table-only: the noisy pages compare with the clean
# one) and the cross-noise control (docs/study/fill-verdict.md, benchmarks/study/fill_verdict.py), and commits
# docs/study/fill-* only (nothing else of the checkout). Runs until killed.
set -u
tree=${1:?study worktree}; main=${2:?main checkout}; python=${3:?python of the venv}
while true; do
  new=0
  for name in clean swap30 numbers30; do
    for result in "$tree/docs/study/fill-$name"/*/result.json; do
      [ -f "$result" ] || continue
      cell=$(basename "$(dirname "$result")") target="$main/docs/study/fill-$name"
      if ! cmp -s "$result" "$target/$cell/result.json"; then
        mkdir -p "$target/$cell" && cp "$result" "$target/$cell/result.json" && new=1
      fi
    done
  done
  if [ "$new" = 1 ]; then
    cd "$main" || exit 1
    for name in clean swap30 numbers30; do
      if ls "docs/study/fill-$name"/*/result.json >/dev/null 2>&1; then
        HF_HUB_OFFLINE=1 "$python" -m trl_qtuning.cli.main bench --config "recipes/bench/study_gsm8k_fill_$name.yaml" \
          --table-only >/dev/null || echo "$(date -u +%FT%TZ) rendering fill-$name failed"
      fi
    done
    HF_HUB_OFFLINE=1 "$python" benchmarks/study/fill_verdict.py --write >/dev/null \
      || echo "$(date -u +%FT%TZ) writing fill-verdict.md failed"
    dirs=$(ls -d docs/study/fill-* 2>/dev/null)
    git add $dirs && git commit -q -m "study (fill rules): finished cell results (pages re-rendered)" -- $dirs \
      && echo "$(date -u +%FT%TZ) committed $dirs"
  fi
  sleep 120
done
