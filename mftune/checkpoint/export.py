"""mftune LoRA checkpoint -> Hugging Face PEFT adapter directory (``scripts/export_adapter.py``); a prefix-tuning or
P-tuning v2 checkpoint is exported by ``mftune.checkpoint.export_prefix``.

The adapter's format and its ``adapter_config.json`` are ``mftune.checkpoint.formats.peft_adapter``'s;
this module checks that a checkpoint is a pure LoRA checkpoint and writes the directory atomically.
A MindSpore checkpoint (a ``.ckpt`` file or directory, a ``rank_*/`` set with its strategy) records
no pet_config: r, lora_alpha and lora_dropout then come from ``fallback`` (the command line), and
the number of layers from ``fallback`` or, failing that, the highest ``model.layers.N`` it holds.
"""
from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Callable
from typing import Any

import torch

from mftune.checkpoint.formats import MINDSPORE_FORMATS, checkpoint_header, distributed, open_checkpoint, recognise
from mftune.checkpoint.formats.peft_adapter import (CONFIG_NAME, SAFETENSORS_NAME, lora_grid, mftune_to_peft_name,
                                                    pair_and_rank, peft_adapter_config)
from mftune.checkpoint.export_prefix import prefix_adapter
from mftune.checkpoint.formats.peft_modules import to_peft
from mftune.checkpoint.load import fingerprint
from mftune.checkpoint.hf_files import CopyReport, HFBase, complete_adapter_dir, resolve_base
from mftune.checkpoint.keys import (LORA_A, LORA_B, LORA_MARK, OPTIMIZER_PREFIXES, SCALAR_KEYS, is_lora, is_pet,
                                   is_prefix_param, moment_names)
from mftune.checkpoint.safetensors_io import load_tensors, read_metadata, safetensors_header, save_safetensors
from mftune.errors import CheckpointError
from mftune.fileio import atomic_directory, atomic_open, check_free_space
from mftune.pet import is_prefix_type
from mftune.pet.config import init_method, is_base_init, lora_scaling
from mftune.pet.init import held_dtype, initial_factors

Loader = Callable[[list[str]], dict[str, torch.Tensor]]


def export_peft_adapter(src_checkpoint: str, output_dir: str, **kwargs: Any) -> dict[str, Any]:
    """``export_adapter_dir``'s adapter_config."""
    return export_adapter_dir(src_checkpoint, output_dir, **kwargs)[0]


