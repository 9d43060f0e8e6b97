#!/bin/bash
# MindFormers' name for scripts/launcher.sh: the same launcher (msrun_launcher.sh's forms on torchrun),
# so the commands of MindFormers' docs run as written:
#   bash scripts/msrun_launcher.sh "run_mindformer.py --config CONFIG --run_mode finetune" 8
ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${ROOT_DIR}${PYTHONPATH:+:${PYTHONPATH}}"
export MFTUNE_LAUNCHER="scripts/msrun_launcher.sh"
exec python -m mftune.launch "$@"
