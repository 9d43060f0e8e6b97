"""The bad-input catalogue (issue 14, item 7): every user-facing command given one bad input at a time.

One row per case: (id, command builder, expected exit status, words the message must contain). Each case
runs as a user runs it (a subprocess in its own folder) and must end with its status (2 for a user mistake;
the launcher's usage errors and a failed job are 1, msrun_launcher's status), print no "Traceback", name the
key or file, and leave every file that existed before unchanged (names, sizes, mtimes, content hashes of the
case folder and of the shared inputs); new files may appear only where the row says (default: its output
folder ``out``). The commands of the selected cases run two at a time (``MFTUNE_TEST_JOBS``), once per module,
and each case's test checks its own result. The shared good inputs are tests/bad_inputs.py's.
"""
from __future__ import annotations

import concurrent.futures
import copy
import os
import shutil
import sys

import pytest
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import parity as pp  # noqa: E402
from bad_inputs import PY, ROOT, Case, build_shared, changes, run_case, snapshot  # noqa: E402

JOBS = int(os.environ.get("MFTUNE_TEST_JOBS", "2"))
FT = os.path.join(ROOT, "run_finetune.py")


def script(name: str, *args: str) -> list[str]:
    return [PY, os.path.join(ROOT, "scripts", name), *args]


def ft(s, d, *args: str, config: str | None = None) -> list[str]:
    """run_finetune.py on the shared config (or ``config``), output in ``d/out``, then ``args``."""
    return [PY, FT, "--config", config or s.config, "--output_dir", os.path.join(d, "out"), *args]


def launcher(*args: str, name: str = "launcher.sh") -> list[str]:
    return ["bash", os.path.join(ROOT, "scripts", name), *args]


def write(d: str, name: str, content: str | bytes) -> str:
    path = os.path.join(d, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
    return path


def config_with(s, d, *changes_: tuple[str, object], name: str = "cfg.yaml") -> str:
    """The shared config with each dotted key set to a value (``None`` deletes it), written to ``d/name``."""
    cfg = copy.deepcopy(s.cfg)
    for key, value in changes_:
        *parents, last = key.split(".")
        node = cfg
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return write(d, name, yaml.safe_dump(cfg, sort_keys=False))


def copy_into(src: str, d: str, name: str) -> str:
    dst = os.path.join(d, name)
    (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, dst)
    return dst


def truncated(src: str, d: str, name: str, keep: float = 0.5) -> str:
    path = copy_into(src, d, name)
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))
    return path


def safetensors_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save
    return save({k: v.contiguous() for k, v in tensors.items()})


def base_without(s, d, drop: str) -> str:
    from safetensors.torch import load_file
    tensors = load_file(s.base)
    del tensors[drop]
    return write(d, "partial.safetensors", safetensors_bytes(tensors))


def dataset(d, name, **columns) -> str:
    import datasets
    path = os.path.join(d, name)
    datasets.Dataset.from_dict(columns).save_to_disk(path)
    return path


def hf_dir_with(s, d, file: str, content: str | bytes | None) -> str:
    """A copy of the shared Hugging Face directory with ``file`` replaced (None: removed)."""
    hf = copy_into(s.hf, d, "hf")
    if content is None:
        os.remove(os.path.join(hf, file))
    else:
        write(hf, file, content)
    return hf


def previous_run(s, d) -> str:
    """``d/out`` as an earlier run left it: its outputs, its log and a checkpoint; returns ``d/out``."""
    out = os.path.join(d, "out")
    for name, text in (("resolved_config.yaml", "seed: 1\n"), ("metrics.jsonl", '{"step": 1, "loss": 2.5}\n'),
                       ("run_summary.json", '{"status": "finished"}\n'), ("log/rank_0/info.log", "earlier run\n"),
                       ("checkpoint/rank_0/meta.json", '{"last_step": 3}\n')):
        write(out, name, text)
    shutil.copy2(s.lora, os.path.join(out, "checkpoint", "rank_0", "llama_7b_lora_rank_0-1_3.safetensors"))
    return out


EARLIER = ("out/resolved_config.yaml", "out/metrics.jsonl", "out/run_summary.json", "out/log")