def export_adapter_dir(src_checkpoint: str, output_dir: str, *, base_model_name_or_path: str | None = None,
                       overwrite: bool = False, fallback: dict[str, Any] | None = None,
                       src_strategy: str = "", base_model_dir: str | None = None) -> tuple[dict[str, Any], CopyReport]:
    """Write the LoRA adapters of the complete mftune checkpoint ``src_checkpoint`` as a PEFT adapter
    directory ``output_dir``; return the adapter_config written and what was copied beside it.

    ``lora_rank``/``lora_alpha``/``lora_dropout`` come from the checkpoint's pet_config header; a key
    missing there is an error unless ``fallback`` gives it (a fallback that contradicts the header is
    an error too). The tokenizer files of the base's Hugging Face directory (``base_model_dir``, else the
    one the checkpoint's base records as its origin: ``mftune.checkpoint.hf_files``) are copied beside
    the adapter, as trainers save them. ``base_model_name_or_path`` defaults to that directory (what
    ``AutoPeftModelForCausalLM`` loads), else the header's base checkpoint path.
    The directory appears complete or not at all (written next to it, then renamed); a non-empty
    ``output_dir`` is replaced only with ``overwrite``. Errors are CheckpointError (user mistakes).
    """
    out = os.path.abspath(output_dir)
    if os.path.commonpath([os.path.abspath(src_checkpoint), out]) == out:
        raise CheckpointError(f"output_dir={output_dir} is invalid: it contains src_checkpoint, which writing the "
                              f"adapter there would remove. Choose a new directory.")
    meta, keys, load = _source(src_checkpoint, src_strategy)
    recorded = meta.get("pet_config") or (meta.get("model_config") or {}).get("pet_config")
    if isinstance(recorded, dict) and is_prefix_type(recorded.get("pet_type")):  # checkpoint/export_prefix.py
        return _export_prefix(src_checkpoint, output_dir, meta, recorded, keys, load, overwrite=overwrite,
                              base_model_dir=base_model_dir, base_model_name_or_path=base_model_name_or_path)
    prefix = next((k for k in keys if is_prefix_param(k)), None)
    if prefix and not isinstance(recorded, dict):
        raise CheckpointError(f"src_checkpoint={src_checkpoint} holds a prefix ({prefix}) but no header with its "
                              f"pet_config and model_config, which the export needs (the prefix's layout and RoPE). "
                              f"Load it in a run with its pet_config and export a checkpoint that run saves.")
    if _is_mindspore(src_checkpoint):  # no header: the command line's LoRA settings
        meta = {"pet_config": {"pet_type": "lora"}, "model_config": {"num_layers": _num_layers(keys, fallback or {})}}
    pet_config = _lora_pet_config(meta, src_checkpoint)
    hparams = _lora_hparams(pet_config, fallback or {}, src_checkpoint)
    tensors = load(_adapter_keys(keys, pet_config, src_checkpoint))
    whole = {k: tensors.pop(k) for k in [k for k in tensors if not is_lora(k)]}  # modules_to_save
    modules, rank = pair_and_rank(tensors, src_checkpoint, dora=hparams["use_dora"])
    if rank != hparams["lora_rank"]:
        raise CheckpointError(f"pet_config.lora_rank={hparams['lora_rank']} is invalid: the LoRA tensors of "
                              f"{src_checkpoint} have rank {rank}. Check the checkpoint and its header.")
    init = init_method(pet_config.get("init_lora_weights", True))
    if is_base_init(init):  # PiSSA / OLoRA: the adapter over the original base, as peft converts it
        tensors = _as_plain_lora(tensors, modules, hparams, init, meta, src_checkpoint)
    saved, hparams["modules_to_save"] = to_peft(whole, src_checkpoint)
    try:
        peft_tensors = {**{mftune_to_peft_name(k): v.contiguous() for k, v in tensors.items()}, **saved}
    except KeyError as exc:
        raise CheckpointError(f"src_checkpoint={src_checkpoint} is invalid: {exc.args[0]}. mftune exports LoRA on "
                              f"decoder-layer Linear layers (wq wk wv wo w1 w2 w3) only.") from None
    layers, leaves = lora_grid(modules, src_checkpoint)
    num_layers = (meta.get("model_config") or {}).get("num_layers")
    if num_layers is None:
        raise CheckpointError(f"model_config.num_layers=None is invalid: {src_checkpoint}'s header does not "
                              f"record it. Export a checkpoint written by run_finetune.py, or pass --num_layers.")
    base = resolve_base(base_model_dir, src_checkpoint)
    if base_model_name_or_path is None:
        base_model_name_or_path = base.directory or (meta.get("base_checkpoint") or {}).get("path") or ""
    config = peft_adapter_config(hparams, layers, leaves, num_layers, base_model_name_or_path)
    report = _write_adapter_dir(output_dir, config, peft_tensors, overwrite, base)
    return config, report


def _export_prefix(src: str, output_dir: str, meta: dict[str, Any], pet_config: dict[str, Any], keys: list[str],
                   load: Loader, *, overwrite: bool, base_model_dir: str | None,
                   base_model_name_or_path: str | None) -> tuple[dict[str, Any], CopyReport]:
    """``export_adapter_dir`` of a prefix-tuning / P-tuning v2 checkpoint (``mftune.checkpoint.export_prefix``)."""
    trained = _trained_base_tensors(keys, pet_config)
    if trained:
        raise CheckpointError(
            f"src_checkpoint={src} is invalid: besides its prefix it holds trained base tensors "
            f"({', '.join(trained[:3])}{', ...' if len(trained) > 3 else ''}), which a PEFT prefix-tuning "
            f"adapter cannot carry. Export from a run that trains only the prefix.")
    config, peft_tensors = prefix_adapter(meta, pet_config, keys, load, src)
    base = resolve_base(base_model_dir, src)
    if base_model_name_or_path is None:
        base_model_name_or_path = base.directory or (meta.get("base_checkpoint") or {}).get("path") or ""
    config["base_model_name_or_path"] = base_model_name_or_path
    return config, _write_adapter_dir(output_dir, config, peft_tensors, overwrite, base)


