"""A Hugging Face PEFT LoRA adapter directory (reference/peft-lora-formats.md §2), read and described.

An adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (older:
``adapter_model.bin``) holding, per adapted Linear, ``base_model.model.<HF module>.lora_A.weight``
``[r, in]`` and ``....lora_B.weight`` ``[out, r]``: no adapter name inside the key (peft strips
``.default`` on save and re-inserts it on load). mftune's LoRA factors have the same orientation and
the same scaling ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``; PEFT recomputes it from the config,
so nothing is baked into B), DoRA's magnitude is PEFT's ``lora_magnitude_vector``,
and RoPE is rotate-half on both sides, so converting is a rename: module paths go through
``names.mftune_to_hf`` / ``names.hf_to_mftune``, the factor names through the table below.

mftune applies LoRA inside ``model.layers`` only, with one rank and one alpha, to the same module
types in every adapted layer (``target_modules`` matches local names, ``exclude_layers`` removes whole
layers or module types). So an adapter is always a grid (layers x module types); PEFT says the same
with a list ``target_modules`` of leaf names plus ``layers_to_transform``.

As a ``load_checkpoint`` source, the directory provides its adapters plus any complete ``.safetensors``
file placed beside them (the base). Writing an adapter is ``mftune.checkpoint.export``.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Any

import torch

from mftune.checkpoint.entries import Entry, merge_entries, safetensors_entries, tensor_entries
from mftune.checkpoint.formats.peft_modules import PEFT_PREFIX, mftune_module_names, peft_saved
from mftune.checkpoint.keys import LORA_A, LORA_B, LORA_M
from mftune.checkpoint.names import MFTUNE_TO_HF_LAYER, hf_to_mftune, mftune_to_hf
from mftune.checkpoint.safetensors_io import load_tensors
from mftune.errors import CheckpointError
from mftune.pet.targets import HEAD

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

# mftune LoRA parameter (on the adapted module) -> PEFT parameter (on the same HF module).
MFTUNE_TO_PEFT_PARAM: dict[str, str] = {
    LORA_A: "lora_A.weight",  # [r, in]
    LORA_B: "lora_B.weight",  # [out, r]
    LORA_M: "lora_magnitude_vector",  # [out], DoRA (peft saves it without ".weight")
}
PEFT_TO_MFTUNE_PARAM: dict[str, str] = {v: k for k, v in MFTUNE_TO_PEFT_PARAM.items()}

# The Linear layers inside a decoder layer, in names-table order (wq wk wv wo w1 w2 w3): the only
# places mftune's get_pet_model can put LoRA.
LINEAR_LEAVES: tuple[str, ...] = tuple(
    k[: -len(".weight")] for k in MFTUNE_TO_HF_LAYER if k.startswith(("attention.w", "feed_forward.w")))

_MODULE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# adapter_config.json fields mftune's LoRA cannot represent -> why. A field counts when its value is
# truthy (absent, null, false, {} and [] are all "not used").
UNSUPPORTED_FIELDS: dict[str, str] = {
    "lora_bias": "mftune's lora_B has no bias",
    "fan_in_fan_out": "Llama Linear weights are [out, in]; a transposed (Conv1D) layout does not apply",
    "rank_pattern": "per-module ranks; mftune has one lora_rank",
    "alpha_pattern": "per-module alphas; mftune has one lora_alpha",
    "layer_replication": "mftune does not replicate decoder layers",
    "trainable_token_indices": "mftune does not train embedding rows",
    "target_parameters": "LoRA on raw parameters (MoE experts) does not exist in mftune",
    "megatron_config": "Megatron-parallel LoRA layers are not mftune's",
    "use_qalora": "QA-LoRA pools the input; mftune's LoRA does not",
    "alora_invocation_tokens": "activated LoRA is not implemented in mftune",
    "use_bdlora": "BD-LoRA is not implemented in mftune",
}
# What to do with an adapter mftune cannot apply as LoRA: the merged model is a plain Llama.
MERGE_FIX = ("Merge it into its base with peft (PeftModel.from_pretrained(base, DIR).merge_and_unload()"
             ".save_pretrained(OUT)) and load OUT as a Hugging Face directory, or use an adapter trained without it.")
# init_lora_weights values whose adapter only makes sense on a base the init modified (residual W).
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


# ----------------------------------------------------------------------------------------------
# names and the layer x module grid
# ----------------------------------------------------------------------------------------------

def mftune_to_peft_name(name: str) -> str:
    """``model.layers.0.attention.wq.mindpet_delta_lora_a`` ->
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``; KeyError if unknown."""
    module, _, param = name.rpartition(".")
    if param not in MFTUNE_TO_PEFT_PARAM or not _is_lora_module(module):
        raise KeyError(f"mftune_to_peft: {name!r} is not an mftune LoRA tensor of a decoder-layer Linear or lm_head")
    hf_module = mftune_to_hf(f"{module}.weight")[: -len(".weight")]
    return f"{PEFT_PREFIX}{hf_module}.{MFTUNE_TO_PEFT_PARAM[param]}"


def peft_to_mftune_name(name: str) -> str:
    """Inverse of ``mftune_to_peft_name``; KeyError if ``name`` is not a LoRA A/B of a decoder-layer Linear."""
    for peft_param, param in PEFT_TO_MFTUNE_PARAM.items():
        if name.startswith(PEFT_PREFIX) and name.endswith(f".{peft_param}"):
            hf_module = name[len(PEFT_PREFIX): -len(peft_param) - 1]
            try:
                module = hf_to_mftune(f"{hf_module}.weight")[: -len(".weight")]
            except KeyError:
                break
            if _is_lora_module(module):
                return f"{module}.{param}"
            break
    raise KeyError(f"peft_to_mftune: {name!r} is not a PEFT LoRA tensor (base_model.model.<module>.lora_A.weight / "
                   f".lora_B.weight) of a Llama decoder-layer Linear or lm_head")


def _is_lora_module(module: str) -> bool:
    m = _MODULE.match(module)
    return module == HEAD or (bool(m) and m.group(2) in LINEAR_LEAVES)


def lora_grid(modules: set[str], where: str) -> tuple[list[int], list[str]]:
    """mftune module paths -> (layer indices, local leaves like ``attention.wq`` in table order, then ``lm_head``
    when it is adapted).

    A CheckpointError if the modules are not every combination of the two (mftune cannot express that)."""
    pairs = set()
    for module in modules - {HEAD}:
        m = _MODULE.match(module)
        pairs.add((int(m.group(1)), m.group(2)))
    layers = sorted({i for i, _ in pairs})
    leaves = [leaf for leaf in LINEAR_LEAVES if any(leaf == p for _, p in pairs)]
    missing = [f"model.layers.{i}.{leaf}" for i in layers for leaf in leaves if (i, leaf) not in pairs]
    if missing:
        raise CheckpointError(
            f"{where}: the LoRA modules are not the same in every adapted layer (e.g. no adapter on "
            f"{missing[0]}), which mftune's pet_config (one target_modules for all layers) cannot express. "
            f"Use an adapter whose layers all carry the same module types.")
    return layers, leaves + ([HEAD] if HEAD in modules else [])


def pair_and_rank(tensors: dict[str, torch.Tensor], where: str, dora: bool = False) -> tuple[set[str], int]:
    """Check every module has A ``[r, in]`` and B ``[out, r]`` with one r, and a DoRA magnitude ``[out]``
    exactly when ``dora``; returns (modules, r)."""
    modules = {k.rpartition(".")[0] for k in tensors}
    ranks = set()
    for module in sorted(modules):
        a, b, m = (tensors.get(f"{module}.{p}") for p in (LORA_A, LORA_B, LORA_M))
        if (m is not None) != dora:
            raise CheckpointError(f"{where}: LoRA module {module} {'lacks' if dora else 'has'} a DoRA magnitude "
                                  f"({LORA_M}) but {'' if dora else 'no '}DoRA is configured (use_dora). Use the "
                                  f"adapter's own adapter_config.json.")
        if m is not None and b is not None and tuple(m.shape) != (b.shape[0],):
            raise CheckpointError(f"{where}: LoRA module {module} has a DoRA magnitude of shape {list(m.shape)}; "
                                  f"expected [{b.shape[0]}] (one per output row). Use an unsharded adapter.")
        if a is None or b is None:
            half = f"{LORA_B} (lora_B)" if b is None else f"{LORA_A} (lora_A)"
            raise CheckpointError(f"{where}: LoRA module {module} lacks {half}. Use a complete adapter.")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"{where}: LoRA module {module} has A {list(a.shape)} and B {list(b.shape)}; expected "
                f"A [r, in] and B [out, r] with the same r (empty or 1-D tensors come from saving a "
                f"sharded model without gathering). Use an unsharded adapter.")
        ranks.add(a.shape[0])
    if len(ranks) > 1:
        raise CheckpointError(f"{where}: LoRA modules have different ranks {sorted(ranks)}; mftune has one "
                              f"lora_rank. Use an adapter with a single rank.")
    return modules, ranks.pop()


def peft_adapter_config(hparams: dict[str, Any], layers: list[int], leaves: list[str], num_layers: int,
                        base_model_name_or_path: str) -> dict[str, Any]:
    """adapter_config.json for a LoRA grid (``leaves`` are mftune local names like ``attention.wq``).

    Only fields peft has read since v0.9 (older versions reject unknown keys; newer ones fill in
    defaults for absent keys without a warning), every one at its neutral value except the LoRA ones.
    """
    hf_leaves = [HEAD if leaf == HEAD else mftune_to_hf(f"model.layers.0.{leaf}.weight").split(".")[-2]
                 for leaf in leaves]
    partial = bool(layers) and layers != list(range(num_layers))  # an exact "lm_head" ignores layers_to_transform
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": "layers" if partial else None,
        "layers_to_transform": layers if partial else None,
        "lora_alpha": hparams["lora_alpha"],
        "lora_dropout": hparams["lora_dropout"],
        "modules_to_save": hparams.get("modules_to_save") or None,
        "peft_type": "LORA",
        "r": hparams["lora_rank"],
        "rank_pattern": {},
        "revision": None,
        "target_modules": hf_leaves,
        "task_type": "CAUSAL_LM",
        "use_dora": hparams.get("use_dora", False),
        "use_rslora": hparams.get("use_rslora", False),
    }


# ----------------------------------------------------------------------------------------------
# reading: PEFT adapter directory -> mftune tensors + pet_config
# ----------------------------------------------------------------------------------------------

def matches(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_NAME))


def entries(path: str) -> dict[str, Entry]:
    """The adapters (renamed) plus the complete ``.safetensors`` files beside them (a base); the adapter's
    modules_to_save tensors replace the base's."""
    tensors, _ = read_peft_adapter(path)
    others = [f for f in glob.glob(os.path.join(glob.escape(path), "*.safetensors"))
              if os.path.basename(f) != SAFETENSORS_NAME]
    bases = [{k: e for k, e in safetensors_entries(f).items() if k not in tensors} for f in sorted(others)]
    return merge_entries(path, [tensor_entries(tensors, path)] + bases)


