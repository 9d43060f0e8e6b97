"""mftune.config / mftune.cli: MindFormers YAML loading, validation and run_mindformer.py's CLI.

Expected values come from reference/mindformers.md: §1.1 (the 7B LoRA listing), §1.3-§1.4 (the
other shipped YAMLs), §1.5 (batch-size rewrite, stand-alone parallel_config), §2 (flags, their
target keys, precedence, str2bool, --options and free-form parse_value typing).
"""
from __future__ import annotations

import logging
import os
import re
import textwrap

import pytest
import yaml

from mftune.config import cli
from mftune.config import (
    IGNORED_KEYS,
    CallbackConfig,
    ConfigError,
    MFConfig,
    config_to_dict,
    format_errors,
    load_config,
    read_yaml,
    save_config,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LORA_7B = os.path.join(REPO, "configs", "llama2", "lora_llama2_7b.yaml")
LORA_13B = os.path.join(REPO, "configs", "llama2", "lora_llama2_13b.yaml")
FULL_7B = os.path.join(REPO, "configs", "llama2", "finetune_llama2_7b.yaml")
REFERENCE = "/work/shared/reference/mindformers.md"


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def child_of_7b(tmp_path, text: str = "", name: str = "child.yaml") -> str:
    """A YAML inheriting the shipped 7B LoRA file, with single-process defaults and ``text`` on top."""
    return write(tmp_path, name, f"base_config: {LORA_7B}\nuse_parallel: False\n" + textwrap.dedent(text))


def errors_of(fn, *args, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return info.value.errors


def parse(argv: list[str], **kwargs) -> MFConfig:
    return cli.parse_cli(argv, check_files=False, **kwargs)


def test_lora_7b_loads_with_the_listing_values():
    cfg = load_config(LORA_7B, check_files=False)
    assert cfg.run_mode == "finetune" and cfg.use_parallel is True
    assert (cfg.runner_config.epochs, cfg.runner_config.batch_size, cfg.runner_config.sink_size) == (2, 2, 2)
    assert cfg.optimizer.type == "FP32StateAdamWeightDecay" and cfg.optimizer.eps == 1e-8
    assert cfg.lr_schedule.type == "CosineWithWarmUpLR" and cfg.lr_schedule.warmup_ratio == 0.03
    assert cfg.train_dataset.batch_size == 2  # §1.5: runner_config.batch_size overwrites the YAML's 4
    assert cfg.train_dataset_task.dataset_config is cfg.train_dataset
    assert cfg.parallel_config.data_parallel == 8 and cfg.parallel_config.micro_batch_num == 64
    assert [c.type for c in cfg.callbacks] == ["MFLossMonitor", "CheckpointMonitor", "ObsMonitor"]
    ckpt = cfg.callback("CheckpointMonitor")
    assert (ckpt.prefix, ckpt.save_checkpoint_steps) == ("llama_7b_lora", 100)
    assert cfg.runner_wrapper.scale_sense == 1.0 and cfg.runner_wrapper.max_grad_norm == 1.0
    mc = cfg.model.model_config
    assert (mc["seq_length"], mc["hidden_size"], mc["num_layers"], mc["compute_dtype"]) == (4096, 4096, 32, "bfloat16")
    assert mc["pet_config"] == {"pet_type": "lora", "lora_rank": 16, "lora_alpha": 16, "lora_dropout": 0.05,
                                "target_modules": ".*wq|.*wk|.*wv|.*wo"}
    assert cfg.context["max_device_memory"] == "59GB"


def _listing_from_reference() -> dict:
    text = open(REFERENCE).read()
    section = text[text.index("### 1.1"):text.index("### 1.2")]
    block = section[section.index("```") + 3:]
    block = block[block.index("\n") + 1:block.index("```")]
    block = re.sub(r"\s+# \[.*?\]$", "", block, flags=re.M)  # the paraphrased comments
    return yaml.load(block, Loader=yaml.SafeLoader)


@pytest.mark.skipif(not os.path.exists(REFERENCE), reason="reference/mindformers.md not available")
def test_lora_7b_is_the_reference_listing_key_for_key():
    assert read_yaml(LORA_7B) == _listing_from_reference()


def test_lora_13b_and_full_finetune_7b_load():
    cfg13 = load_config(LORA_13B, check_files=False)
    assert cfg13.run_mode == "train" and cfg13.model.model_config["hidden_size"] == 5120
    pet13 = cfg13.model.model_config["pet_config"]
    assert pet13["lora_rank"] == 8 and pet13["target_modules"] == ".*wq|.*wv"
    assert cfg13.runner_wrapper.scale_sense == {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 4294967296,
                                                "scale_factor": 2, "scale_window": 1000}
    assert cfg13.recompute_config.recompute is True and cfg13.optimizer.beta2 == 0.95
    full = load_config(FULL_7B, check_files=False)
    assert "pet_config" not in full.model.model_config and full.run_mode == "finetune"  # full fine-tune
    assert full.optimizer.learning_rate == 1e-6 and full.train_dataset.batch_size == 1
    assert full.parallel.strategy_ckpt_save_file == "./ckpt_strategy.ckpt"


def test_shipped_yaml_without_data_reports_only_missing_files():
    errors = errors_of(load_config, LORA_7B)
    assert len(errors) == 1 and "train_dataset.data_loader.dataset_dir=''" in errors[0]
    assert "--train_dataset_dir" in errors[0]
    errors = errors_of(load_config, FULL_7B)
    assert {e.split("=")[0] for e in errors} == {"load_checkpoint", "train_dataset.data_loader.dataset_dir"}


def test_files_that_exist_pass(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    ckpt = tmp_path / "base.safetensors"
    ckpt.write_bytes(b"")
    cfg = load_config(LORA_7B, {"train_dataset.data_loader.dataset_dir": str(data), "load_checkpoint": str(ckpt)})
    assert cfg.train_dataset.data_loader.dataset_dir == str(data)
    # eval and predict need no training data
    assert load_config(LORA_7B, {"run_mode": "predict"}).run_mode == "predict"
    errors = errors_of(load_config, LORA_7B, {"run_mode": "eval"})
    assert len(errors) == 1 and "eval_dataset.data_loader.dataset_dir" in errors[0] and "--eval_dataset_dir" in errors[0]
    errors = errors_of(load_config, LORA_7B, {"processor.tokenizer.vocab_file": str(tmp_path / "nope.model"),
                                              "train_dataset.data_loader.dataset_dir": str(data)})
    assert len(errors) == 1 and errors[0].startswith("processor.tokenizer.vocab_file=")


def test_base_config_inheritance_recursive_and_relative(tmp_path):
    write(tmp_path, "bases/grand.yaml", """
        seed: 1
        runner_config: {epochs: 5, batch_size: 3}
        model:
          model_config: {num_layers: 2, hidden_size: 64, num_heads: 4, seq_length: 16, vocab_size: 100}
    """)
    write(tmp_path, "bases/parent.yaml", """
        base_config: grand.yaml
        runner_config: {batch_size: 7}
        model:
          model_config: {num_layers: 3}
    """)
    write(tmp_path, "other.yaml", "output_dir: ./from_other\nseed: 2\n")
    child = write(tmp_path, "child.yaml", """
        base_config: [bases/parent.yaml, other.yaml]
        runner_config: {epochs: 9}
        run_mode: predict
    """)
    cfg = load_config(child)
    assert (cfg.runner_config.epochs, cfg.runner_config.batch_size) == (9, 7)  # child > parent > grand
    assert cfg.model.model_config == {"num_layers": 3, "hidden_size": 64, "num_heads": 4, "seq_length": 16,
                                      "vocab_size": 100}
    assert (cfg.seed, cfg.output_dir) == (2, "./from_other")  # later base wins over earlier
    assert cfg.optimizer.eps == 1e-8  # missing keys: dataclass defaults


def test_base_config_cycle_and_missing_file(tmp_path):
    write(tmp_path, "a.yaml", "base_config: b.yaml\nseed: 1\n")
    write(tmp_path, "b.yaml", "base_config: a.yaml\n")
    errors = errors_of(load_config, str(tmp_path / "a.yaml"))
    assert len(errors) == 1 and "includes itself" in errors[0]
    missing = write(tmp_path, "c.yaml", "base_config: nowhere.yaml\n")
    assert "no such file" in errors_of(load_config, missing)[0]
    assert "no such file" in errors_of(load_config, str(tmp_path / "absent.yaml"))[0]
    broken = write(tmp_path, "broken.yaml", "seed: [1\n")
    assert "could not be read" in errors_of(load_config, broken)[0]


def test_yaml_anchor_and_null_means_default(tmp_path):
    path = child_of_7b(tmp_path, """
        seed: null
        eval_dataset: &ev
          data_loader: {dataset_dir: /eval}
        eval_dataset_task: {dataset_config: *ev}
    """)
    cfg = load_config(path, check_files=False)
    assert cfg.seed == 0 and cfg.eval_dataset.data_loader.dataset_dir == "/eval"
    assert cfg.eval_dataset_task.dataset_config is cfg.eval_dataset


FLAG_CASES = [
    (["--adapter_id", "a", "b"], "adapter_id", ["a", "b"]),
    (["--modal_type", "text"], "modal_type", ["text"]),
    (["--mode", "1"], "context", {"mode": 1}),
    (["--device_id", "3"], "context", {"device_id": 3}),
    (["--device_target", "GPU"], "context", {"device_target": "GPU"}),
    (["--run_mode", "predict"], "run_mode", "predict"),
    (["--pretrained_model_dir", "."], "pretrained_model_dir", "."),
    (["--do_eval", "TRUE"], "do_eval", True),
    (["--train_dataset_dir", "/d"], "train_dataset.data_loader.dataset_dir", "/d"),
    (["--train_dataset", "/d"], "train_dataset.data_loader.dataset_dir", "/d"),  # argparse prefix
    (["--eval_dataset_dir", "/e"], "eval_dataset.data_loader.dataset_dir", "/e"),
    (["--predict_data", r"a\nb"], "input_data", "a\nb"),
    (["--predict_data", "one", "two"], "input_data", ["one", "two"]),
    (["--predict_batch_size", "4"], "predict_batch_size", 4),
    (["--load_checkpoint", "/w.safetensors"], "load_checkpoint", "/w.safetensors"),
    (["--src_strategy_path_or_dir", "/s"], "src_strategy_path_or_dir", "/s"),
    (["--auto_trans_ckpt", "true"], "auto_trans_ckpt", True),
    (["--transform_process_num", "2"], "transform_process_num", 2),
    (["--only_save_strategy", "True"], "only_save_strategy", True),
    (["--resume_training", "False"], "resume_training", False),
    (["--strategy_load_checkpoint", "/st"], "parallel.strategy_ckpt_load_file", "/st"),
    (["--remote_save_url", "obs://x"], "remote_save_url", "obs://x"),
    (["--seed", "42"], "seed", 42),
    (["--use_parallel", "false"], "use_parallel", False),
    (["--profile", "true"], "profile", True),
    (["--options", "runner_config.epochs=3", "optimizer.betas=0.9,0.95"], "optimizer.betas", [0.9, 0.95]),
    (["--options", "optimizer.betas=[0.8,0.9]"], "optimizer.betas", [0.8, 0.9]),
    (["--epochs", "7"], "runner_config.epochs", 7),
    (["--batch_size", "5"], "runner_config.batch_size", 5),
    (["--gradient_accumulation_steps", "4"], "runner_config.gradient_accumulation_steps", 4),
    (["--sink_mode", "False"], "runner_config.sink_mode", False),
    (["--num_samples", "10"], "train_dataset.data_loader.num_samples", 10),
    (["--num_samples", "10"], "eval_dataset.data_loader.num_samples", 10),
    (["--output_dir", "/out"], "output_dir", "/out"),
    (["--do_sample", "true"], "model.model_config.do_sample", True),
]


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("argv,key,expected", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_every_flag_maps_to_its_key(argv, key, expected):
    cfg = parse(["--config", LORA_7B, *argv])
    value = _get(cfg, key)
    if isinstance(expected, dict):
        assert {k: value[k] for k in expected} == expected
    else:
        assert value == expected


def test_every_run_mindformer_flag_exists():
    flags = {a.dest for a in cli.build_parser()._actions} - {"help"}
    assert flags == {"config", "mode", "device_id", "device_target", "run_mode", "do_eval", "train_dataset_dir",
                     "eval_dataset_dir", "predict_data", "predict_batch_size", "load_checkpoint",
                     "pretrained_model_dir",  # MindFormers r1.6+ (its later releases' Hugging Face directories)
                     "src_strategy_path_or_dir", "auto_trans_ckpt", "transform_process_num", "only_save_strategy",
                     "resume_training", "strategy_load_checkpoint", "remote_save_url", "seed", "use_parallel",
                     "profile", "options", "epochs", "batch_size", "gradient_accumulation_steps", "sink_mode",
                     "num_samples", "output_dir", "register_path", "do_sample", "adapter_id", "modal_type"}
    assert all(a.default is None for a in cli.build_parser()._actions if a.dest not in ("help", "config"))


def test_flags_absent_keep_the_yaml_values():
    cfg = parse(["--config", LORA_7B])
    yaml_cfg = load_config(LORA_7B, check_files=False)
    assert config_to_dict(cfg) == config_to_dict(yaml_cfg)
    assert cfg.use_parallel is True and cfg.runner_config.sink_mode is True and cfg.do_eval is False


def test_register_path_is_accepted_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="mftune"):
        parse(["--config", LORA_7B, "--register_path", "ext"])
    assert "register_path" in caplog.text and "unused" in caplog.text


def test_precedence_yaml_groupA_options_groupB_free_form(tmp_path):
    """§2: YAML < group A flags < --options < group B flags < free-form, whatever the argv order."""
    path = child_of_7b(tmp_path, "context: {device_id: 0}\nrunner_config: {epochs: 1}\n")
    # context.device_id: YAML 0 < --device_id (group A) 1 < --options 2 < free-form 3
    device = ["--context.device_id", "3", "--options", "context.device_id=2", "--device_id", "1", "--config", path]
    assert parse(device).context["device_id"] == 3
    assert parse(device[2:]).context["device_id"] == 2
    assert parse(device[4:]).context["device_id"] == 1
    assert parse(device[6:]).context["device_id"] == 0
    # runner_config.epochs: YAML 1 < --options 2 < --epochs (group B) 3 < free-form 4
    epochs = ["--runner_config.epochs", "4", "--epochs", "3", "--config", path, "--options", "runner_config.epochs=2"]
    assert parse(epochs).runner_config.epochs == 4
    assert parse(epochs[2:]).runner_config.epochs == 3
    assert parse(epochs[4:]).runner_config.epochs == 2
    assert parse(epochs[4:6]).runner_config.epochs == 1
    # the same key through --options, a group B flag and free-form
    data = ["--config", path, "--options", "train_dataset.data_loader.dataset_dir=/opt", "--train_dataset_dir", "/flag"]
    assert parse(data[:4]).train_dataset.data_loader.dataset_dir == "/opt"
    assert parse(data).train_dataset.data_loader.dataset_dir == "/flag"
    assert parse([*data, "--train_dataset.data_loader.dataset_dir=/free"]).train_dataset.data_loader.dataset_dir == "/free"
    # group A under --options on the same key
    assert parse(["--config", path, "--load_checkpoint", "/a", "--options", "load_checkpoint=/b"]).load_checkpoint == "/b"


def test_resume_training_bool_or_checkpoint_name():
    assert parse(["--config", LORA_7B, "--resume_training", "TRUE"]).resume_training is True
    assert parse(["--config", LORA_7B, "--resume_training", "false"]).resume_training is False
    name = "llama_7b_lora_rank_0-10_2.safetensors"
    assert parse(["--config", LORA_7B, "--resume_training", name]).resume_training == name


def test_str2bool_rejects_anything_but_true_false():
    errors = errors_of(parse, ["--config", LORA_7B, "--use_parallel", "yes", "--do_eval", "1"])
    assert len(errors) == 2
    assert {e.split(" is invalid")[0] for e in errors} == {"--use_parallel='yes'", "--do_eval='1'"}
    assert all("expected true or false" in e for e in errors)


def test_free_form_overrides_both_syntaxes_and_typing():
    cfg = parse(["--config", LORA_7B, "--model.model_config.seq_length", "2048",
                 "--model.model_config.pet_config.lora_rank=8", "--model.model_config.ignore_token_id", "-1",
                 "--lr_schedule.learning_rate", "2e-4", "--runner_wrapper.use_clip_grad", "False",
                 "--optimizer.betas", "[0.9, 0.95]", "--callbacks.1.prefix", "mine", "--context.device_id=5"])
    mc = cfg.model.model_config
    assert (mc["seq_length"], mc["pet_config"]["lora_rank"], mc["ignore_token_id"]) == (2048, 8, -1)
    assert cfg.lr_schedule.learning_rate == 2e-4 and cfg.runner_wrapper.use_clip_grad is False
    assert cfg.optimizer.betas == [0.9, 0.95] and cfg.callbacks[1].prefix == "mine"
    assert cfg.context["device_id"] == 5


def test_parse_value_is_mindformers_typing():
    assert [cli.parse_value(v) for v in ("3", "3.5", "1e-5", "True", "true", "[1, 2]", '{"a": 1}', "None", "x")] == \
        [3, 3.5, 1e-5, True, True, [1, 2], {"a": 1}, "None", "x"]


def test_free_form_unknown_intermediate_and_unpaired():
    errors = errors_of(parse, ["--config", LORA_7B, "--model.model_confg.seq_length", "2",
                               "--runner_config.epochs.x", "1", "--context.nothing.x", "1",
                               "--callbacks.7.prefix", "p", "--model.model_config.seq_length"])
    assert len(errors) == 5, errors
    assert "needs a value" in errors[0]  # command-line errors come first, then the config's
    assert "model.model_confg.seq_length=2 is invalid" in errors[1] and "did you mean 'model_config'" in errors[1].lower()
    assert "runner_config.epochs is a single value" in errors[2]
    assert "'nothing' is not a key of context" in errors[3]
    assert "'7' is not an entry of callbacks" in errors[4]


def test_options_item_without_equals():
    errors = errors_of(parse, ["--config", LORA_7B, "--options", "seed"])
    assert errors == ["--options 'seed' is invalid: expected KEY=VALUE. Write e.g. --options "
                      "runner_config.epochs=3 optimizer.betas=0.9,0.95"]


def test_argparse_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.parse_cli(["--config", LORA_7B, "--epochs", "two"])
    assert info.value.code == 2 and "--epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_cli([])  # --config is required


def test_config_path_cwd_then_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse(["--config", "configs/llama2/lora_llama2_7b.yaml"]).trainer.model_name == "llama2_7b_lora"
    write(tmp_path, "configs/llama2/lora_llama2_7b.yaml", f"base_config: {LORA_7B}\nseed: 99\n")
    assert parse(["--config", "configs/llama2/lora_llama2_7b.yaml"]).seed == 99  # CWD first
    errors = errors_of(parse, ["--config", "nowhere.yaml"])
    assert errors[0].startswith("--config='nowhere.yaml' is invalid: no such file")


def test_every_kind_of_bad_value_is_reported_at_once(tmp_path):
    path = child_of_7b(tmp_path, """
        run_mode: finetun
        lora_rank: 4
        runner_config: {epochs: 0, batch_size: '2', gradient_accumulation_steps: 0, sink_mode: maybe}
        optimizer: {type: SGD, learning_rate: -1, eps: 0, beta1: 1.0, beta2: -0.1}
        lr_schedule: {type: Cosine, warmup_ratio: 1.5}
        callbacks:
          - {type: MFLossMonitor, prefix: x}
          - {type: CheckpointMonitor, save_checkpoint_steps: 0, keep_checkpoint_max: 0, prefx: a}
          - {type: LossMonitor}
        runner_wrapper: {max_grad_norm: 0}
        parallel_config: {data_parallel: 0, model_parallel: 0, pipeline_stage: 3}
        model:
          model_config:
            seq_length: 0
            vocab_size: 0
            num_layers: 0
            hidden_size: 100
            num_heads: 3
            n_kv_heads: 2
            rms_norm_eps: 0
            compute_dtype: fp16
            param_init_type: float64
            rotary_dtype: bfloat61
            hiden_size: 5
            pet_config: {pet_type: lora, lora_rnk: 8, target_modules: '.*wq'}
    """)
    errors = errors_of(load_config, path, {"use_parallel": True}, check_files=False)
    text = "\n".join(errors)
    expected = [
        "run_mode='finetun' is invalid: expected one of train, finetune, eval, predict (did you mean 'finetune'?). "
        "Use one of train, finetune, eval, predict.",
        "lora_rank=4 is invalid: the top level has no key 'lora_rank'",
        "runner_config.epochs=0 is invalid: must be >= 1",
        "runner_config.batch_size='2' is invalid: expected an int, got a string",
        "runner_config.gradient_accumulation_steps=0 is invalid",
        "runner_config.sink_mode='maybe' is invalid: expected a bool",
        "optimizer.type='SGD' is invalid",
        "optimizer.learning_rate=-1.0 is invalid: must be >= 0",
        "optimizer.eps=0.0 is invalid: must be > 0",
        "optimizer.beta1=1.0 is invalid: must be in [0, 1)",
        "optimizer.beta2=-0.1 is invalid",
        "lr_schedule.type='Cosine' is invalid",
        "lr_schedule.warmup_ratio=1.5 is invalid: must be in [0, 1]",
        "callbacks[0].prefix='x' is invalid: MFLossMonitor (callbacks[0]) has no key 'prefix'",
        "callbacks[1].prefx='a' is invalid",
        "callbacks[1].save_checkpoint_steps=0 is invalid",
        "callbacks[1].keep_checkpoint_max=0 is invalid",
        "callbacks[2].type='LossMonitor' is invalid: unknown callback type (did you mean 'MFLossMonitor'?)",
        "runner_wrapper.max_grad_norm=0.0 is invalid: must be > 0",
        "parallel_config.data_parallel=0 is invalid",
        "parallel_config.model_parallel=0 is invalid",
        "parallel_config.micro_batch_num=64 is invalid: pipeline_stage=3 runs as data parallel with micro_batch_num "
        "/ pipeline_stage gradient accumulation steps, so micro_batch_num must be a multiple of 3. "
        "Use micro_batch_num: 66",
        "model.model_config.seq_length=0 is invalid",
        "model.model_config.vocab_size=0 is invalid",
        "model.model_config.num_layers=0 is invalid",
        "model.model_config.rms_norm_eps=0.0 is invalid",
        "model.model_config.hidden_size=100 is invalid: it is not divisible by num_heads=3",
        "model.model_config.num_heads=3 is invalid: it is not divisible by n_kv_heads=2",
        "model.model_config.param_init_type='float64' is invalid: unknown dtype",
        "model.model_config.rotary_dtype='bfloat61' is invalid: unknown dtype (did you mean 'bfloat16'?)",
        "model.model_config.hiden_size=5 is invalid: 'model.model_config' has no key 'hiden_size' "
        "(did you mean 'hidden_size'?). Rename or remove it.",
        "model.model_config.pet_config.lora_rnk=8 is invalid",
    ]
    for fragment in expected:
        assert fragment in text, f"missing: {fragment}\n--- got:\n{text}"
    assert "did you mean 'lora_rank'" in text.lower()
    assert "callbacks[1].prefx='a' is invalid: CheckpointMonitor (callbacks[1]) has no key 'prefx' " \
           "(did you mean 'prefix'?). Rename or remove it." in text
    assert "compute_dtype" not in text  # fp16 is the model's alias of float16 (models.llama.DTYPES)
    assert len(errors) == len(expected), text


def test_messages_follow_key_value_why_fix(tmp_path):
    path = child_of_7b(tmp_path, "runner_config: {epochs: 0}\noptimizer: {eps: -1}\n")
    for e in errors_of(load_config, path, check_files=False):
        assert re.match(r"^[\w.\[\]]+=.+ is invalid: .+\. .+", e), e


def test_pipeline_stage_allowed_when_not_parallel_and_layout_reset(tmp_path, caplog):
    path = child_of_7b(tmp_path, "parallel_config: {pipeline_stage: 2, model_parallel: 2}\n")
    with caplog.at_level(logging.INFO, logger="mftune"):
        cfg = load_config(path, check_files=False)
    pc = cfg.parallel_config
    assert (pc.data_parallel, pc.model_parallel, pc.pipeline_stage) == (1, 1, 1)
    assert sum("treated as all 1" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mftune"):
        load_config(child_of_7b(tmp_path, "parallel_config: {data_parallel: 1}\n", "one.yaml"), check_files=False)
    assert not any("treated as all 1" in r.getMessage() for r in caplog.records)


def test_other_unsupported_layouts(tmp_path):
    path = child_of_7b(tmp_path, "micro_batch_interleave_num: 2\nparallel_config: {context_parallel: 2}\n")
    errors = errors_of(load_config, path, check_files=False)
    assert any(e.startswith("micro_batch_interleave_num=2 is invalid: micro-batch interleaving is not supported")
               for e in errors)
    assert any(e.startswith("parallel_config.context_parallel=2 is invalid") for e in errors)


def test_scale_sense_float_or_dynamic_mapping(tmp_path):
    cfg = load_config(child_of_7b(tmp_path, "runner_wrapper: {scale_sense: 1024}\n"), check_files=False)
    assert cfg.runner_wrapper.scale_sense == 1024.0
    dyn = child_of_7b(tmp_path, "runner_wrapper:\n  scale_sense: {type: DynamicLossScaleUpdateCell, "
                                "loss_scale_value: 128}\n", "dyn.yaml")
    assert load_config(dyn, check_files=False).runner_wrapper.scale_sense == {
        "type": "DynamicLossScaleUpdateCell", "loss_scale_value": 128, "scale_factor": 2, "scale_window": 1000}
    bad = child_of_7b(tmp_path, "runner_wrapper:\n  scale_sense: {type: FixedCell, scale_factr: 2, "
                                "scale_window: 0, loss_scale_value: -1}\n", "bad.yaml")
    text = "\n".join(errors_of(load_config, bad, check_files=False))
    assert "runner_wrapper.scale_sense.type='FixedCell' is invalid" in text
    assert "runner_wrapper.scale_sense.scale_factr=2 is invalid" in text and "(did you mean 'scale_factor'?)" in text
    assert "runner_wrapper.scale_sense.scale_window=0 is invalid" in text
    assert "runner_wrapper.scale_sense.loss_scale_value=-1 is invalid" in text
    assert "runner_wrapper.scale_sense=0 is invalid" in "\n".join(
        errors_of(load_config, child_of_7b(tmp_path, "runner_wrapper: {scale_sense: 0}\n", "z.yaml"), check_files=False))


def test_checkpoint_mointor_typo_is_accepted_with_a_warning(tmp_path, caplog):
    path = child_of_7b(tmp_path, """
        callbacks:
          - type: MFLossMonitor
            per_print_times: 5
          - type: CheckpointMointor
            prefix: old
    """)
    with caplog.at_level(logging.WARNING, logger="mftune"):
        cfg = load_config(path, check_files=False)
    assert cfg.callback("CheckpointMonitor").prefix == "old" and cfg.callback("MFLossMonitor").per_print_times == 5
    assert "CheckpointMointor" in caplog.text and "v1.1.0" in caplog.text


def test_run_mode_finetune_without_pet_config_is_a_full_finetune(tmp_path):
    path = write(tmp_path, "full.yaml", "run_mode: finetune\nmodel: {model_config: {num_layers: 2}}\n")
    cfg = load_config(path, check_files=False)
    assert cfg.model.model_config.get("pet_config") is None and cfg.run_mode == "finetune"


def test_pet_config_must_be_a_mapping(tmp_path):
    path = child_of_7b(tmp_path, "model: {model_config: {pet_config: lora}}\n")
    errors = errors_of(load_config, path, check_files=False)
    assert len(errors) == 1 and errors[0].startswith("model.model_config.pet_config='lora' is invalid")


def test_odd_head_dim_is_a_config_error_worded_as_the_model_says(tmp_path):
    """RoPE rotates channel pairs, so hidden_size / num_heads must be even (models.llama.model_config_errors)."""
    from mftune.models.llama import LlamaForCausalLM

    errors = errors_of(load_config, child_of_7b(tmp_path, "model: {model_config: {hidden_size: 20, num_heads: 4}}\n"),
                       check_files=False)
    message = ("hidden_size=20 is invalid: head_dim = hidden_size / num_heads = 5 is odd (RoPE rotates pairs of "
               "channels). Use num_heads x an even head_dim (e.g. 24), or change num_heads.")
    assert errors == [f"model.model_config.{message}"]
    with pytest.raises(ValueError) as info:  # the model raises the same text (without the key prefix)
        LlamaForCausalLM(dict(hidden_size=20, num_heads=4, num_layers=1, vocab_size=8))
    assert message in str(info.value)


def test_float32_compute_with_half_params_is_a_config_error(tmp_path):
    path = child_of_7b(tmp_path, "model: {model_config: {compute_dtype: float32, param_init_type: bf16}}\n")
    assert errors_of(load_config, path, check_files=False) == [
        "model.model_config.compute_dtype='float32' is invalid: float32 compute needs float32 parameters "
        "(param_init_type='bf16'): without autocast, bfloat16 weights would meet float32 activations. "
        "Set compute_dtype: bfloat16 (the forward then runs under autocast), or param_init_type: float32."]
    ok = child_of_7b(tmp_path, "model: {model_config: {compute_dtype: fp32, param_init_type: FP32}}\n", "ok.yaml")
    assert load_config(ok, check_files=False).model.model_config["compute_dtype"] == "fp32"


def test_decay_steps_is_optional_and_at_least_1():
    assert load_config(LORA_7B, check_files=False).lr_schedule.decay_steps is None  # = total - warmup
    assert parse(["--config", LORA_7B, "--lr_schedule.decay_steps", "500"]).lr_schedule.decay_steps == 500
    assert errors_of(parse, ["--config", LORA_7B, "--lr_schedule.decay_steps", "0"]) == [
        "lr_schedule.decay_steps=0 is invalid: must be >= 1 when set. Use e.g. decay_steps: 1000, "
        "or remove it (cosine decay over total_steps - warmup_steps)."]


def test_model_rules_are_reported_with_every_other_error(tmp_path):
    path = child_of_7b(tmp_path, """
        runner_config: {epochs: 0}
        lr_schedule: {decay_steps: 0}
        model:
          model_config: {hidden_size: 20, num_heads: 4, compute_dtype: fp32, param_init_type: fp16, rotary_dtype: fp8}
    """)
    errors = errors_of(cli.parse_cli, ["--config", path, "--use_parallel", "maybe"])  # file checks included
    assert [e.split("=")[0] for e in errors] == [
        "--use_parallel", "runner_config.epochs", "lr_schedule.decay_steps", "model.model_config.hidden_size",
        "model.model_config.rotary_dtype", "model.model_config.compute_dtype", "train_dataset.data_loader.dataset_dir"]
    assert errors[4] == ("model.model_config.rotary_dtype='fp8' is invalid: unknown dtype. "
                         "Use float32, float16 or bfloat16 (or fp32, fp16, bf16).")
    for e in errors:
        assert re.match(r"^[-\w.\[\]]+=.+ is invalid: .+\. .+", e), e


def test_config_model_and_pet_config_accept_the_same_dtype_names():
    """One table (models.llama.DTYPES, any case): what LlamaConfig accepts, validation accepts."""
    from mftune.models.config import DTYPES, LlamaConfig, model_config_errors

    for name in [*DTYPES, "BF16", "Float32", "float64", "fp8"]:
        known = name.lower() in DTYPES
        argv = ["--config", LORA_7B, "--model.model_config.rotary_dtype", name,
                "--model.model_config.pet_config.compute_dtype", name]
        if known:
            parse(argv)
        else:
            keys = {e.split("=")[0] for e in errors_of(parse, argv)}
            assert keys == {"model.model_config.rotary_dtype", "model.model_config.pet_config.compute_dtype"}
        assert (model_config_errors(LlamaConfig(rotary_dtype=name)) == []) is known, name


def test_ignored_keys_logged_once_and_only_those_present(tmp_path, caplog):
    path = write(tmp_path, "small.yaml", """
        context: {mode: 0, max_device_memory: 59GB}
        profile: False
        callbacks: [{type: MFLossMonitor}, {type: ObsMonitor}]
        train_dataset: {python_multiprocessing: True, data_loader: {dataset_dir: ''}}
    """)
    with caplog.at_level(logging.DEBUG, logger="mftune"):
        load_config(path, {"run_mode": "predict"})
    lines = [r.getMessage() for r in caplog.records if "Ignored on this backend" in r.getMessage()]
    assert len(lines) == 1 and len(lines[0]) < 200  # one short line pointing to the docs
    assert lines[0].startswith("Ignored on this backend (no effect): 5 accepted setting(s), e.g. ")
    assert "docs/config.md#ignored-keys" in lines[0]
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Ignored keys: ")]  # DEBUG
    for key in ("context.{mode, max_device_memory}", "profile", "callbacks[1] (ObsMonitor)",
                "train_dataset.python_multiprocessing"):
        assert key in line
    for absent in ("remote_save_url", "auto_tune", "layer_decay", "eval_dataset"):
        assert absent not in line


def test_ignored_keys_constant_is_greppable():
    assert "context" in IGNORED_KEYS and "remote_save_url" in IGNORED_KEYS
    assert all(isinstance(k, str) for k in IGNORED_KEYS)


def test_save_config_round_trip(tmp_path):
    cfg = parse(["--config", LORA_13B, "--use_parallel", "False", "--resume_training", "ck-1_2.safetensors"])
    out = tmp_path / "out" / "resolved_config.yaml"
    save_config(cfg, str(out))
    again = load_config(str(out), check_files=False)
    assert config_to_dict(again) == config_to_dict(cfg)
    assert isinstance(again.callbacks[0], CallbackConfig) and again.resume_training == "ck-1_2.safetensors"


def test_format_errors():
    errors = ["a=1 is invalid: x. y", "b=2 is invalid: z. w"]
    assert format_errors(errors, "f.yaml") == "mftune: 2 configuration error(s) in f.yaml:\n" \
                                              "  - a=1 is invalid: x. y\n  - b=2 is invalid: z. w"
    assert str(ConfigError(errors, "f.yaml")) == format_errors(errors, "f.yaml")
    assert format_errors(["e"]) == "mftune: 1 configuration error(s):\n  - e"


def test_docs_describe_every_key():
    """docs/config.md names every schema key, model_config key and pet_config key."""
    import dataclasses

    from mftune.models.llama import LlamaConfig
    from mftune.pet.config import LoraConfig

    with open(os.path.join(REPO, "docs", "config.md")) as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)  # fenced blocks aside
    spans = re.findall(r"`([^`]+)`", text)
    words = {w for span in spans for w in re.findall(r"\w+", span)}
    names = set()

    def walk(cls):
        for fld in dataclasses.fields(cls):
            names.add(fld.name)
            default = fld.default_factory() if fld.default_factory is not dataclasses.MISSING else fld.default
            if dataclasses.is_dataclass(default):
                walk(type(default))

    for cls in (MFConfig, CallbackConfig, LlamaConfig, LoraConfig):
        walk(cls)
    from mftune.config import DatasetConfig
    walk(DatasetConfig)
    missing = sorted(n for n in names if n not in words)
    assert not missing, f"keys missing from docs/config.md: {missing}"


def test_empty_yaml_is_an_error_not_the_7b_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="the file is empty"):
        load_config(str(empty), check_files=False)


def test_adapter_id_warns_and_modal_type_must_be_text(caplog):
    """--adapter_id without pet_type slora: predict warns that it is not used (tests/unit/test_slora.py has S-LoRA)."""
    from mftune.trainer.predict import adapter_slots

    cfg = parse(["--config", LORA_7B, "--run_mode", "predict", "--adapter_id", "a"])
    with caplog.at_level(logging.WARNING, logger="mftune"):
        assert adapter_slots(cfg.model.model_config["pet_config"], cfg.adapter_id, [None], 1) is None
    assert "adapter_id a is not used: it selects an S-LoRA adapter per prompt" in caplog.text
    errors = errors_of(parse, ["--config", LORA_7B, "--modal_type", "image"])
    assert errors == ["modal_type=['image'] is invalid: Llama is a text model. Remove --modal_type (or pass text)."]


def test_recompute_lists_and_offsets_are_checked(tmp_path):
    """Per-stage lists of one length (the first list's without use_parallel), pattern values bool or list,
    offsets summing to num_layers % stages: what MindFormers' LayerSetting accepts, never a traceback later."""
    path = child_of_7b(tmp_path, r"""
        recompute_config:
          recompute: [1, 1]
          select_recompute: {'feed_forward\.mul': 2, 'attention\.softmax': [1, 1, 1]}
          select_recompute_exclude: [1, 0, 0]
        model: {model_config: {offset: [1, 1]}}
    """)
    errors = errors_of(load_config, path, {"use_parallel": False}, check_files=False)
    assert errors == [
        "recompute_config.select_recompute.feed_forward\\.mul=2 is invalid: a pattern takes True, False or a list "
        "of layer counts per pipeline stage. Use e.g. True.",
        "recompute_config.select_recompute.attention\\.softmax=[1, 1, 1] is invalid: one count per pipeline stage "
        "is expected (2 stages: parallel_config.pipeline_stage, or the length of the first list). Give 2 count(s), "
        "or True.",
        "recompute_config.select_recompute_exclude=[1, 0, 0] is invalid: one count per pipeline stage is expected "
        "(2 stages: parallel_config.pipeline_stage, or the length of the first list). Give 2 count(s), or True.",
        "model.model_config.offset=[1, 1] is invalid: the layers added per pipeline stage (2 stage(s)) must be an "
        "int or one int per stage summing to num_layers % stages = 0. Use offset: 0 (layers split evenly over the "
        "stages)."]


def test_numbers_that_are_not_finite_are_refused():
    """learning_rate inf trained (exit 0); scale_sense nan trained 5 skipped steps; nan said 'must be >= 0'."""
    for flag, value in (("--optimizer.learning_rate", "inf"), ("--lr_schedule.learning_rate", "nan"),
                        ("--runner_wrapper.scale_sense", "nan"), ("--runner_wrapper.max_grad_norm", "inf")):
        with pytest.raises(ConfigError, match=rf"{flag[2:]}={value} is invalid: [^\n]*finite"):
            parse(["--config", LORA_7B, flag, value])