def _as_plain_lora(tensors: dict[str, torch.Tensor], modules: set[str], hparams: dict[str, Any], init: str,
                   meta: dict[str, Any], src: str) -> dict[str, torch.Tensor]:
    """PiSSA / OLoRA adapters as the plain LoRA of rank 2r that peft's ``save_pretrained(...,
    path_initial_model_for_weight_conversion=...)`` writes: ``[A; A0]``, ``[B, -B0]`` (A0, B0 derived again from the
    recorded base), ``lora_alpha`` x 2 (x sqrt(2) with use_rslora) so the scaling is unchanged. ``hparams`` is
    updated."""
    recorded = meta.get("base_checkpoint") or {}
    base = recorded.get("path") or ""
    if not base or not os.path.exists(base):
        raise CheckpointError(f"src_checkpoint={src} is invalid: its adapters use init_lora_weights={init}, whose "
                              f"initial factors come from the base it records ({base or 'none recorded'}), which is "
                              f"not found. Restore the base at that path.")
    expected = recorded.get("fingerprint")
    if expected and fingerprint(base, like=expected) != expected:
        raise CheckpointError(f"src_checkpoint={src}: its base {base} holds other contents than it was trained over "
                              f"(fingerprint {expected}), and init_lora_weights={init} takes the adapters' initial "
                              f"factors from it. Restore the original base.")
    weights = open_checkpoint(base)
    scaling = lora_scaling(hparams["lora_alpha"], hparams["lora_rank"], hparams["use_rslora"])
    dtype = held_dtype(meta.get("model_config"))
    out = dict(tensors)
    for module in sorted(modules):
        a0, b0 = initial_factors(weights[f"{module}.weight"].full(), hparams["lora_rank"], scaling, init, dtype)
        a, b = f"{module}.{LORA_A}", f"{module}.{LORA_B}"
        out[a] = torch.cat([tensors[a].float(), a0]).to(tensors[a].dtype)
        out[b] = torch.cat([tensors[b].float(), -b0], dim=1).to(tensors[b].dtype)
    hparams["lora_rank"] *= 2
    hparams["lora_alpha"] *= 2 ** 0.5 if hparams["use_rslora"] else 2
    return out


def _lora_pet_config(meta: dict[str, Any], src: str) -> dict[str, Any]:
    """The LoRA pet_config a checkpoint's header records; an error when it records none or another method."""
    pet_config = meta.get("pet_config") or (meta.get("model_config") or {}).get("pet_config")
    if pet_config is not None and not isinstance(pet_config, dict):
        raise CheckpointError(f"pet_config={pet_config!r} is invalid: {src}'s header holds no mapping. "
                              f"Export a checkpoint written by a run with a LoRA pet_config.")
    if not pet_config:
        raise CheckpointError(
            f"src_checkpoint={src} is invalid: its header has no pet_config, so it is not a LoRA "
            f"checkpoint (run_mode {meta.get('run_mode', 'unknown')}). Export a checkpoint written by "
            f"a run with a LoRA pet_config (run_finetune.py, any run_mode).")
    if str(pet_config.get("pet_type", "lora")).lower() != "lora":
        raise CheckpointError(f"pet_config.pet_type={pet_config['pet_type']!r} is invalid: only LoRA exports to "
                              f"PEFT. Export a LoRA checkpoint.")
    return pet_config


def _adapter_keys(keys: list[str], pet_config: dict, src: str) -> list[str]:
    """The LoRA factors of a checkpoint that holds nothing else a PEFT adapter would lose."""
    lora_keys = [k for k in keys if is_lora(k) and not k.startswith(OPTIMIZER_PREFIXES)]
    if not lora_keys:
        raise CheckpointError(f"src_checkpoint={src} is invalid: it holds no LoRA tensors "
                              f"(*{LORA_MARK}*). Export the checkpoint of a LoRA run.")
    saved = pet_config.get("modules_to_save") or []
    model_keys = [k for k in keys if not is_lora(k) and not k.startswith(OPTIMIZER_PREFIXES) and k not in SCALAR_KEYS]
    whole = [k for k in model_keys if any(_in_module(k, m) for m in saved)]
    missing = [m for m in saved if not any(_in_module(k, m) for k in whole)]
    if missing:
        raise CheckpointError(f"src_checkpoint={src} is invalid: its pet_config has modules_to_save={saved} but it "
                              f"holds no tensor of {missing[0]!r}. Export the checkpoint the run saved.")
    trained = [k for k in _trained_base_tensors(keys, pet_config) if k not in whole]
    if trained:
        raise CheckpointError(
            f"src_checkpoint={src} is invalid: besides LoRA it holds trained base tensors "
            f"({', '.join(trained[:3])}{', ...' if len(trained) > 3 else ''}; pet_config.freeze_exclude="
            f"{pet_config.get('freeze_exclude')!r}), which a PEFT LoRA adapter cannot carry. Export from a run "
            f"that trains only the adapters (and modules_to_save).")
    return lora_keys + whole


def _is_mindspore(path: str) -> bool:
    return os.path.exists(path) and recognise(path) in MINDSPORE_FORMATS


def _num_layers(keys: list[str], fallback: dict[str, Any]) -> int | None:
    """``fallback``'s num_layers, else one more than the highest ``model.layers.N`` of ``keys``."""
    layers = [int(k.split(".")[2]) for k in keys if k.startswith("model.layers.") and k.split(".")[2].isdigit()]
    return fallback.get("num_layers") or (max(layers) + 1 if layers else None)