def header(path: str) -> dict[str, Any]:
    """``{"pet_config": ...}``: the mftune pet_config equivalent to the adapter's config."""
    return {"pet_config": read_peft_adapter(path)[1]}


_READ: dict[tuple, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}  # read_peft_adapter's last results


def read_peft_adapter(adapter_dir: str,
                      num_layers: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``_read_peft_adapter``, read once while its files stay the same (a run asks for an adapter's config, header
    and tensors at several points: one read of the weights). The tensors are shared; callers do not change them.
    ``forget_reads`` frees them once the weights are loaded."""
    files = [os.path.join(adapter_dir, n) for n in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME)]
    stats = [os.stat(f) if os.path.isfile(f) else None for f in files]
    key = (os.path.abspath(adapter_dir), num_layers,
           tuple(None if st is None else (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size) for st in stats))
    if key not in _READ:
        if len(_READ) >= 2:
            _READ.pop(next(iter(_READ)))
        _READ[key] = _read_peft_adapter(adapter_dir, num_layers)
    tensors, pet_config = _READ[key]
    return dict(tensors), json.loads(json.dumps(pet_config))


def forget_reads() -> None:
    """Drop ``read_peft_adapter``'s kept results (after a run's weights are loaded: they may be GBs)."""
    _READ.clear()


def _read_peft_adapter(adapter_dir: str,
                       num_layers: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a PEFT LoRA adapter directory: its tensors under mftune names
    (``model.layers.{i}.attention.wq.mindpet_delta_lora_a``) and an equivalent mftune pet_config.

    The pet_config's ``target_modules`` is a MindFormers regex over the adapted module types
    (``.*wq|.*wv``); when the adapter covers only some layers (of ``num_layers``, when given), ``exclude_layers``
    is a regex that re.matches every other layer index (``(?!(?:0|2)$)\\d+$``), so it holds for any layer count.
    Features mftune's LoRA cannot reproduce are a CheckpointError naming each field. What the adapter's
    ``target_modules`` selects on a given model is ``mftune.checkpoint.adapter_config``'s (PEFT's matching rules).
    """
    config, config_path = read_adapter_config(adapter_dir)
    raw, weights_path = _read_adapter_weights(adapter_dir)
    saved, taken = peft_saved(raw, config, weights_path)
    # peft's save_embedding_layers="auto" saves the whole lm_head beside its LoRA: it replaces the base's, as in peft
    head_weight = {f"{HEAD}.weight": raw[k] for k in raw if k == f"{PEFT_PREFIX}{HEAD}.base_layer.weight"}
    unknown = []
    tensors = {}
    for key, value in raw.items():
        if key in taken or key == f"{PEFT_PREFIX}{HEAD}.base_layer.weight":
            continue
        try:
            tensors[peft_to_mftune_name(key)] = value
        except KeyError:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{weights_path} is invalid: {len(unknown)} tensors are not LoRA A/B of a decoder-layer Linear or "
            f"lm_head (e.g. {unknown[0]}); mftune applies LoRA to wq wk wv wo w1 w2 w3 (HF q/k/v/o_proj, gate/down/"
            f"up_proj) and lm_head only. Use an adapter without embedding LoRA or biases.")
    if not tensors:
        raise CheckpointError(f"{weights_path} is invalid: it holds no tensors. Re-save the adapter.")
    modules, rank = pair_and_rank(tensors, weights_path, dora=config.get("use_dora") is True)
    if rank != config.get("r", 8):  # peft's default r
        raise CheckpointError(f"{config_path}: r={config.get('r', 8)} is invalid: the tensors in {weights_path} have "
                              f"rank {rank}. Use the adapter's own adapter_config.json.")
    layers, leaves = lora_grid(modules, weights_path)
    wanted = config.get("layers_to_transform")
    if wanted is not None:
        wanted = sorted({wanted} if isinstance(wanted, int) else set(wanted))
        if wanted != layers:
            raise CheckpointError(f"{config_path}: layers_to_transform={wanted} is invalid: {weights_path} has "
                                  f"adapters on layers {layers}. Use the adapter's own adapter_config.json.")
    every = list(range(len(layers) if num_layers is None else num_layers))
    pet_config = grid_pet_config(config, rank, layers, leaves, partial=bool(layers) and (
        layers != every or (num_layers is None and wanted is not None)))
    if saved:
        pet_config["modules_to_save"] = mftune_module_names(saved)
    return {**tensors, **saved, **head_weight}, pet_config


