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

from mftune.config.schema import MFConfig
from mftune.data.templates import RAW, Template, get_template
from mftune.data.tokenizer_kinds import Tokenizer, build_tokenizer, stop_ids_of
from mftune.errors import UserError
from mftune.generation import GenerationConfig, check_generation, generate, max_new_tokens_for
from mftune.models.config import LlamaConfig
from mftune.parallel.mesh import ParallelContext
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
        tokenizer, prompts = build_tokenizer(tok_cfg.vocab_file, tok_cfg.type), read_prompts(cfg.input_data)
        template = None if tok_cfg.chat_template in (None, RAW) else \
            get_template(tok_cfg.chat_template, tokenizer, "processor.tokenizer.chat_template")
        generation = GenerationConfig.from_model_config(model_config)
        ids, budgets = encode_prompts(tokenizer, prompts, generation, template, tok_cfg.add_bos_token)
    except (ValueError, OSError) as exc:  # also generation settings, prompts longer than max_decode_length
        raise UserError(str(exc)) from None
    model = build_model(cfg, model_config, ctx).model
    predict(model, tokenizer, prompts, ids, budgets, generation,
            batch_size=cfg.predict_batch_size or model_config.batch_size, output_dir=output_dir, seed=cfg.seed,
            is_main=ctx.is_main, stop_ids=stop_ids(tokenizer, template) + stop_ids_of(tokenizer))


def read_prompts(input_data: str | list[str] | None) -> list[str]:
    """The prompts of ``input_data`` (texts, or one file of prompts); ValueError names the fix."""
    if not input_data:
        raise ValueError("run_mode predict needs prompts: pass --predict_data 'text' ['text' ...] or "
                         "--predict_data prompts.txt (one prompt per line), or set input_data in the YAML.")
    texts = [input_data] if isinstance(input_data, str) else list(input_data)
    if len(texts) == 1 and os.path.isfile(texts[0]):
        return _prompts_file(texts[0])
    if len(texts) == 1 and _looks_like_a_file(texts[0]):
        raise ValueError(f"predict_data={texts[0]} looks like a prompts file but does not exist. Give the path of "
                         f"an existing file (one prompt per line, or .json / .jsonl), or quote the prompt text.")
    return texts


def _looks_like_a_file(text: str) -> bool:
    """One word (no white space) naming a folder and a prompts file suffix: a path, not a prompt."""
    return (not any(c.isspace() for c in text) and os.sep in text
            and text.lower().endswith((".txt", ".json", ".jsonl")))


def _prompts_file(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    if path.endswith((".json", ".jsonl")):
        try:
            items = json.loads(raw) if path.endswith(".json") else [json.loads(l) for l in raw.splitlines() if l.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"predict_data={path} is not valid JSON ({exc}). Use a list of strings, or "
                             f"objects with a 'prompt' field.") from None
        prompts = [item.get("prompt") if isinstance(item, dict) else item for item in items]
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise ValueError(f"predict_data={path}: item {bad[0]} is not a string or an object with a "
                             f"'prompt' string. Fix that item.")
    else:
        prompts = [line.replace("\\n", "\n") for line in raw.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"predict_data={path} holds no prompts. Put one prompt per line.")
    return prompts


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
            is_main: bool = True, stop_ids: list[int] = ()) -> list[dict]:
    """Generate for every prompt (``encode_prompts``' ids and budgets; eos and pad ids from the model's
    config, ``stop_ids`` also end a row); print each result and write ``predict_results.jsonl``
    (``is_main``: on several ranks every rank generates the same, rank 0 prints and writes)."""
    mc = model.config
    eos = [mc.eos_token_id] if isinstance(mc.eos_token_id, int) else list(mc.eos_token_id)
    eos += [i for i in stop_ids if i not in eos]
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    results, start = [], time.perf_counter()
    for i in range(0, len(ids), batch_size):
        outputs = generate(model, ids[i:i + batch_size], max_new_tokens=budgets[i:i + batch_size],
                           eos_token_id=eos, pad_token_id=mc.pad_token_id, generator=generator,
                           **generation.sampling())
        for prompt, prompt_ids, out in zip(prompts[i:i + batch_size], ids[i:i + batch_size], outputs):
            text = tokenizer.decode(out)
            results.append({"prompt": prompt, "input_ids": prompt_ids, "output_ids": out, "text": text})
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
