"""What a run takes from a Hugging Face model directory: ``pretrained_model_dir``, or such a directory
given as ``load_checkpoint`` (the same, as far as the architecture and the tokenizer go).

- the architecture: config.json merged with ``model.model_config`` (``mftune.checkpoint.pretrained``:
  keys the YAML leaves out come from config.json, one that disagrees is an error naming both values);
- the weights: the directory's, when ``load_checkpoint`` is empty (and the run does not resume); under a
  ``load_checkpoint`` that holds only adapters (a LoRA run's checkpoint, a PEFT adapter), the directory is
  their base (``mftune.checkpoint.load``);
- a resumed run that started from a Hugging Face directory finds it again in its checkpoint's record;
- the tokenizer: the directory's files when ``processor.tokenizer.vocab_file`` is empty (its kind from the
  files unless ``processor.tokenizer.type`` names one), and its Jinja chat template (``chat_template: hf``)
  unless ``processor.tokenizer.chat_template`` names another. A tokenizer given in the YAML keeps
  MindFormers' defaults (Vicuna training data, prompts as given).

Everything taken is logged, and written into output_dir/resolved_config.yaml, which reruns the same model.
"""
from __future__ import annotations

import dataclasses
import logging
import os

from mftune.checkpoint.formats import huggingface, recognise
from mftune.checkpoint.pretrained import directory_model_config, merge_model_config
from mftune.config.schema import MFConfig, TokenizerConfig
from mftune.data.hf_tokenizer import read_directory_meta
from mftune.data.templates import tokenizer_kinds
from mftune.data.tokenizer_kinds import detect_type, resolve_vocab_file
from mftune.errors import CheckpointError, DataError
from mftune.trainer.resume import ResumePoint

logger = logging.getLogger("mftune")


def hf_directory(cfg: MFConfig, point: ResumePoint | None = None) -> tuple[str, str] | None:
    """``(directory, the key that names it)``: pretrained_model_dir, else a Hugging Face load_checkpoint, else
    (resuming from ``point``) the Hugging Face directory the resumed run started from, as its checkpoint records."""
    if cfg.pretrained_model_dir:
        return cfg.pretrained_model_dir, "pretrained_model_dir"
    path = cfg.load_checkpoint
    if not path or not os.path.exists(path):
        return None
    if not cfg.resume_training:
        return (path, "load_checkpoint") if _is_hf(path) else None
    base = (point.base_checkpoint or {}).get("path") if point is not None else None
    if base and os.path.exists(base) and _is_hf(base):
        logger.info("resume_training: the run started from the Hugging Face directory %s; it is the "
                    "pretrained_model_dir again", base)
        return base, "pretrained_model_dir"
    return None


def _is_hf(path: str) -> bool:
    return recognise(path) is huggingface


def apply_pretrained_dir(cfg: MFConfig, point: ResumePoint | None = None, *, gpu: bool,
                         bf16: bool = True) -> MFConfig:
    """``cfg`` with what its Hugging Face directory gives (module docstring); ``cfg`` itself without one.
    ``point``: the resume point of a resumed run. ``gpu``, ``bf16``: the run computes on a GPU, one with
    bfloat16 (the default compute dtype depends on it)."""
    found = hf_directory(cfg, point)
    if found is None:
        return cfg
    directory, key = found
    merged = merge_model_config(cfg.model.model_config, directory_model_config(directory, key), directory,
                                gpu=gpu, bf16=bf16)
    logger.info("%s=%s: the architecture from its config.json (%s)", key, directory,
                ", ".join(merged.from_directory) or "model_config gives every key")
    for note in merged.notes:
        logger.info("%s: %s", key, note)
    for warning in merged.warnings:
        logger.warning("%s: %s", key, warning)
    changes = {"model": dataclasses.replace(cfg.model, model_config=merged.model_config)}
    if key == "pretrained_model_dir":
        changes["pretrained_model_dir"] = directory  # also when found through a resumed run
    if key == "pretrained_model_dir" and not cfg.load_checkpoint and not cfg.resume_training:
        if huggingface.matches(directory):
            changes["load_checkpoint"] = directory
            logger.info("pretrained_model_dir: the weights from %s (load_checkpoint is empty)", directory)
        else:
            _no_weights(directory, cfg.run_mode)
    tokenizer = _tokenizer(cfg.processor.tokenizer, directory, key)
    if tokenizer is not None:
        changes["processor"] = dataclasses.replace(cfg.processor, tokenizer=tokenizer)
    return dataclasses.replace(cfg, **changes)


def _no_weights(directory: str, run_mode: str) -> None:
    """pretrained_model_dir without weights and no load_checkpoint: run_mode train starts from random weights
    (warned); finetune, eval and predict would quietly use a random model, so they are refused."""
    what = f"pretrained_model_dir={directory} holds no weights (model.safetensors, its index, or pytorch_model.bin)"
    if run_mode == "train":
        logger.warning("%s and load_checkpoint is empty: training starts from random weights", what)
        return
    raise CheckpointError(f"{what} and load_checkpoint is empty: run_mode {run_mode} would use a randomly "
                          f"initialised model. Put the weights in the directory, pass them with --load_checkpoint, "
                          f"or use --run_mode train to train from random weights.")


def _tokenizer(tok: TokenizerConfig, directory: str, key: str) -> TokenizerConfig | None:
    """The tokenizer settings with the directory's tokenizer and template; None when the YAML names a
    tokenizer file or the directory holds none."""
    if tok.vocab_file:
        return None
    try:
        kind = detect_type(resolve_vocab_file(directory, tok.type))
    except DataError:
        logger.info("%s=%s holds no tokenizer files: set processor.tokenizer.vocab_file for the steps that "
                    "tokenize (raw datasets, predict)", key, directory)
        return None
    template = tok.chat_template
    if template is None and read_directory_meta(directory)["chat_template"]:
        if kind in tokenizer_kinds("hf"):
            template = "hf"
        else:
            logger.info("%s: its chat template is not used with a %s tokenizer (no token offsets); conversations "
                        "use the Vicuna template. Point processor.tokenizer.vocab_file at its tokenizer.json",
                        key, kind)
    logger.info("%s: tokenizer %s (%s), conversation template %s", key, directory, kind,
                template or "vicuna for training data, none for predict prompts")
    return dataclasses.replace(tok, vocab_file=directory, chat_template=template)