def grid_pet_config(config: dict[str, Any], rank: int, layers: list[int], leaves: list[str],
                    partial: bool) -> dict[str, Any]:
    """The mftune pet_config of a LoRA grid (``leaves`` like ``attention.wq``), with the adapter's alpha and
    dropout (peft's defaults when absent); ``partial``: not every layer, so ``exclude_layers`` names the others."""
    pet_config: dict[str, Any] = {
        "pet_type": "lora",
        "lora_rank": rank,
        "lora_alpha": config.get("lora_alpha", 8),  # peft's default
        "lora_dropout": config.get("lora_dropout", 0.0),
        "use_rslora": bool(config.get("use_rslora", False)),
        "use_dora": bool(config.get("use_dora", False)),
        "target_modules": "|".join(leaf if leaf == HEAD else f".*{leaf.split('.')[-1]}" for leaf in leaves),
    }
    if partial:
        pet_config["exclude_layers"] = "(?!(?:" + "|".join(map(str, layers)) + r")$)\d+$"
    return pet_config


def read_adapter_config(adapter_dir: str) -> tuple[dict[str, Any], str]:
    """``(adapter_config.json's fields, its path)``; a CheckpointError for a missing or unreadable file and for
    every field mftune's LoRA cannot reproduce (``adapter_config_errors``)."""
    config_path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"adapter_dir={adapter_dir} is invalid: it has no {CONFIG_NAME}. Pass a PEFT "
                              f"adapter directory (save_pretrained output).")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except ValueError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON ({exc}). Re-save the adapter.") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} is invalid: expected a JSON object. Re-save the adapter.")
    errors = adapter_config_errors(config)
    if errors:
        raise CheckpointError(f"{len(errors)} problem(s) in {config_path}:\n  " + "\n  ".join(errors))
    return config, config_path


