"""LoRA merge (mftune.checkpoint.merge, scripts/transform_ckpt_lora.py; MindFormers' transform_ckpt_lora.py).

Expected values: the merged plain model gives the LoRA model's logits (fp32, atol 1e-5) and holds the same
weights as ``mftune.pet.merge_lora`` applied to the LoRA model in memory. The LoRA checkpoint is written as
the trainer's CheckpointMonitor writes it (tests/lora_checkpoint.py). The script's Hugging Face output in
transformers: tests/e2e/test_merge_script.py.
"""
from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

from mftune.checkpoint.formats.single_file import save_complete
from mftune.checkpoint.load import fingerprint, load_checkpoint, unique_state_dict
from mftune.checkpoint.safetensors_io import load_tensors, read_metadata
from mftune.errors import CheckpointError
from mftune.checkpoint.merge import MERGED_NAME, merge_lora_checkpoint
from mftune.models.llama import LlamaForCausalLM
from mftune.pet import lora_layers, merge_lora

import lora_checkpoint
from lora_checkpoint import PET, TINY, save_lora

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "transform_ckpt_lora.py")
_spec = importlib.util.spec_from_file_location("transform_ckpt_lora", SCRIPT)
transform_ckpt_lora = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(transform_ckpt_lora)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return lora_checkpoint.build(tmp_path_factory.mktemp("merge"))


def test_merged_checkpoint_is_the_lora_model(ckpt, tmp_path):
    report = merge_lora_checkpoint(ckpt.lora_path, str(tmp_path))  # base and scaling from the header
    out = str(tmp_path / MERGED_NAME)
    assert report["output"] == out and report["merged"] == 4 and report["scaling"] == 2.0
    meta = read_metadata(out)
    assert "pet_config" not in meta["model_config"] and meta["source"]["base"] == ckpt.base_path
    merged = load_tensors(out)
    assert not any("mindpet" in k or k.startswith("adam_") or k in ("epoch_num", "step_num") for k in merged)

    plain = LlamaForCausalLM(dict(meta["model_config"])).eval()
    assert not lora_layers(plain)
    loaded = load_checkpoint(plain, out)
    assert not loaded["unused"] and not loaded["fresh_lora"]
    with torch.no_grad():
        logits = plain(ckpt.x)
    torch.testing.assert_close(logits, ckpt.lora_logits, atol=1e-5, rtol=0)
    assert (logits - ckpt.base_logits).abs().max() > 1e-2

    reference = merge_lora(copy.deepcopy(ckpt.lora_model)).state_dict()
    assert set(merged) == {k for k in reference if "mindpet" not in k}
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, reference[name], atol=1e-6, rtol=0, msg=name)


def test_an_rslora_checkpoint_merges_with_its_scaling(tmp_path):
    """use_rslora recorded in the header: scaling lora_alpha / sqrt(lora_rank) = 8 / 2, the LoRA model's logits."""
    rs = lora_checkpoint.build(tmp_path, {**PET, "use_rslora": True})
    report = merge_lora_checkpoint(rs.lora_path, str(tmp_path / "merged"))
    assert report["scaling"] == 4.0
    plain = LlamaForCausalLM(dict(read_metadata(report["output"])["model_config"])).eval()
    load_checkpoint(plain, report["output"])
    with torch.no_grad():
        torch.testing.assert_close(plain(rs.x), rs.lora_logits, atol=1e-5, rtol=0)


def test_a_dora_checkpoint_merges_to_the_dora_model(tmp_path):
    """use_dora: each adapted W becomes m / ||W + dW|| * (W + dW); the merged plain model gives the DoRA model's
    logits."""
    dora = lora_checkpoint.build(tmp_path, {**PET, "use_dora": True})
    assert any(k.endswith("mindpet_delta_lora_magnitude") for k in dora.tensors)
    report = merge_lora_checkpoint(dora.lora_path, str(tmp_path / "merged"))
    plain = LlamaForCausalLM(dict(read_metadata(report["output"])["model_config"])).eval()
    load_checkpoint(plain, report["output"])
    with torch.no_grad():
        torch.testing.assert_close(plain(dora.x), dora.lora_logits, atol=1e-5, rtol=0)
    assert (dora.lora_logits - dora.base_logits).abs().max() > 1e-2


def test_a_dora_checkpoint_missing_a_magnitude_is_refused(tmp_path):
    dora = lora_checkpoint.build(tmp_path, {**PET, "use_dora": True})
    broken = {k: v for k, v in dora.tensors.items() if k != "model.layers.1.attention.wv.mindpet_delta_lora_magnitude"}
    path = str(tmp_path / "broken.safetensors")
    save_lora(path, broken, dora.mc, dora.recorded, {**PET, "use_dora": True})
    with pytest.raises(CheckpointError, match=r"DoRA magnitudes for some adapted weights but none for "
                                              r"model\.layers\.1\.attention\.wv\.weight"):
        merge_lora_checkpoint(path, str(tmp_path / "m"))


