"""run_finetune.py (a real subprocess) starting from a Hugging Face directory, and
--only_save_strategy. Expected values: the losses of the same weights given as a complete mftune file,
and the strategy a one-process layout records."""
import json
import os

import torch
import transformers

from mftune.checkpoint.formats.single_file import save_complete


def test_finetune_starts_from_a_hugging_face_directory(tmp_path):
    """run_finetune.py --load_checkpoint HF_DIR trains exactly as from the same weights saved as a
    complete mftune file (the same per-step losses)."""
    import subprocess
    import sys

    from mftune.checkpoint.names import hf_to_mftune

    import parity as pp

    config = pp.make_workdir(str(tmp_path))
    m = pp.MODEL
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=m["hidden_size"], intermediate_size=176, num_hidden_layers=m["num_layers"],
        num_attention_heads=m["num_heads"], num_key_value_heads=m["n_kv_heads"], vocab_size=m["vocab_size"],
        max_position_embeddings=m["seq_length"], rms_norm_eps=1e-5, tie_word_embeddings=False))
    hf.save_pretrained(tmp_path / "hf", max_shard_size="200KB")
    save_complete(str(tmp_path / "same.safetensors"), {hf_to_mftune(k): v for k, v in hf.state_dict().items()},
                  model_config=dict(m))
    losses = []
    for name, ckpt in (("from-hf", tmp_path / "hf"), ("from-file", tmp_path / "same.safetensors")):
        out = str(tmp_path / name)
        r = subprocess.run([sys.executable, *pp._args(config, "finetune", out, 1, 1, {}), "--load_checkpoint",
                            str(ckpt)], cwd=pp.ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        losses.append(pp.losses(out))
    assert len(losses[0]) == pp.STEPS and losses[0] == losses[1]


def test_only_save_strategy_writes_the_strategy_and_exits(tmp_path):
    import subprocess
    import sys

    import parity as pp

    config = pp.make_workdir(str(tmp_path))
    out = str(tmp_path / "out")
    r = subprocess.run([sys.executable, *pp._args(config, "finetune", out, 1, 1, {}), "--only_save_strategy", "True"],
                       cwd=pp.ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(os.path.join(out, "strategy", "ckpt_strategy_rank_0.json")) as f:
        strategy = json.load(f)
    wq = strategy["tensors"]["model.layers.0.attention.wq.weight"]
    assert wq["global_shape"] == [64, 64] and wq["block"] == [[0, 64], [0, 64]] and wq["dtype"] == "float32"
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))  # no training