def adapter_config_errors(config: dict[str, Any]) -> list[str]:
    """Every field of a PEFT adapter_config.json that mftune's LoRA cannot reproduce, one message each."""
    def err(key: str, why: str, fix: str) -> str:
        return f"{key}={json.dumps(config.get(key))} is invalid: {why}. {fix}"

    if config.get("peft_type") != "LORA":
        return [err("peft_type", "mftune reads LoRA adapters only", "Use a LoRA adapter (peft_type LORA).")]
    errors = []
    r = config.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        errors.append(err("r", "the rank must be a positive integer", "Fix adapter_config.json."))
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha == 0 or not math.isfinite(alpha):
        errors.append(err("lora_alpha", "must be a finite non-zero number", "Fix adapter_config.json."))
    dropout = config.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        errors.append(err("lora_dropout", "must be a number in [0, 1)", "Fix adapter_config.json."))
    if config.get("bias", "none") != "none":
        errors.append(err("bias", "mftune's Llama has no biases to train or load",
                          'Use an adapter trained with bias "none".'))
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) and m for m in saved)):
        errors.append(err("modules_to_save", "must be a list of module names", "Fix adapter_config.json."))
    for key in ("use_rslora", "use_dora"):  # null: not used (as peft reads it)
        if config.get(key) is not None and not isinstance(config[key], bool):
            errors.append(err(key, "must be true or false", "Fix adapter_config.json."))
    for key, why in UNSUPPORTED_FIELDS.items():
        if config.get(key):
            errors.append(err(key, why, MERGE_FIX))
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS):
        errors.append(err("init_lora_weights", "this initialisation modifies the base weights, so the adapter "
                          "needs that residual base, not the original one",
                          "Save the adapter with peft's path_initial_model_for_weight_conversion (a plain LoRA "
                          "for the original base)."))
    return errors


def _read_adapter_weights(adapter_dir: str) -> tuple[dict[str, torch.Tensor], str]:
    """adapter_model.safetensors first, then adapter_model.bin (torch.load weights_only), as peft does."""
    path = os.path.join(adapter_dir, SAFETENSORS_NAME)
    if os.path.isfile(path):
        try:
            return load_tensors(path), path
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001  (safetensors' own error types)
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc}). Re-save the adapter.") from None
    path = os.path.join(adapter_dir, BIN_NAME)
    if os.path.isfile(path):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001  (pickle/zip errors, or objects weights_only refuses)
            raise CheckpointError(f"{path} cannot be read with torch.load(weights_only=True) ({exc}). "
                                  f"Re-save the adapter with safetensors.") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path} is invalid: expected a dict of tensors. Re-save the adapter.")
        return state, path
    raise CheckpointError(f"adapter_dir={adapter_dir} is invalid: it has neither {SAFETENSORS_NAME} nor "
                          f"{BIN_NAME}. Pass a complete PEFT adapter directory.")