def test_lora_scaling_overrides_the_header(ckpt, tmp_path):
    report = merge_lora_checkpoint(ckpt.lora_path, str(tmp_path), lora_scaling=0.5)
    assert report["scaling"] == 0.5
    merged, base = load_tensors(report["output"]), load_tensors(ckpt.base_path)
    name = "model.layers.1.attention.wv"
    a, b = ckpt.tensors[f"{name}.mindpet_delta_lora_a"], ckpt.tensors[f"{name}.mindpet_delta_lora_b"]
    torch.testing.assert_close(merged[f"{name}.weight"], base[f"{name}.weight"] + b @ a * 0.5, atol=1e-6, rtol=0)
    torch.testing.assert_close(merged["model.layers.1.attention.wk.weight"], base["model.layers.1.attention.wk.weight"],
                               atol=0, rtol=0)  # not adapted: copied as is


def test_peft_adapter_source_gives_the_same_merge(ckpt, tmp_path):
    from mftune.checkpoint.export import export_peft_adapter
    adapter = tmp_path / "adapter"
    export_peft_adapter(ckpt.lora_path, str(adapter), fallback={"lora_dropout": 0.0})
    with pytest.raises(CheckpointError, match="model_config"):  # a PEFT adapter records no base
        merge_lora_checkpoint(str(adapter), str(tmp_path / "a"))
    report = merge_lora_checkpoint(str(adapter), str(tmp_path / "b"), base_path=ckpt.base_path)
    expected = merge_lora_checkpoint(ckpt.lora_path, str(tmp_path / "c"))
    got, want = load_tensors(report["output"]), load_tensors(expected["output"])
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_fingerprint_mismatch_is_an_error(ckpt, tmp_path, capsys):
    other = str(tmp_path / "other_base.safetensors")
    torch.manual_seed(5)
    save_complete(other, unique_state_dict(LlamaForCausalLM(dict(TINY))), model_config=ckpt.mc,
                  extra_metadata={"run_mode": "other"})  # the fingerprint hashes the header, not the data
    assert fingerprint(other) != ckpt.recorded["fingerprint"]
    argv = ["--src_ckpt_path_or_dir", ckpt.lora_path, "--dst_ckpt_dir", str(tmp_path / "out"),
            "--base_checkpoint", other]
    assert transform_ckpt_lora.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fingerprint" in err and "--ignore_fingerprint" in err
    assert not (tmp_path / "out" / MERGED_NAME).exists()
    assert transform_ckpt_lora.main([*argv, "--ignore_fingerprint"]) == 0
    assert (tmp_path / "out" / MERGED_NAME).exists()


def test_missing_adapter_half_is_an_error(ckpt, tmp_path, capsys):
    broken = dict(ckpt.tensors)
    del broken["model.layers.0.attention.wv.mindpet_delta_lora_b"]
    path = str(tmp_path / "broken.safetensors")
    save_lora(path, broken, ckpt.mc, ckpt.recorded)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.attention\.wv\.mindpet_delta_lora_a has no"):
        merge_lora_checkpoint(path, str(tmp_path / "out"))
    assert transform_ckpt_lora.main(["--src_ckpt_path_or_dir", path, "--dst_ckpt_dir", str(tmp_path / "out")]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_outputs_never_replace_inputs(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="dst_ckpt_dir"):  # the HF writer would clean the base's folder
        merge_lora_checkpoint(ckpt.lora_path, str(ckpt.dir), output_format="hf")
    lora_dir = tmp_path / "lora_as_dir"
    lora_dir.mkdir()
    os.link(ckpt.lora_path, lora_dir / "lora.safetensors")
    with pytest.raises(CheckpointError, match="dst_ckpt_dir"):  # the output would join the input directory
        merge_lora_checkpoint(str(lora_dir), str(lora_dir))


def test_distributed_lora_source(ckpt, tmp_path):
    """rank_*/ folders (each rank's half of every B along dim 0, A replicated) merge like the complete file."""
    root = tmp_path / "dist"
    for rank in (0, 1):
        tensors, shards = {}, {}
        for name, t in ckpt.tensors.items():
            if name.endswith("lora_b"):
                half = t.shape[0] // 2
                tensors[name] = t[rank * half:(rank + 1) * half].clone()
                shards[name] = {"global_shape": list(t.shape),
                                "block": [[rank * half, (rank + 1) * half], [0, t.shape[1]]]}
            else:
                tensors[name] = t
        save_complete(str(root / f"rank_{rank}" / f"lora_rank_{rank}-1_3.safetensors"), tensors,
                      model_config={**ckpt.mc, "pet_config": PET},
                      extra_metadata={"pet_config": PET, "base_checkpoint": ckpt.recorded,
                                      "shards": {"rank": rank, "tensors": shards}})
    got = load_tensors(merge_lora_checkpoint(str(root), str(tmp_path / "a"))["output"])
    want = load_tensors(merge_lora_checkpoint(ckpt.lora_path, str(tmp_path / "b"))["output"])
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
