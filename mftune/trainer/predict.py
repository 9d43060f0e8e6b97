"""``--run_mode predict``: generate text for prompts with the (LoRA) model, MindFormers' way.

Prompts come from ``input_data`` (``--predict_data``: one or more texts; a literal ``\\n`` is a
newline) or, when that is one path of an existing file, from the file: one prompt per line, or a
``.json`` list / ``.jsonl`` lines of strings or of objects with a ``prompt`` field. Each prompt is
tokenized with ``processor.tokenizer`` (its kind from ``type`` and the file) as MindFormers does: as
it is, with bos when ``add_bos_token`` says so (default: the tokenizer's MindFormers default, ``<s>``
for LlamaTokenizer, none for Llama3Tokenizer). With ``processor.tokenizer.chat_template`` set to a
template name (``vicuna``, ``llama2``, ``llama3``, ``chatml``, or ``hf`` = the tokenizer directory's own
Jinja template: ``mftune.data.templates``) each prompt is instead a user message in that template,
ready for the answer (transformers' ``add_generation_prompt``), and the template's end-of-turn token
(Llama 3's ``<|eot_id|>``, ChatML's ``<|im_end|>``) also ends generation, as do the tokenizer's eos and
the model directory's eos ids (generation_config.json, config.json; eos may be a list). Only the
generated answer is printed. The prompts are generated in batches of
``predict_batch_size`` (default ``model_config.batch_size``), left-padded, with model_config's
``do_sample``, ``top_k``, ``top_p``, ``temperature``, ``repetition_penalty`` and
``max_decode_length`` (prompt + generated tokens, MindFormers' meaning) and a KV cache. LoRA
adapters are applied unmerged (merge them with scripts/transform_ckpt_lora.py to predict from a
plain model; the outputs are the same). On several ranks (``use_parallel``, any data/model
parallel layout; sequence parallel is switched off, decoding feeds one token at a time) every rank
generates every prompt in lockstep and rank 0 reports. Every prompt's result is printed and written to
``<output_dir>/predict_results.jsonl``: ``prompt``, ``input_ids`` (as fed to the model),
``output_ids`` (generated ids only, eos included when produced) and ``text``.
"""
from __future__ import annotations

import json
import logging
import os
import time

import torch

from mftune.checkpoint.slora_adapters import adapter_dirs
from mftune.config.schema import MFConfig
from mftune.data.templates import RAW, Template, get_template
from mftune.data.tokenizer_kinds import Tokenizer, build_tokenizer, stop_ids_of
from mftune.errors import UserError
from mftune.generation import GenerationConfig, check_generation, generate, max_new_tokens_for
from mftune.models.config import LlamaConfig
from mftune.parallel.mesh import ParallelContext
from mftune.pet.config import is_slora
from mftune.pet.slora import set_adapter_ids
from mftune.fileio import atomic_open
from mftune.trainer.build import build_model
from mftune.trainer.outputs import PREDICT_RESULTS as RESULTS

logger = logging.getLogger("mftune")


def run_predict(cfg: MFConfig, model_config: LlamaConfig, ctx: ParallelContext, output_dir: str) -> None:
    """``run_mode predict``: the model as fine-tuned (pet_config applied, load_checkpoint loaded), the
    prompts of ``input_data``, results in predict_results.jsonl. Every input is checked before the
    model is built."""
    tok_cfg = cfg.processor.tokenizer
    if not tok_cfg.vocab_file:
        raise UserError("processor.tokenizer.vocab_file is empty: run_mode predict needs the tokenizer "
                        "(the tokenizer.model file). Set it in the YAML or with "
                        "--processor.tokenizer.vocab_file PATH.")
    try:
        tokenizer = build_tokenizer(tok_cfg.vocab_file, tok_cfg.type)
        prompts, file_adapters = read_prompt_items(cfg.input_data)
        template = None if tok_cfg.chat_template in (None, RAW) else \
            get_template(tok_cfg.chat_template, tokenizer, "processor.tokenizer.chat_template")
        generation = GenerationConfig.from_model_config(model_config)
        ids, budgets = encode_prompts(tokenizer, prompts, generation, template, tok_cfg.add_bos_token)
        adapters = adapter_slots(model_config.pet_config, cfg.adapter_id, file_adapters, len(prompts))
    except (ValueError, OSError) as exc:  # also generation settings, prompts longer than max_decode_length
        raise UserError(str(exc)) from None
    model = build_model(cfg, model_config, ctx).model
    predict(model, tokenizer, prompts, ids, budgets, generation,
            batch_size=cfg.predict_batch_size or model_config.batch_size, output_dir=output_dir, seed=cfg.seed,
            is_main=ctx.is_main, stop_ids=stop_ids(tokenizer, template) + stop_ids_of(tokenizer), adapters=adapters)