def lora_with_epochs_dir(s, d) -> str:
    """A checkpoint directory (``ck/rank_0/``) holding the shared LoRA training checkpoint."""
    os.makedirs(os.path.join(d, "ck", "rank_0"))
    shutil.copy2(s.lora, os.path.join(d, "ck", "rank_0", "llama_rank_0-1_3.safetensors"))
    return os.path.join(d, "ck")


RAW = ["--train_dataset_dir"]


CONFIG_CASES = [
    Case("config_missing", lambda s, d: ft(s, d, config=os.path.join(d, "nope.yaml")), 2, ("{d}/nope.yaml",)),
    Case("config_yaml_syntax", lambda s, d: ft(s, d, config=write(d, "bad.yaml", "seed: [1, 2\nrun_mode: x\n")), 2,
         ("{d}/bad.yaml",)),
    Case("config_top_level_list", lambda s, d: ft(s, d, config=write(d, "list.yaml", "- a\n- b\n")), 2,
         ("{d}/list.yaml",)),
    Case("config_not_utf8", lambda s, d: ft(s, d, config=write(d, "latin1.yaml", b"seed: 0\nrun_mode: 'caf\xe9'\n")),
         2, ("{d}/latin1.yaml",)),
    Case("config_unknown_key", lambda s, d: ft(s, d, config=config_with(s, d, ("runner_confg", {"epochs": 1}))), 2,
         ("runner_confg", "runner_config")),
    Case("config_wrong_type", lambda s, d: ft(s, d, config=config_with(s, d, ("runner_config.epochs", "two"))), 2,
         ("runner_config.epochs",)),
    Case("config_unknown_optimizer", lambda s, d: ft(s, d, config=config_with(s, d, ("optimizer.type", "Adamm"))), 2,
         ("optimizer.type", "Adamm")),
    Case("config_save_steps_0",
         lambda s, d: ft(s, d, config=config_with(s, d, ("callbacks.1.save_checkpoint_steps", 0))), 2,
         ("save_checkpoint_steps",)),
    Case("config_base_config_missing",
         lambda s, d: ft(s, d, config=config_with(s, d, ("base_config", "nope_base.yaml"))), 2,
         ("base_config", "nope_base.yaml")),
    Case("config_base_config_cycle", lambda s, d: ft(s, d, config=(
        write(d, "b.yaml", "base_config: a.yaml\n"), write(d, "a.yaml", "base_config: b.yaml\nseed: 1\n"))[1]), 2,
        ("base_config", "a.yaml")),
    Case("config_hidden_not_divisible",
         lambda s, d: ft(s, d, "--model.model_config.hidden_size", "60"), 2, ("hidden_size", "num_heads")),
    Case("pet_target_modules_match_nothing",
         lambda s, d: ft(s, d, "--model.model_config.pet_config.target_modules", ".*wz"), 2,
         ("target_modules", ".*wz")),
    Case("pet_type_unknown", lambda s, d: ft(s, d, "--model.model_config.pet_config.pet_type", "lorax"), 2,
         ("pet_type", "lorax")),
    Case("cli_run_mode", lambda s, d: ft(s, d, "--run_mode", "fine"), 2, ("run_mode", "fine")),
    Case("cli_bad_bool", lambda s, d: ft(s, d, "--use_parallel", "maybe"), 2, ("use_parallel", "maybe")),
    Case("cli_unknown_flag", lambda s, d: ft(s, d, "--lod_checkpoint", "x"), 2, ("lod_checkpoint",)),
    Case("cli_unknown_dotted_key", lambda s, d: ft(s, d, "--model.model_config.hidden_sise", "8"), 2,
         ("hidden_sise", "hidden_size")),
    Case("cli_predict_data_missing", lambda s, d: ft(s, d, "--run_mode", "predict", "--predict_data",
                                                     os.path.join(d, "prompts.txt")), 2, ("{d}/prompts.txt",)),
    Case("cli_eval_without_eval_data", lambda s, d: ft(s, d, "--run_mode", "eval"), 2, ("eval_dataset",)),
    Case("cli_predict_data_bad_json", lambda s, d: ft(s, d, "--run_mode", "predict", "--predict_data",
                                                      write(d, "prompts.json", '["a", ')), 2, ("{d}/prompts.json",)),
    Case("config_compute_dtype", lambda s, d: ft(s, d, "--model.model_config.compute_dtype", "float8"), 2,
         ("compute_dtype", "float8")),
    Case("cli_output_dir_is_a_file", lambda s, d: [*ft(s, d), "--output_dir", write(d, "taken", "x")], 2,
         ("output_dir", "{d}/taken")),
    Case("failing_run_keeps_earlier_outputs", lambda s, d: (previous_run(s, d), ft(
        s, d, "--train_dataset_dir", os.path.join(d, "nodata")))[1], 2, ("{d}/nodata",), moved=EARLIER),
    Case("failing_load_keeps_earlier_outputs", lambda s, d: (previous_run(s, d), ft(
        s, d, "--load_checkpoint", truncated(s.base, d, "half.safetensors")))[1], 2, ("{d}/half.safetensors",),
        moved=EARLIER),
    Case("cli_resume_without_checkpoint", lambda s, d: ft(s, d, "--load_checkpoint", "", "--resume_training", "True"),
         2, ("load_checkpoint", "resume_training")),
]

