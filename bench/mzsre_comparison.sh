#!/usr/bin/env bash
# The MzsRE method comparison of docs/results.md: records 0-99, edit in English,
# evaluate in all 12 languages, embedded model. Runs one method after another;
# each run checkpoints (every 5 edits, LAFN every edit), so running this script again resumes an
# unfinished run where it stopped (--ckpt_path last) and skips finished ones.
#
#   bash bench/mzsre_comparison.sh [DATA_DIR] [RUN ...]
#
# DATA_DIR defaults to ../shared/data/mzsre; RUN names (default: all, in this
# order): ft_l memla lora memla-no_independent memla-no_specific lafn
# memla-sequential lafn-sequential (MEMLA in the authors' reading, configs/mzsre/memla_authors.yaml);
# also memla-preserve memla-preserve-sequential (configs/mzsre/memla.yaml as shipped, with
# preservation), rome memit alphaedit alphaedit-sequential memit-sequential (the locate-then-edit
# family, docs/methods.md) and memla-busy_filter (MEMLA with busy
# neurons dropped from its masks, configs/mzsre/busy_filter.yaml). Outputs: runs/mzsre-<RUN>/version_0/
# (results.json, edits.csv, heatmaps, deltas/), then the comparison in
# runs/mzsre-compare/ (mke report). MKE_RUNS=DIR puts them under DIR instead of
# runs/, so that a run resumed from a fresh clone finds its checkpoint
# (MKE_RUNS=~/mke-runs bash bench/mzsre_comparison.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/mzsre}
shift || true
RUNS=("$@")
if [ ${#RUNS[@]} -eq 0 ]; then
  RUNS=(ft_l memla lora memla-no_independent memla-no_specific lafn memla-sequential lafn-sequential)
fi
MKE=${MKE:-mke}
AUTHORS=configs/mzsre/memla_authors.yaml   # the eight runs' MEMLA: no preservation terms
OUT=${MKE_RUNS:-runs}

run() {  # run NAME CONFIG [EXTRA ARGS...]
  local name=$1 config=$2
  shift 2
  local dir=$OUT/mzsre-$name
  if [ -f "$dir/version_0/results.json" ]; then
    echo "== $name: done ($dir/version_0/results.json)"
    return
  fi
  local resume=()
  if [ -f "$dir/checkpoints/last.ckpt" ]; then
    resume=(--ckpt_path last)
    echo "== $name: resuming from $dir/checkpoints/last.ckpt"
  else
    echo "== $name: starting"
  fi
  "$MKE" fit --config "$config" --data.path "$DATA" \
    --trainer.logger.init_args.save_dir "$OUT" \
    --trainer.logger.init_args.name "mzsre-$name" --trainer.logger.init_args.version 0 \
    "$@" "${resume[@]}"
}

for r in "${RUNS[@]}"; do
  case $r in
    ft_l | lora | lafn | rome | memit | alphaedit) run "$r" "configs/mzsre/$r.yaml" ;;
    memla) run "$r" configs/mzsre/memla.yaml --config configs/mzsre/memla_authors.yaml ;;
    memla-preserve) run "$r" configs/mzsre/memla.yaml ;;
    memla-no_independent) run "$r" configs/mzsre/memla.yaml --config "$AUTHORS" --model.lora.categories '[specific]' ;;
    memla-no_specific) run "$r" configs/mzsre/memla.yaml --config "$AUTHORS" --model.lora.categories '[independent]' ;;
    memla-busy_filter) run "$r" configs/mzsre/memla.yaml --config "$AUTHORS" --config configs/mzsre/busy_filter.yaml ;;
    memla-sequential) run "$r" configs/mzsre/memla.yaml --config "$AUTHORS" --model.protocol sequential ;;
    memla-preserve-sequential) run "$r" configs/mzsre/memla.yaml --model.protocol sequential ;;
    lafn-sequential | alphaedit-sequential | memit-sequential)
      run "$r" "configs/mzsre/${r%-sequential}.yaml" --model.protocol sequential ;;
    *) echo "unknown run $r" >&2; exit 2 ;;
  esac
done

# the comparison of every finished run (an unfinished one has no results.json yet)
# in the order of the runs above, each named by its RUN name
finished=()
labels=()
for r in ft_l lora memla memla-no_independent memla-no_specific memla-busy_filter lafn memla-sequential lafn-sequential; do
  if [ -f "$OUT/mzsre-$r/version_0/results.json" ]; then
    finished+=("$OUT/mzsre-$r/version_0")
    labels+=("$r")
  fi
done
if [ ${#finished[@]} -gt 0 ]; then
  "$MKE" report "${finished[@]}" --labels "${labels[@]}" --output "$OUT/mzsre-compare"
fi
