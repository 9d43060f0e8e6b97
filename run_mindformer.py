#!/usr/bin/env python
"""MindFormers' name for run_finetune.py: the same entry point, flags and YAMLs.

    python run_mindformer.py --config configs/llama2/lora_llama2_7b.yaml --run_mode finetune \
        --use_parallel False --train_dataset_dir DATA --load_checkpoint BASE
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mftune.trainer.main import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