DATA_CASES = [
    Case("data_dir_missing", lambda s, d: ft(s, d, *RAW, os.path.join(d, "nodata")), 2, ("{d}/nodata",)),
    Case("data_empty_folder", lambda s, d: ft(s, d, *RAW, os.path.dirname(write(d, "emptydir/.keep", ""))), 2,
         ("{d}/emptydir",)),
    Case("raw_json_syntax", lambda s, d: ft(s, d, *RAW, write(d, "bad.json", '[{"instruction": "a", ')), 2,
         ("{d}/bad.json",)),
    Case("raw_json_not_a_list", lambda s, d: ft(s, d, *RAW, write(d, "obj.json", '{"instruction": "a"}')), 2,
         ("{d}/obj.json",)),
    Case("raw_jsonl_broken_line", lambda s, d: ft(s, d, *RAW, write(
        d, "broken.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", \n')), 2,
        ("{d}/broken.jsonl", "line 2")),
    Case("raw_unknown_extension", lambda s, d: ft(s, d, *RAW, write(d, "data.csv", "instruction,output\na,b\n")), 2,
         ("{d}/data.csv",)),
    Case("raw_parquet_garbage", lambda s, d: ft(s, d, *RAW, write(d, "data.parquet", "not parquet")), 2,
         ("{d}/data.parquet",)),
    Case("raw_parquet_no_text_column", lambda s, d: ft(s, d, *RAW, _parquet(d, {"title": ["a", "b"]})), 2,
         ("{d}/p.parquet", "text")),
    Case("dataset_no_input_ids", lambda s, d: ft(s, d, *RAW, dataset(d, "ds", tokens=[[1] * 97] * 8)), 2,
         ("{d}/ds", "input_ids")),
    Case("dataset_wrong_length", lambda s, d: ft(s, d, *RAW, dataset(d, "ds", input_ids=[[5] * 50] * 8,
                                                                      labels=[[5] * 50] * 8)), 2,
         ("{d}/ds", "seq_length")),
    Case("dataset_id_past_vocab", lambda s, d: ft(s, d, *RAW, dataset(d, "ds", input_ids=[[5] * 96 + [1000]] * 8,
                                                                       labels=[[5] * 97] * 8)), 2,
         ("{d}/ds", "vocab_size")),
    Case("mindrecord_without_db", lambda s, d: ft(s, d, *RAW, _mindrecord_without_db(d)), 2,
         ("{d}/m.mindrecord.db is missing", "Copy each shard's .db")),
    Case("mindrecord_garbage", lambda s, d: ft(s, d, *RAW, write(d, "x.mindrecord", b"\x00" * 100)), 2,
         ("{d}/x.mindrecord",)),
    Case("vocab_file_not_sentencepiece",
         lambda s, d: ft(s, d, *RAW, s.alpaca, "--processor.tokenizer.vocab_file", write(d, "tok.model", "hello")), 2,
         ("vocab_file", "{d}/tok.model")),
    Case("tokenizer_json_broken",
         lambda s, d: ft(s, d, *RAW, s.alpaca, "--processor.tokenizer.vocab_file", write(d, "tokenizer.json", '{"model": ')),
         2, ("{d}/tokenizer.json",)),
]


def _mindrecord_without_db(d) -> str:
    import numpy as np
    from mindrecord_files import QA_SCHEMA, write_mindrecord
    ids = np.arange(97, dtype=np.int32) % 900 + 3
    [path] = write_mindrecord(os.path.join(d, "m.mindrecord"), [{"input_ids": ids, "labels": ids}] * 8, QA_SCHEMA)
    os.remove(path + ".db")
    return path


def _parquet(d, columns) -> str:
    import pyarrow
    import pyarrow.parquet
    path = os.path.join(d, "p.parquet")
    pyarrow.parquet.write_table(pyarrow.table(columns), path)
    return path


CHECKPOINT_CASES = [
    Case("ckpt_missing", lambda s, d: ft(s, d, "--load_checkpoint", os.path.join(d, "no.safetensors")), 2,
         ("load_checkpoint", "{d}/no.safetensors")),
    Case("ckpt_text_named_safetensors",
         lambda s, d: ft(s, d, "--load_checkpoint", write(d, "text.safetensors", "just some text\n")), 2,
         ("{d}/text.safetensors",)),
    Case("ckpt_truncated", lambda s, d: ft(s, d, "--load_checkpoint", truncated(s.base, d, "half.safetensors")), 2,
         ("{d}/half.safetensors",)),
    Case("ckpt_wrong_shapes", lambda s, d: ft(s, d, "--load_checkpoint", s.lora_base), 2,
         ("{s}/lora/base.safetensors", "vocab_size")),
    Case("ckpt_missing_tensor",
         lambda s, d: ft(s, d, "--load_checkpoint", base_without(s, d, "model.norm_out.weight")), 2,
         ("{d}/partial.safetensors", "model.norm_out.weight")),
    Case("ckpt_pickle_file", lambda s, d: ft(s, d, "--load_checkpoint", _pickle(d)), 2, ("{d}/model.pt",)),
    Case("ckpt_empty_folder", lambda s, d: ft(s, d, "--load_checkpoint", os.path.dirname(write(d, "e/.keep", ""))),
         2, ("{d}/e",)),
    Case("ms_ckpt_truncated", lambda s, d: ft(s, d, "--load_checkpoint", truncated(s.ckpt, d, "cut.ckpt", 0.6)), 2,
         ("{d}/cut.ckpt",)),
    Case("hf_broken_config_json",
         lambda s, d: ft(s, d, "--pretrained_model_dir", hf_dir_with(s, d, "config.json", '{"vocab_size": 1'),
                         config=s.hf_config), 2,
         ("{d}/hf/config.json",)),
    Case("hf_bin_not_torch", lambda s, d: ft(s, d, "--pretrained_model_dir", _hf_bin(s, d), config=s.hf_config), 2,
         ("{d}/hf/pytorch_model.bin",)),
    Case("hf_no_weights", lambda s, d: ft(s, d, "--pretrained_model_dir", hf_dir_with(s, d, "model.safetensors", None),
                                          config=s.hf_config), 2, ("{d}/hf", "holds no weights", "--load_checkpoint")),
    Case("hf_truncated_weights", lambda s, d: ft(s, d, "--pretrained_model_dir", _hf_truncated(s, d), config=s.hf_config), 2,
         ("{d}/hf/model.safetensors",)),
    Case("resume_file_without_counters", lambda s, d: ft(s, d, "--resume_training", "True"), 2,
         ("{s}/base.safetensors", "training counters")),
    Case("resume_ranks_share_no_step", lambda s, d: ft(
        s, d, "--load_checkpoint", _ranks_without_common_step(s, d), "--resume_training", "True"), 2,
        ("{d}/ck", "no step is saved by every rank")),
    Case("peft_adapter_broken_config", lambda s, d: ft(s, d, "--load_checkpoint", _peft_dir(d)), 2,
         ("{d}/adapter/adapter_config.json",)),
    Case("src_strategy_missing", lambda s, d: ft(s, d, "--src_strategy_path_or_dir", os.path.join(d, "nostrat")), 2,
         ("src_strategy_path_or_dir", "{d}/nostrat")),
    Case("resume_named_checkpoint_missing", lambda s, d: ft(
        s, d, "--load_checkpoint", lora_with_epochs_dir(s, d), "--resume_training", "llama_rank_0-1_9"), 2,
        ("resume_training", "llama_rank_0-1_9")),
]


def _ranks_without_common_step(s, d) -> str:
    for rank, step in ((0, 3), (1, 2)):
        os.makedirs(os.path.join(d, "ck", f"rank_{rank}"))
        shutil.copy2(s.lora, os.path.join(d, "ck", f"rank_{rank}", f"llama_rank_{rank}-1_{step}.safetensors"))
    return os.path.join(d, "ck")


def _peft_dir(d) -> str:
    import torch
    write(d, "adapter/adapter_config.json", '{"peft_type": "LORA", "r": ')
    write(d, "adapter/adapter_model.safetensors", safetensors_bytes(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}))
    return os.path.join(d, "adapter")


def _pickle(d) -> str:
    import torch
    path = os.path.join(d, "model.pt")
    torch.save({"w": torch.zeros(2)}, path)
    return path


def _hf_bin(s, d) -> str:
    hf = hf_dir_with(s, d, "model.safetensors", None)
    write(hf, "pytorch_model.bin", b"PK\x03\x04 this is not a torch zip")
    return hf


def _hf_truncated(s, d) -> str:
    hf = copy_into(s.hf, d, "hf")
    with open(os.path.join(hf, "model.safetensors"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(hf, "model.safetensors")) // 2)
    return hf


LAUNCHER_CASES = [
    Case("launcher_worker_num_word", lambda s, d: launcher(f"{FT} --config {s.config}", "abc"), 1,
         ("WORKER_NUM=abc",), ()),
    Case("launcher_argument_count", lambda s, d: launcher(f"{FT} --config {s.config}", "2", "3", "4"), 1,
         ("4 argument(s)",), ()),
    Case("launcher_join_word", lambda s, d: launcher(f"{FT}", "2", "8118", "logs", "maybe", "60"), 1,
         ("JOIN=maybe",), ()),
    Case("launcher_local_worker", lambda s, d: launcher(f"{FT}", "2", "4", "127.0.0.1", "8118", "0", "logs", "True",
                                                        "60"), 1, ("WORKER_NUM=2", "LOCAL_WORKER=4"), ()),
    Case("launcher_script_missing", lambda s, d: launcher(f"{d}/nope.py --x 1", "1"), 1, ("{d}/nope.py",), ()),
    Case("launcher_port", lambda s, d: launcher(f"{FT}", "2", "99999", "logs", "True", "60"), 1,
         ("MASTER_PORT=99999",), ()),
    Case("launcher_timeout", lambda s, d: launcher(f"{FT}", "2", "8118", "logs", "True", "-5"), 1,
         ("CLUSTER_TIME_OUT=-5",), ()),
    Case("launcher_node_rank", lambda s, d: launcher(f"{FT}", "4", "2", "127.0.0.1", "8118", "5", "logs", "True",
                                                     "60"), 1, ("NODE_RANK=5",), ()),
    Case("msrun_launcher_workers_0", lambda s, d: launcher(f"{FT}", "0", name="msrun_launcher.sh"), 1,
         ("WORKER_NUM=0",), ()),
    Case("launcher_job_with_bad_config", lambda s, d: launcher(
        f"{FT} --config {s.config} --output_dir {d}/out --runner_config.epochs x", "1", str(pp.free_port()), f"{d}/out/logs",
        "True", "60"), 1, ("runner_config.epochs", "{d}/out/logs/worker_0.log")),
]

SCRIPT_CASES = [
    Case("convert_no_config_json", lambda s, d: script(
        "convert_weight.py", "--input_path", hf_dir_with(s, d, "config.json", None), "--output_path",
        os.path.join(d, "o.safetensors")), 2, ("{d}/hf", "config.json"), ()),
    Case("convert_broken_config_json", lambda s, d: script(
        "convert_weight.py", "--input_path", hf_dir_with(s, d, "config.json", "{"), "--output_path",
        os.path.join(d, "o.safetensors")), 2, ("{d}/hf/config.json",), ()),
    Case("convert_reversed_text_file", lambda s, d: script(
        "convert_weight.py", "--reversed", "--input_path", write(d, "t.safetensors", "text"), "--output_path",
        os.path.join(d, "hfout")), 2, ("{d}/t.safetensors",), ()),
    Case("convert_reversed_ckpt_without_config", lambda s, d: script(
        "convert_weight.py", "--reversed", "--input_path", s.ckpt, "--output_path", os.path.join(d, "hfout")), 2,
        ("--config",), ()),
    Case("transform_src_missing", lambda s, d: script(
        "transform_checkpoint.py", "--src_checkpoint", os.path.join(d, "none"), "--dst_checkpoint_dir",
        os.path.join(d, "t")), 2, ("src_checkpoint", "{d}/none"), ()),
    Case("transform_dst_strategy_missing", lambda s, d: script(
        "transform_checkpoint.py", "--src_checkpoint", s.base, "--dst_checkpoint_dir", os.path.join(d, "t"),
        "--dst_strategy", os.path.join(d, "nostrategy")), 2, ("dst_strategy", "{d}/nostrategy"), ()),
    Case("transform_dst_strategy_garbage", lambda s, d: script(
        "transform_checkpoint.py", "--src_checkpoint", s.base, "--dst_checkpoint_dir", os.path.join(d, "t"),
        "--dst_strategy", write(d, "st/ckpt_strategy_rank_0.json", "{not json")), 2, ("{d}/st",), ()),
    Case("transform_world_size_0", lambda s, d: script(
        "transform_checkpoint.py", "--src_checkpoint", s.base, "--dst_checkpoint_dir", os.path.join(d, "t"),
        "--world_size", "0"), 2, ("world_size",), ()),
    Case("transform_sh_arguments", lambda s, d: launcher("a", "b", "c", name="transform_checkpoint.sh"), 2,
         ("Usage",), ()),
    Case("transform_sh_world_size", lambda s, d: launcher(s.base, "None", f"{d}/t", "None", "x", "1",
                                                          name="transform_checkpoint.sh"), 2, ("WORLD_SIZE=x",), ()),
    Case("merge_src_without_adapters", lambda s, d: script(
        "transform_ckpt_lora.py", "--src_ckpt_path_or_dir", s.base, "--dst_ckpt_dir", os.path.join(d, "m")), 2,
        ("{s}/base.safetensors",), ()),
    Case("merge_other_base", lambda s, d: script(
        "transform_ckpt_lora.py", "--src_ckpt_path_or_dir", s.lora, "--dst_ckpt_dir", os.path.join(d, "m"),
        "--base_checkpoint", s.base), 2, ("{s}/base.safetensors", "fingerprint"), ()),
    Case("merge_dst_is_a_file", lambda s, d: script(
        "transform_ckpt_lora.py", "--src_ckpt_path_or_dir", s.lora, "--dst_ckpt_dir", write(d, "m", "x")), 2,
        ("{d}/m",), ()),
    Case("export_src_without_adapters", lambda s, d: script(
        "export_adapter.py", "--src_checkpoint", s.base, "--output_dir", os.path.join(d, "a")), 2,
        ("{s}/base.safetensors",), ()),
    Case("export_output_dir_not_empty", lambda s, d: script(
        "export_adapter.py", "--src_checkpoint", s.lora, "--output_dir",
        os.path.dirname(write(d, "a/adapter_config.json", "{}")), "--lora_dropout", "0"), 2, ("{d}/a", "--overwrite"),
        ()),
    Case("export_ckpt_without_lora_rank", lambda s, d: script(
        "export_adapter.py", "--src_checkpoint", s.ckpt, "--output_dir", os.path.join(d, "a")), 2,
        ("--lora_rank",), ()),
    Case("alpaca_data_not_json", lambda s, d: script(
        "alpaca_converter.py", "--data_path", write(d, "a.json", "[{"), "--output_path", os.path.join(d, "c.json")), 2,
        ("{d}/a.json",), ()),
    Case("alpaca_records_wrong_type", lambda s, d: script(
        "alpaca_converter.py", "--data_path", write(d, "a.json", '[1, 2, 3]'), "--output_path",
        os.path.join(d, "c.json")), 2, ("{d}/a.json", "record 0"), ()),
    Case("alpaca_output_parent_is_a_file", lambda s, d: script(
        "alpaca_converter.py", "--data_path", s.alpaca, "--output_path", os.path.join(write(d, "f", "x"), "c.json")),
        2, ("{d}/f",), ()),
    Case("preprocess_model_file_text", lambda s, d: script(
        "llama_preprocess.py", "--dataset_type", "qa", "--input_glob", s.conv, "--model_file",
        write(d, "t.model", "not a model"), "--seq_length", "96", "--output_file", os.path.join(d, "ds")), 2,
        ("{d}/t.model",), ()),
    Case("preprocess_glob_matches_nothing", lambda s, d: script(
        "llama_preprocess.py", "--dataset_type", "qa", "--input_glob", os.path.join(d, "*.json"), "--model_file",
        s.tok, "--seq_length", "96", "--output_file", os.path.join(d, "ds")), 2, ("input_glob", "{d}/*.json"), ()),
    Case("preprocess_seq_length_0", lambda s, d: script(
        "llama_preprocess.py", "--dataset_type", "qa", "--input_glob", s.conv, "--model_file", s.tok,
        "--seq_length", "0", "--output_file", os.path.join(d, "ds")), 2, ("seq_length",), ()),
    Case("preprocess_tokenizer_disagrees", lambda s, d: script(
        "llama_preprocess.py", "--dataset_type", "qa", "--input_glob", s.conv, "--model_file", s.tok,
        "--tokenizer", "llama3", "--seq_length", "96", "--output_file", os.path.join(d, "ds")), 2,
        ("{s}/tok.model", "--tokenizer llama"), ()),
    Case("preprocess_alpaca_not_conversations", lambda s, d: script(
        "llama_preprocess.py", "--dataset_type", "qa", "--input_glob", s.alpaca, "--model_file", s.tok,
        "--seq_length", "96", "--output_file", copy_into(s.data, d, "ds")), 2, ("{s}/alpaca.json", "conversations"),
        ()),
    Case("demo_bad_epochs", lambda s, d: script("demo.py", "--train_epochs", "x", "--output_dir", f"{d}/out"), 2,
         ("--train_epochs",)),
]

CASES = CONFIG_CASES + DATA_CASES + CHECKPOINT_CASES + LAUNCHER_CASES + SCRIPT_CASES


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("bad_inputs_shared"))
    return build_shared(d)


@pytest.fixture(scope="module")
def results(request, shared, tmp_path_factory):
    """Every selected case built (in this process, one after the other), then run ``JOBS`` at a time; per case id:
    (result, seconds, changes in its folder, case folder). The shared inputs are checked once, after all."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if item.originalname == "test_bad_input" and hasattr(item, "callspec")}
    before_shared = snapshot(shared.dir)
    prepared = {}
    for case in CASES:
        if case.id in selected:
            d = str(tmp_path_factory.mktemp(case.id))
            argv = case.build(shared, d)
            prepared[case.id] = (case, d, argv, snapshot(d))
    with concurrent.futures.ThreadPoolExecutor(max_workers=JOBS) as pool:
        futures = {cid: pool.submit(run_case, argv, d) for cid, (_, d, argv, _) in prepared.items()}
        out = {}
        for cid, fut in futures.items():
            case, d, _, before = prepared[cid]
            r, seconds = fut.result()
            out[cid] = (r, seconds, changes(before, snapshot(d), case.new, case.moved), d)
    out["shared changes"] = changes(before_shared, snapshot(shared.dir))
    return out


def _params():
    for case in CASES:
        yield pytest.param(case, id=case.id, marks=list(case.marks))


@pytest.mark.parametrize("case", _params())
def test_bad_input(case, results, shared):
    r, seconds, changed, d = results[case.id]
    both = r.stdout + r.stderr
    where = f"\n--- {case.id} ({seconds:.1f} s), status {r.returncode}:\n{both[-3000:]}"
    assert "Traceback" not in both, where
    assert r.returncode == case.status, where
    for word in case.words:
        assert word.format(d=d, s=shared.dir) in both, f"{word!r} not named" + where
    assert not changed, f"files changed: {changed}" + where
    assert not results["shared changes"], results["shared changes"]


def test_catalogue_size():
    """Issue 14 asks for at least 60 bad inputs, across every area."""
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    assert all([CONFIG_CASES, DATA_CASES, CHECKPOINT_CASES, LAUNCHER_CASES, SCRIPT_CASES])
