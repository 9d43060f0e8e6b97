#!/usr/bin/env python
"""Train / fine-tune Llama2 from a MindFormers YAML (the run_mindformer.py of mftune).

    python run_finetune.py --config configs/llama2/lora_llama2_7b.yaml --run_mode finetune \
        --use_parallel False --train_dataset_dir DATA --load_checkpoint BASE.safetensors
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mftune.trainer.main import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
