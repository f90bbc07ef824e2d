#!/usr/bin/env bash
# Run a spec (a static merge or an evolution) and push the result to the Hub, then collect the card and plots.
# This is what .github/workflows/push-to-hub.yml and action.yml run; tests/test_automation.py runs it against
# the local Hub-protocol server. The token comes from HF_TOKEN (never an argument, never printed).
#
# usage: scripts/push_to_hub.sh SPEC REPO_ID WORK_DIR
#   env: PRIVATE=true (create the repo private), HF_M2N2 (the command, default hf-m2n2),
#        HF_ENDPOINT (Hub URL), PREPARE (a shell command run first, e.g. building the demo seeds)
# writes: WORK_DIR/result (the merge output or the evolve run directory), WORK_DIR/artifacts (card, plots, report)
set -euo pipefail

if [[ $# -ne 3 ]]; then
  echo "usage: $0 SPEC REPO_ID WORK_DIR" >&2
  exit 2
fi
spec=$1
repo_id=$2
work=$3
hf_m2n2=${HF_M2N2:-hf-m2n2}
private=()
if [[ ${PRIVATE:-false} == true ]]; then
  private=(--private)
fi

if [[ -n ${PREPARE:-} ]]; then
  bash -c "$PREPARE"
fi
mkdir -p "$work"
result="$work/result"
# validate tells an evolve spec from a merge spec by the package's one rule (hf_m2n2.spec.is_evolve_spec)
summary=$($hf_m2n2 validate "$spec")
kind=merge
if [[ $summary == *" evolve spec ("* ]]; then
  kind=evolve
fi
if [[ $kind == evolve ]]; then
  $hf_m2n2 evolve "$spec" --out "$result" --overwrite --push "$repo_id" "${private[@]}"
  model="$result/model"
else
  $hf_m2n2 merge "$spec" "$result" --overwrite --push "$repo_id" "${private[@]}"
  model="$result"
fi

artifacts="$work/artifacts"
rm -rf "$artifacts"
mkdir -p "$artifacts"
for file in "$model"/README.md "$model"/card.json "$model"/*.png "$model"/merge_config.yaml "$model"/recipe.json \
  "$result"/report.json "$result"/*.png; do
  if [[ -f $file ]]; then
    cp "$file" "$artifacts/"
  fi
done
echo "artifacts in $artifacts"