def _source(path: str, src_strategy: str = "") -> tuple[dict[str, Any], list[str], Loader]:
    """(header metadata, tensor names, load(names) -> full tensors) of a complete checkpoint file, of
    a distributed checkpoint directory (rank_*/: the adapters are reassembled from the shards) or of
    MindSpore checkpoints (a .ckpt file or directory, a rank_*/ set read with ``src_strategy``)."""
    kind = recognise(path) if os.path.exists(path) else None
    if kind is distributed or kind in MINDSPORE_FORMATS:
        entries = open_checkpoint(path, src_strategy)

        def load(names):
            return {n: entries[n].full() for n in names}
        return checkpoint_header(path), list(entries), load
    _check_source(path)
    meta = read_metadata(path)
    if "shards" in meta:
        raise CheckpointError(
            f"src_checkpoint={path} is invalid: it holds one rank's shards of a distributed checkpoint "
            f"(tensor parallel or FSDP2). Pass the directory that holds its rank_*/ folders.")
    return meta, sorted(safetensors_header(path)[1]), lambda names: load_tensors(path, names)


def _check_source(path: str) -> None:
    if os.path.isdir(path):
        hint = ""
        meta_json = os.path.join(path, "meta.json")
        if os.path.isfile(meta_json):
            try:
                with open(meta_json) as f:
                    hint = f" (the newest here: {os.path.join(path, json.load(f)['last_ckpt_file'])})"
            except (OSError, ValueError, KeyError, TypeError):
                pass
        raise CheckpointError(f"src_checkpoint={path} is invalid: it is a directory. Pass one checkpoint "
                              f"file{hint}.")
    if not os.path.isfile(path):
        raise CheckpointError(f"src_checkpoint={path} is invalid: no such file. Pass a .safetensors "
                              f"checkpoint written by a run with a LoRA pet_config.")


def _lora_hparams(pet_config: dict, fallback: dict[str, Any], where: str) -> dict[str, Any]:
    out = {}
    for key in ("lora_rank", "lora_alpha", "lora_dropout"):
        recorded, given = pet_config.get(key), fallback.get(key)
        if recorded is None and given is None:
            raise CheckpointError(
                f"pet_config.{key}=None is invalid: {where}'s header does not record it, and the adapter "
                f"needs it. Pass --{key} with the value the run used (mftune's default applies when the "
                f"YAML left it out).")
        if recorded is not None and given is not None and recorded != given:
            raise CheckpointError(f"--{key}={given} is invalid: {where} records pet_config.{key}={recorded}. "
                                  f"Drop --{key}.")
        out[key] = recorded if recorded is not None else given
    for key in ("use_rslora", "use_dora"):  # no flags: a run records them when it used them
        out[key] = bool(pet_config.get(key, False))
    return out


def _in_module(key: str, module: str) -> bool:
    """Whether tensor ``key`` belongs to the module a modules_to_save item names (the module, or one inside it)."""
    return f".{module}." in f".{key.rpartition('.')[0]}."


def _trained_base_tensors(keys: list[str], pet_config: dict) -> list[str]:
    """Non-LoRA model tensors the run trained: they have Adam moments, or freeze_exclude made them
    trainable (mftune.pet.lora.freeze_lora's rule on names)."""
    def patterns(key):
        v = pet_config.get(key) or []
        return [v] if isinstance(v, str) else list(v)

    include, exclude = patterns("freeze_include"), patterns("freeze_exclude")
    keyset = set(keys)
    out = []
    for k in keys:
        if is_pet(k) or k.startswith(OPTIMIZER_PREFIXES) or k in SCALAR_KEYS:
            continue
        by_rule = (any(fnmatch.fnmatchcase(k, p) for p in exclude)
                   and not any(fnmatch.fnmatchcase(k, p) for p in include))
        if by_rule or moment_names(k)[0] in keyset:
            out.append(k)
    return sorted(out)


def _write_adapter_dir(output_dir: str, config: dict, tensors: dict[str, torch.Tensor], overwrite: bool,
                       base: HFBase) -> CopyReport:
    """Write both files (and ``base``'s tokenizer files) into a fresh directory next to ``output_dir``,
    then rename it into place."""
    out = os.path.abspath(output_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise CheckpointError(f"output_dir={output_dir} is invalid: it is a file. Pass a directory path.")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise CheckpointError(f"output_dir={output_dir} is invalid: it exists and is not empty. Pass "
                              f"--overwrite to replace it, or choose another directory.")
    check_free_space(os.path.dirname(out), sum(t.numel() * t.element_size() for t in tensors.values()),
                     "the PEFT adapter")
    with atomic_directory(out) as stage:
        os.makedirs(stage.path)
        with atomic_open(os.path.join(stage.path, CONFIG_NAME)) as f:
            json.dump(config, f, indent=2, sort_keys=True)  # as peft writes it
            f.write("\n")
        save_safetensors(tensors, os.path.join(stage.path, SAFETENSORS_NAME), {"format": "pt"})
        report = complete_adapter_dir(base, stage.path)
    return report
