#!/bin/bash
# MindFormers' msrun_launcher.sh on torchrun. The forms, defaults, checks and usage text live in
# mftune/launch.py (tested there); this file only puts the repository on PYTHONPATH, as msrun does.
#   bash scripts/launcher.sh "run_finetune.py --config CONFIG --run_mode finetune" 8
ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${ROOT_DIR}${PYTHONPATH:+:${PYTHONPATH}}"
exec python -m mftune.launch "$@"