def adapter_slots(pet_config: dict | None, adapter_id: str | list[str] | None, file_adapters: list[str | None],
                  num_prompts: int) -> list[tuple[str | None, int]] | None:
    """pet_type slora: each prompt's ``(adapter name, slot)`` (slot 0: the base alone), from ``--adapter_id`` (one
    name for every prompt, or one per prompt) or the prompts file's ``adapter_id`` fields (MindFormers passes one
    id per batch); None without S-LoRA (``--adapter_id`` is then ignored with a warning). ValueError names an
    unknown adapter, a count that does not fit, or ids given both ways."""
    given = [adapter_id] if isinstance(adapter_id, str) else list(adapter_id or [])
    if not is_slora(pet_config):
        if given or any(file_adapters):
            logger.warning("adapter_id %s is not used: it selects an S-LoRA adapter per prompt, and pet_config is not "
                           "pet_type slora", " ".join(given) or "(prompts file)")
        return None
    names = list(adapter_dirs(pet_config["adapter_path"]))
    if given and any(file_adapters):
        raise ValueError("--adapter_id and the prompts file's adapter_id fields both choose adapters: give them one "
                         "way.")
    if len(given) not in (0, 1, num_prompts):
        raise ValueError(f"--adapter_id has {len(given)} values for {num_prompts} prompts: give one (for every "
                         f"prompt) or one per prompt.")
    chosen = file_adapters if any(file_adapters) else (given * num_prompts if len(given) == 1 else given)
    chosen = chosen or [None] * num_prompts
    unknown = sorted({a for a in chosen if a is not None and a not in names})
    if unknown:
        raise ValueError(f"adapter_id {unknown[0]!r} is not an adapter of model.model_config.pet_config.adapter_path "
                         f"(its adapters: {', '.join(names)}). Use one of those names.")
    base = sum(a is None for a in chosen)
    if base:
        logger.warning("%d of %d prompts have no adapter_id: they use the base model alone (S-LoRA's slot 0)", base,
                       num_prompts)
    return [(a, 0 if a is None else names.index(a) + 1) for a in chosen]


def read_prompts(input_data: str | list[str] | None) -> list[str]:
    """The prompts of ``input_data`` (texts, or one file of prompts); ValueError names the fix."""
    return read_prompt_items(input_data)[0]


def read_prompt_items(input_data: str | list[str] | None) -> tuple[list[str], list[str | None]]:
    """``read_prompts`` and each prompt's ``adapter_id`` (S-LoRA), which a .json / .jsonl object may carry."""
    if not input_data:
        raise ValueError("run_mode predict needs prompts: pass --predict_data 'text' ['text' ...] or "
                         "--predict_data prompts.txt (one prompt per line), or set input_data in the YAML.")
    texts = [input_data] if isinstance(input_data, str) else list(input_data)
    if len(texts) == 1 and os.path.isfile(texts[0]):
        return _prompts_file(texts[0])
    if len(texts) == 1 and _looks_like_a_file(texts[0]):
        raise ValueError(f"predict_data={texts[0]} looks like a prompts file but does not exist. Give the path of "
                         f"an existing file (one prompt per line, or .json / .jsonl), or quote the prompt text.")
    return texts, [None] * len(texts)


def _looks_like_a_file(text: str) -> bool:
    """One word (no white space) naming a folder and a prompts file suffix: a path, not a prompt."""
    return (not any(c.isspace() for c in text) and os.sep in text
            and text.lower().endswith((".txt", ".json", ".jsonl")))


def _prompts_file(path: str) -> tuple[list[str], list[str | None]]:
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    if path.endswith((".json", ".jsonl")):
        try:
            items = json.loads(raw) if path.endswith(".json") else [json.loads(l) for l in raw.splitlines() if l.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"predict_data={path} is not valid JSON ({exc}). Use a list of strings, or "
                             f"objects with a 'prompt' field.") from None
        prompts = [item.get("prompt") if isinstance(item, dict) else item for item in items]
        adapters = [item.get("adapter_id") if isinstance(item, dict) else None for item in items]
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise ValueError(f"predict_data={path}: item {bad[0]} is not a string or an object with a "
                             f"'prompt' string. Fix that item.")
        bad = [i for i, a in enumerate(adapters) if a is not None and not isinstance(a, str)]
        if bad:
            raise ValueError(f"predict_data={path}: item {bad[0]}'s adapter_id is not a string. Fix that item.")
    else:
        prompts = [line.replace("\\n", "\n") for line in raw.splitlines() if line.strip()]
        adapters = [None] * len(prompts)
    if not prompts:
        raise ValueError(f"predict_data={path} holds no prompts. Put one prompt per line.")
    return prompts, adapters


def encode_prompts(tokenizer: Tokenizer, prompts: list[str], generation: GenerationConfig,
                   template: Template | None = None, add_bos: bool | None = None) -> tuple[list[list[int]], list[int]]:
    """Each prompt's token ids and generation budget (``max_decode_length``); ValueError for a prompt
    that leaves no room or an invalid decoding setting, before any model is built. ``template``: each
    prompt as a user message in it; else the prompt as is, bos first when ``add_bos`` (None: the
    tokenizer's MindFormers default, ``tokenizer.add_bos_token``)."""
    if template is not None:
        ids = [template.prompt_ids(tokenizer, p) for p in prompts]
    else:
        bos = tokenizer.add_bos_token if add_bos is None else add_bos
        ids = [tokenizer.encode(p, add_bos=bos) for p in prompts]
    budgets = max_new_tokens_for(ids, generation.max_decode_length)
    check_generation(max_new_tokens=budgets, num_prompts=len(ids), **generation.sampling())
    return ids, budgets


def stop_ids(tokenizer: Tokenizer, template: Template | None) -> list[int]:
    """Ids that end an answer besides the model's eos: the template's end-of-turn tokens."""
    return [tokenizer.encode_batch([t])[0][0] for t in (template.stop_tokens if template else ())]


def predict(model, tokenizer: Tokenizer, prompts: list[str], ids: list[list[int]], budgets: list[int],
            generation: GenerationConfig, *, batch_size: int, output_dir: str, seed: int,
            is_main: bool = True, stop_ids: list[int] = (),
            adapters: list[tuple[str | None, int]] | None = None) -> list[dict]:
    """Generate for every prompt (``encode_prompts``' ids and budgets; eos and pad ids from the model's
    config, ``stop_ids`` also end a row); print each result and write ``predict_results.jsonl``
    (``is_main``: on several ranks every rank generates the same, rank 0 prints and writes)."""
    mc = model.config
    eos = [mc.eos_token_id] if isinstance(mc.eos_token_id, int) else list(mc.eos_token_id)
    eos += [i for i in stop_ids if i not in eos]
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    results, start = [], time.perf_counter()
    for i in range(0, len(ids), batch_size):
        if adapters is not None:  # S-LoRA: each row decoded with its own adapter
            set_adapter_ids(model, [slot for _, slot in adapters[i:i + batch_size]])
        outputs = generate(model, ids[i:i + batch_size], max_new_tokens=budgets[i:i + batch_size],
                           eos_token_id=eos, pad_token_id=mc.pad_token_id, generator=generator,
                           **generation.sampling())
        for j, (prompt, prompt_ids, out) in enumerate(zip(prompts[i:i + batch_size], ids[i:i + batch_size], outputs)):
            text = tokenizer.decode(out)
            results.append({"prompt": prompt, "input_ids": prompt_ids, "output_ids": out, "text": text})
            if adapters is not None:
                results[-1]["adapter_id"] = adapters[i + j][0]
            if is_main:
                print(f"prompt: {prompt}\noutput: {text}\n", flush=True)
    seconds = time.perf_counter() - start
    tokens = sum(len(r["output_ids"]) for r in results)
    path = os.path.join(output_dir, RESULTS)
    if is_main:
        with atomic_open(path, "w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    logger.info("Predicted %d prompts (%d new tokens, %.1f tokens/s) -> %s", len(results), tokens,
                tokens / max(seconds, 1e-9), path)
    return results
