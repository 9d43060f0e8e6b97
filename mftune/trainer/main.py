"""``run_finetune.py``'s body: one ``main()`` that reads top to bottom (STYLE #5).

config -> model -> PET -> load -> data -> optimizer -> loop -> save. run_mode ``train`` trains
every parameter (pet_config is not applied); ``finetune`` applies pet_config when present
(LoRA: only adapters train) and is a full-parameter fine-tune otherwise.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel

from mftune.checkpoint.load import fingerprint, load_checkpoint
from mftune.errors import CheckpointError
from mftune.checkpoint.formats.distributed import distributed_entries
from mftune.checkpoint.transform import auto_transform, inside
from mftune.config import ConfigError, MFConfig, save_config
from mftune.data.loader import TrainData
from mftune.data.preprocess import DataError
from mftune.data.raw import cached_dataset, is_raw
from mftune.data.tokenizer import LlamaTokenizer
from mftune.log import setup_logging
from mftune.models.llama import LlamaConfig, LlamaForCausalLM, to_dtype
from mftune.parallel import parallelize
from mftune.parallel.data_parallel import all_reduce_grads, clip_grad_norm_, settle_grads
from mftune.parallel.layout import fill_from_full, local
from mftune.parallel.mesh import (ParallelContext, env_world, init_distributed, layout_errors, seed_ranks,
                                  shutdown)
from mftune.parallel.recompute import apply_recompute
from mftune.pet import get_pet_model, init_lora_weights, trainable_summary
from mftune.trainer.checkpointing import CheckpointMonitor, save_strategy
from mftune.trainer.monitor import LossMonitor, StepStats, fresh_metrics_file, progress_bar, report
from mftune.trainer.evaluate import batch_loss, evaluate
from mftune.trainer.optim import LossScaler, build_optimizer, build_schedule
from mftune.trainer.predict import encode_prompts, predict, read_prompts
from mftune.trainer.resume import ResumePoint, find_resume_point, load_base, restore, same_layout

logger = logging.getLogger("mftune")


MAX_NONFINITE_STEPS = 5  # consecutive skipped steps (static loss scale) before training stops


class UserError(Exception):
    """A mistake in the user's input, reported as one message without a traceback (exit 2)."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); reported without a traceback (exit 1)."""


def cli(argv: list[str] | None = None) -> int:
    """Entry point of run_finetune.py: parse, run, and turn user mistakes into exit status 2."""
    from mftune.cli import format_errors, parse_cli

    setup_logging()  # so that what the config loader logs (ignored keys) is shown
    try:
        cfg = parse_cli(argv)
        return main(cfg)
    except ConfigError as exc:
        print(format_errors(exc.errors, exc.path), file=sys.stderr)
        return 2
    except (UserError, CheckpointError) as exc:
        print(f"mftune: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        logger.error("%s", exc)
        print(f"mftune: training stopped: {exc}", file=sys.stderr)
        return 1


def main(cfg: MFConfig) -> int:
    _check_supported(cfg)
    model_config = LlamaConfig.from_dict(cfg.model.model_config)
    world = _check_launch(cfg, model_config)  # before any heavy work or collective
    dist_info = init_distributed(cfg.parallel_config) if world else ParallelContext(device=_default_device())
    try:
        return _run(cfg, model_config, dist_info)
    finally:
        shutdown()


def _run(cfg: MFConfig, model_config: LlamaConfig, dist_info: ParallelContext) -> int:
    output_dir = os.path.abspath(cfg.output_dir)
    try:
        os.makedirs(output_dir, exist_ok=True)
        setup_logging(output_dir, dist_info.rank)
        if dist_info.is_main:
            save_config(cfg, os.path.join(output_dir, "resolved_config.yaml"))
    except OSError as exc:
        raise UserError(f"output_dir={cfg.output_dir} cannot be written ({exc}). "
                        f"Pass a writable directory with --output_dir.") from None
    _seed_everything(cfg.seed)  # the same seed on every rank: replicated values stay identical
    if cfg.run_mode == "predict":
        return _predict(cfg, model_config, dist_info, output_dir)
    if cfg.run_mode == "eval":
        eval_data = build_data(cfg, model_config, dist_info, "eval_dataset")  # before the model: cheap checks
        model, _, _ = build_model(cfg, model_config, dist_info)
        _evaluate(cfg, model, eval_data, dist_info, output_dir)
        return 0
    device = dist_info.device

    data = build_data(cfg, model_config, dist_info)  # cheap checks first: no model is built for bad data
    eval_data = build_data(cfg, model_config, dist_info, "eval_dataset") if cfg.do_eval else None
    if eval_data and not (0 < cfg.eval_step_interval <= cfg.runner_config.epochs * data.steps_per_epoch
                          or 0 < cfg.eval_epoch_interval <= cfg.runner_config.epochs):
        logger.warning("do_eval=True but no evaluation falls within this run's %d epochs of %d steps "
                       "(eval_step_interval=%d, eval_epoch_interval=%d): set one of them lower",
                       cfg.runner_config.epochs, data.steps_per_epoch, cfg.eval_step_interval,
                       cfg.eval_epoch_interval)
    point = _resume_point(cfg, data)
    model, pet_config, base_info = build_model(cfg, model_config, dist_info, point)
    if cfg.only_save_strategy:
        logger.info("only_save_strategy: strategy files written to %s; exiting",
                    os.path.join(output_dir, "strategy"))
        return 0
    seed_ranks(cfg.seed, dist_info)  # dropout: independent per data-parallel rank
    runner = cfg.runner_config
    schedule = build_schedule(cfg.lr_schedule, cfg.optimizer, data.steps_per_epoch, runner.epochs)
    try:
        optimizer = build_optimizer(model, cfg.optimizer, schedule(0))
    except ValueError as exc:  # nothing left to train (freeze_include)
        raise UserError(str(exc)) from None
    scaler = LossScaler(cfg.runner_wrapper)
    start = (1, 0, 0)  # epoch, steps done in it, global step
    if point:
        restore(model, optimizer, point, dist_info.rank, same_layout=same_layout(point, _layout(dist_info)))
        scaler.scale, scaler.good_steps = point.loss_scale, point.loss_scale_good_steps
        start = (point.epoch, point.step_in_epoch, point.global_step)
        logger.info("Resuming from %s: epoch %d, step %d (global step %d)", point.files[0], *start)
    metrics_path = fresh_metrics_file(output_dir) if dist_info.is_main else None
    loss_cb = cfg.callback("MFLossMonitor")
    monitor = LossMonitor(metrics_path, epochs=runner.epochs, steps_per_epoch=data.steps_per_epoch,
                          world_size=dist_info.world_size, device=device, sink_mode=runner.sink_mode,
                          per_print_times=loss_cb.per_print_times if loss_cb else 1)
    saver = _checkpoint_monitor(cfg, output_dir, dist_info.rank)
    save = functools.partial(
        _save, saver, model, optimizer, scaler, data.global_batch_size,
        model_config=_saved_model_config(model.config, pet_config),
        extra_metadata={"run_mode": cfg.run_mode, "pet_config": pet_config,
                        "base_checkpoint": base_info, "layout": _layout(dist_info)})

    def run_eval(global_step: int) -> None:
        result = _evaluate(cfg, model, eval_data, dist_info, output_dir, step=global_step)
        if saver:
            saver.note_eval(global_step, result)

    model.train()
    step = functools.partial(_train_step, model=model, optimizer=optimizer, scaler=scaler, cfg=cfg,
                             dist_info=dist_info)
    total_steps = runner.epochs * data.steps_per_epoch
    with progress_bar(total_steps if dist_info.is_main else 0) as progress:
        global_step = train_loop(step, schedule, data, cfg, device, monitor, progress, scaler,
                                 save if saver else None, start, run_eval if eval_data else None)
    if saver and saver.last_step != global_step and global_step > start[2]:
        save(epoch=runner.epochs, step_in_epoch=data.steps_per_epoch, global_step=global_step)
    if dist_info.is_main:
        report(output_dir, metrics_path, saver)
    return 0


def _predict(cfg: MFConfig, model_config: LlamaConfig, dist_info: ParallelContext, output_dir: str) -> int:
    """``run_mode predict`` (mftune.trainer.predict): the model as fine-tuned (pet_config applied,
    load_checkpoint loaded), the prompts of ``input_data``, results in predict_results.jsonl."""
    vocab_file = cfg.processor.tokenizer.vocab_file
    if not vocab_file:
        raise UserError("processor.tokenizer.vocab_file is empty: run_mode predict needs the tokenizer "
                        "(the tokenizer.model file). Set it in the YAML or with "
                        "--processor.tokenizer.vocab_file PATH.")
    try:  # every input check before the model is built
        tokenizer, prompts = LlamaTokenizer(vocab_file), read_prompts(cfg.input_data)
        ids, budgets = encode_prompts(tokenizer, prompts, model_config)
    except (ValueError, OSError) as exc:  # also generation settings, prompts longer than max_decode_length
        raise UserError(str(exc)) from None
    model, _, _ = build_model(cfg, model_config, dist_info)
    predict(model, tokenizer, prompts, ids, budgets, model.config,
            batch_size=cfg.predict_batch_size or model_config.batch_size, output_dir=output_dir, seed=cfg.seed,
            is_main=dist_info.is_main)
    return 0


def _resume_point(cfg: MFConfig, data: TrainData) -> ResumePoint | None:
    """The checkpoint to resume from (``resume_training``), checked against this run's global batch."""
    if not cfg.resume_training:
        return None
    point = find_resume_point(cfg.load_checkpoint, cfg.resume_training)
    if point.global_batch_size != data.global_batch_size:
        raise UserError(f"resume_training: the checkpoint was saved with a global batch of "
                        f"{point.global_batch_size} sequences, this run has {data.global_batch_size} "
                        f"(batch_size x data_parallel x gradient_accumulation_steps). Keep the global batch.")
    return point


def _checkpoint_monitor(cfg: MFConfig, output_dir: str, rank: int) -> CheckpointMonitor | None:
    """The CheckpointMonitor callback's saver; its folder is created now, so that a bad path fails
    before training rather than at the first save."""
    ckpt_cb = cfg.callback("CheckpointMonitor")
    if not ckpt_cb:
        return None
    try:
        return CheckpointMonitor(ckpt_cb.directory or output_dir, ckpt_cb.prefix, rank=rank,
                                 keep_checkpoint_max=ckpt_cb.keep_checkpoint_max,
                                 save_network_params=ckpt_cb.save_network_params,
                                 save_trainable_params=ckpt_cb.save_trainable_params)
    except OSError as exc:
        raise UserError(f"CheckpointMonitor directory={ckpt_cb.directory or output_dir} cannot be "
                        f"written ({exc}). Use a writable directory.") from None


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_launch(cfg: MFConfig, model_config: LlamaConfig) -> tuple[int, int, int] | None:
    """torchrun's (rank, world_size, local_rank) for a parallel run, None for one process; every
    layout problem is reported at once, before the process group or the model exist."""
    world = env_world()
    if not cfg.use_parallel:
        if world and world[1] > 1:
            raise UserError(
                f"use_parallel=False is invalid here: the launcher started {world[1]} processes, which "
                f"would each train the whole model separately. Pass --use_parallel True (and set "
                f"parallel_config so that data_parallel x model_parallel = {world[1]}), or run "
                f"python run_finetune.py ... without the launcher.")
        return None
    errors = layout_errors(cfg.parallel_config, model_config, world)
    if errors:
        raise ConfigError(errors)
    return world


def _check_supported(cfg: MFConfig) -> None:
    """Refuse, before any heavy work, combinations that cannot work (each with its fix)."""
    if cfg.auto_trans_ckpt and not cfg.load_checkpoint and not cfg.only_save_strategy:
        raise UserError("auto_trans_ckpt=True needs a checkpoint to transform: pass --load_checkpoint "
                        "(a complete or distributed checkpoint), or drop --auto_trans_ckpt.")
    own = os.path.join(os.path.abspath(cfg.output_dir), "strategy")
    if cfg.src_strategy_path_or_dir and inside(cfg.src_strategy_path_or_dir, own):
        raise UserError(f"src_strategy_path_or_dir={cfg.src_strategy_path_or_dir} is inside this run's own "
                        f"strategy folder {own}, which the run rewrites with its layout at start-up. Copy the "
                        f"source run's strategy elsewhere and point there, or leave it empty (mftune's rank "
                        f"files record their own layout).")
    if cfg.src_strategy_path_or_dir and not cfg.auto_trans_ckpt:
        logger.warning("src_strategy_path_or_dir=%s has no effect without auto_trans_ckpt True",
                       cfg.src_strategy_path_or_dir)
    for key, on in (("parallel.enable_parallel_optimizer", cfg.parallel.enable_parallel_optimizer),
                    ("parallel_config.use_seq_parallel", cfg.parallel_config.use_seq_parallel)):
        if on and not cfg.use_parallel:
            logger.warning("%s=True has no effect on one process (use_parallel False)", key)


def build_model(cfg: MFConfig, model_config: LlamaConfig, dist_info: ParallelContext,
                point: ResumePoint | None = None) -> tuple[LlamaForCausalLM, dict | None, dict]:
    """Build on the meta device, apply PET (finetune only), parallelize, materialise, then fill the
    weights from the checkpoint (each rank reads only its block) or initialise them (drawn as one
    process would). Trainable parameters are float32 (master weights); frozen ones stay in
    param_init_type. Returns the model, the applied pet_config (None for full-parameter training)
    and the loaded checkpoint's path/fingerprint."""
    pet_config = model_config.pet_config if cfg.run_mode != "train" else None  # finetune, predict
    if cfg.run_mode == "train" and model_config.pet_config:
        logger.info("run_mode train trains all parameters: pet_config is not applied "
                    "(use --run_mode finetune for LoRA)")
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(model_config)
        if pet_config:
            get_pet_model(model, pet_config)
    except ValueError as exc:  # e.g. target_modules matches no layer
        raise UserError(str(exc)) from None
    for param in model.parameters():  # on meta: free, and before FSDP2 records dtypes
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    recompute = cfg.recompute_config.recompute or cfg.recompute_config.select_recompute
    seq_parallel = cfg.parallel_config.use_seq_parallel
    if seq_parallel and cfg.run_mode == "predict" and dist_info.tp_size > 1:
        logger.info("run_mode predict: use_seq_parallel is off (decoding feeds one token at a time)")
        seq_parallel = False
    if dist_info.mesh is not None:
        parallelize(model, dist_info, vocab_emb_dp=cfg.parallel_config.vocab_emb_dp,
                    use_seq_parallel=seq_parallel,
                    parallel_optimizer=cfg.parallel.enable_parallel_optimizer, recompute=recompute,
                    compute_dtype=to_dtype(model_config.compute_dtype))
    elif recompute:
        logger.info("Recompute: activation checkpointing of %d decoder layers",
                    apply_recompute(model.model.layers))
    if cfg.run_mode in ("train", "finetune") or cfg.auto_trans_ckpt or cfg.only_save_strategy:
        save_strategy(os.path.join(os.path.abspath(cfg.output_dir), "strategy"), model, dist_info,
                      parallel_config=dataclasses.asdict(cfg.parallel_config),
                      enable_parallel_optimizer=cfg.parallel.enable_parallel_optimizer)
    if cfg.only_save_strategy:
        return model, pet_config, {}
    model.to_empty(device=dist_info.device)
    base_info = {}
    transform = functools.partial(auto_transform, output_dir=os.path.abspath(cfg.output_dir),
                                  rank=dist_info.rank, world_size=dist_info.world_size,
                                  process_num=cfg.transform_process_num,
                                  src_strategy=cfg.src_strategy_path_or_dir)
    if point:  # frozen weights from the run's base; trained ones come with the optimizer state
        model.tie_weights()
        init_lora_weights(model, fill_from_full)
        base_info = load_base(model, point) or point.base_checkpoint
        if cfg.auto_trans_ckpt:  # counters and RNG states still come from the saved files
            point.entries = distributed_entries(*transform(cfg.load_checkpoint, files=point.files))
    elif cfg.load_checkpoint:
        model.tie_weights()
        init_lora_weights(model, fill_from_full)
        # every base tensor must be in the checkpoint (or in the base its header records, for a
        # LoRA-only one); auto_trans_ckpt writes it in this layout first
        report = load_checkpoint(model, transform(cfg.load_checkpoint)[0] if cfg.auto_trans_ckpt
                                 else cfg.load_checkpoint)
        base_info = report.get("base") or {"path": os.path.abspath(cfg.load_checkpoint),
                                           "fingerprint": fingerprint(cfg.load_checkpoint)}
        if report["fresh_lora"] and cfg.run_mode in ("eval", "predict"):
            logger.warning("%d LoRA tensors are not in load_checkpoint=%s: they start fresh (B = 0), so "
                           "the %s uses the base model alone", len(report["fresh_lora"]), cfg.load_checkpoint,
                           cfg.run_mode)
    else:
        model.init_weights(fill_from_full)
        if cfg.run_mode != "train":
            logger.warning("load_checkpoint is empty: %s with randomly initialised weights", cfg.run_mode)
    if not pet_config:  # get_pet_model logs it for PET runs
        logger.info(trainable_summary(model))
    return model, pet_config, base_info


def build_data(cfg: MFConfig, model_config: LlamaConfig, dist_info: ParallelContext,
               which: str = "train_dataset") -> TrainData:
    """This data-parallel rank's part of every global batch (batch_size x data_parallel x
    gradient_accumulation_steps sequences), checked against the model's seq_length. ``eval_dataset``:
    in order, ``eval_dataset.batch_size`` records per rank and step, every record once
    (``evaluate.eval_batches``)."""
    runner, dataset = cfg.runner_config, getattr(cfg, which)
    loader_cfg, train = dataset.data_loader, which == "train_dataset"
    if not loader_cfg.dataset_dir:
        raise UserError(f"{which}.data_loader.dataset_dir is empty. Pass --{which}_dir DIR "
                        f"(a directory written by scripts/llama_preprocess.py, or a raw .json / .jsonl / "
                        f".parquet file with processor.tokenizer.vocab_file set).")
    dataset_dir = loader_cfg.dataset_dir
    if is_raw(dataset_dir):  # tokenized on first use (rank 0), cached in output_dir, reused afterwards
        dataset_dir = _raw_dataset(cfg, model_config, dist_info, dataset_dir, loader_cfg.packing,
                                   dataset.num_parallel_workers)
    elif loader_cfg.packing:
        raise UserError(f"{which}.data_loader.packing=True packs raw data files, but dataset_dir={dataset_dir} "
                        f"is a tokenized directory, read as written. Pack it with scripts/llama_preprocess.py "
                        f"--packing, or set packing to False.")
    try:
        data = TrainData(dataset_dir, micro_batch_size=runner.batch_size if train else dataset.batch_size,
                         grad_accum=runner.gradient_accumulation_steps if train else 1,
                         dp_rank=dist_info.dp_rank, dp_size=dist_info.dp_size,
                         shuffle=loader_cfg.shuffle if train else False, seed=cfg.seed,
                         drop_remainder=dataset.drop_remainder if train else False,
                         num_samples=loader_cfg.num_samples)
    except ValueError as exc:
        raise UserError(f"{which}: {exc}") from None
    if data.record_length != model_config.seq_length + 1:
        raise UserError(
            f"model.model_config.seq_length={model_config.seq_length} but the records in "
            f"{loader_cfg.dataset_dir} hold {data.record_length} tokens (seq_length "
            f"{data.record_length - 1} + 1). Set seq_length to {data.record_length - 1} or "
            f"re-run scripts/llama_preprocess.py with --seq_length {model_config.seq_length}.")
    vocab, ignore = model_config.vocab_size, model_config.ignore_token_id
    for column, exclude in (("input_ids", None), ("labels", ignore)):
        found = data.value_range(column, exclude)
        if found and (found[0] < 0 or found[1] >= vocab):
            raise UserError(
                f"model.model_config.vocab_size={vocab} but the {column} in {loader_cfg.dataset_dir} "
                f"hold values in [{found[0]}, {found[1]}]"
                + (f" besides ignore_token_id={ignore}" if exclude is not None else "") +
                f". Set vocab_size to the tokenizer's vocabulary size (at least {found[1] + 1}), "
                f"ignore_token_id to the label of masked positions, or re-tokenize.")
    if train:
        logger.info("Dataset %s: %d records, global batch %d, %d steps per epoch, %d epochs",
                    loader_cfg.dataset_dir, data.num_records, data.global_batch_size,
                    data.steps_per_epoch, runner.epochs)
    else:
        logger.info("Eval dataset %s: %d records", loader_cfg.dataset_dir, data.num_records)
    return data


def _raw_dataset(cfg: MFConfig, model_config: LlamaConfig, dist_info: ParallelContext, path: str,
                 packing: bool, num_proc: int) -> str:
    """The tokenized cache of a raw data file (mftune.data.raw): built by rank 0, read by all."""
    args = (path, cfg.processor.tokenizer.vocab_file, model_config.seq_length,
            os.path.join(os.path.abspath(cfg.output_dir), "dataset_cache"), packing, num_proc)
    def build() -> str:
        try:
            return cached_dataset(*args)
        except (DataError, OSError) as exc:  # the same error on every rank
            raise UserError(f"dataset_dir={path}: {exc}") from None

    if not dist.is_initialized():
        return build()
    if dist_info.is_main:
        try:
            return build()
        finally:
            dist.barrier()  # the others read what rank 0 wrote (or fail as it did)
    dist.barrier()
    return build()


def _evaluate(cfg: MFConfig, model, data: TrainData, dist_info: ParallelContext, output_dir: str,
              step: int | None = None) -> dict:
    """Perplexity of ``model`` on ``data`` (mftune.trainer.evaluate); logged, and written by rank 0 to
    eval_results.json (run_mode eval) or appended to eval_metrics.jsonl (do_eval, with the step)."""
    try:
        result = evaluate(model, data, device=dist_info.device, dp_group=dist_info.dp_group,
                          vocab_sharded=_vocab_sharded(cfg, dist_info))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    logger.info("Eval result%s: loss: %.6f, PPL: %.6f (%d tokens, %d records)",
                "" if step is None else f" at step {step}", result["loss"], result["ppl"], result["tokens"],
                result["records"])
    if dist_info.is_main:
        if step is None:
            with open(os.path.join(output_dir, "eval_results.json"), "w") as f:
                json.dump(result, f, indent=1)
        else:
            with open(os.path.join(output_dir, "eval_metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, **result}) + "\n")
    return result


def train_loop(step, schedule, data, cfg, device, monitor, progress, scaler, save,
               start: tuple[int, int, int] = (1, 0, 0), run_eval=None) -> int:
    """All epochs from ``start`` (epoch, steps already done in it, global step); returns the
    global step reached. ``step(micro_batches, lr)`` runs one optimizer step; ``save`` (or None)
    is called every ``save_checkpoint_steps``; ``run_eval(global_step)`` (or None) every
    ``eval_step_interval`` steps and at the end of every ``eval_epoch_interval``-th epoch."""
    ckpt_cb = cfg.callback("CheckpointMonitor")
    first_epoch, done, global_step = start
    nonfinite, evaluated = 0, False
    progress.update(global_step)
    for epoch in range(first_epoch, cfg.runner_config.epochs + 1):
        skip = done if epoch == first_epoch else 0
        for step_in_epoch, micro_batches in enumerate(data.epoch(epoch - 1, start_step=skip), start=skip + 1):
            start = time.perf_counter()
            stats = step(micro_batches, schedule(global_step))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            global_step += 1
            monitor(StepStats(step=global_step, epoch=epoch, step_in_epoch=step_in_epoch,
                              step_seconds=time.perf_counter() - start,
                              tokens=data.global_batch_size * (data.record_length - 1),
                              samples=data.global_batch_size, **stats))
            progress.update(1)
            stuck = not scaler.dynamic or scaler.scale <= 1.0  # a dynamic scale cannot go lower
            nonfinite = nonfinite + 1 if stats["overflow"] and stuck else 0
            if nonfinite >= MAX_NONFINITE_STEPS:
                raise TrainingError(
                    f"the loss or gradients were not finite for {nonfinite} consecutive steps "
                    f"(last: step {global_step}, loss {stats['loss']}); the updates were skipped. "
                    f"Lower the learning rate, use compute_dtype bfloat16 instead of float16, or use "
                    f"a DynamicLossScaleUpdateCell scale_sense.")
            if save and global_step % ckpt_cb.save_checkpoint_steps == 0:
                save(epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step)
            evaluated = bool(run_eval) and cfg.eval_step_interval > 0 and global_step % cfg.eval_step_interval == 0
            if evaluated:
                run_eval(global_step)
        if run_eval and not evaluated and cfg.eval_epoch_interval > 0 and epoch % cfg.eval_epoch_interval == 0:
            run_eval(global_step)
    if nonfinite:
        raise TrainingError(f"the last {nonfinite} step(s) had a non-finite loss or gradients and were "
                            f"skipped; no final checkpoint was written. Check the model_config values, "
                            f"lower the learning rate, or use compute_dtype bfloat16.")
    return global_step


def _train_step(micro_batches, lr, *, model, optimizer, scaler, cfg, dist_info: ParallelContext) -> dict:
    """One optimizer step over this rank's micro-batches of a global batch.

    The loss is the mean over every supervised token of the global batch (token-weighted, counted
    over all data-parallel ranks), and gradients are summed over data parallel, so the result does
    not depend on how the batch is split into micro-batches or ranks. Every rank computes the same
    global norm, so all agree on clipping and on skipping a non-finite step.
    """
    device, ignore = dist_info.device, model.config.ignore_token_id
    trainable = [p for p in model.parameters() if p.requires_grad]
    dp_group = dist_info.dp_group
    fsdp = hasattr(model, "set_requires_gradient_sync")
    pad = model.config.pad_token_id
    counts = torch.tensor([[int((mb["labels"][:, 1:] != ignore).sum()), int((mb["input_ids"][:, :-1] != pad).sum())]
                           for mb in micro_batches], dtype=torch.float64, device=device).sum(0)
    if dp_group is not None:  # supervised tokens, non-pad input tokens of the global batch
        dist.all_reduce(counts, group=dp_group)
    denom = max(float(counts[0]), 1.0)
    vocab_sharded = _vocab_sharded(cfg, dist_info)
    total = torch.zeros((), device=device)
    for k, mb in enumerate(micro_batches):
        if fsdp:  # reduce-scatter once, after the last micro-batch
            model.set_requires_gradient_sync(k == len(micro_batches) - 1)
        with loss_parallel() if vocab_sharded else contextlib.nullcontext():
            loss_sum, _ = batch_loss(model, mb, device)
            loss_sum = local(loss_sum)  # a replicated DTensor under loss_parallel
            (loss_sum * (scaler.scale / denom)).backward()
        total += loss_sum.detach()  # no host sync per micro-batch
    if dp_group is not None:
        if not fsdp:
            all_reduce_grads(trainable, dp_group)
        dist.all_reduce(total, group=dp_group)
    settle_grads(trainable)
    scaler.unscale_(trainable)
    wrapper = cfg.runner_wrapper
    norm = clip_grad_norm_(trainable, wrapper.max_grad_norm if wrapper.use_clip_grad else math.inf)
    overflow = not math.isfinite(norm)
    if not overflow:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss_scale = scaler.scale
    scaler.update(overflow)
    return {"loss": float(total) / denom, "lr": lr, "global_norm": norm, "overflow": overflow,
            "loss_scale": loss_scale, "real_tokens": int(counts[1])}


def _save(saver, model, optimizer, scaler, global_batch_size, *, epoch, step_in_epoch, global_step,
          model_config, extra_metadata) -> None:
    saver.save(model, optimizer, epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step,
               loss_scale=scaler.scale, loss_scale_good_steps=scaler.good_steps,
               global_batch_size=global_batch_size,
               model_config=model_config, extra_metadata=extra_metadata)


def _saved_model_config(model_config: LlamaConfig, pet_config: dict | None) -> dict:
    d = model_config.to_dict()
    d["pet_config"] = pet_config
    return d


def _vocab_sharded(cfg: MFConfig, ctx: ParallelContext) -> bool:
    """Whether the logits are split over the vocabulary (then the loss runs under loss_parallel)."""
    return ctx.tp_size > 1 and not cfg.parallel_config.vocab_emb_dp


def _layout(ctx: ParallelContext) -> dict:
    """What a checkpoint records of the layout that saved it (RNG states are per rank of it)."""
    return {"world_size": ctx.world_size, "data_parallel": ctx.dp_size, "model_parallel": ctx.tp_size}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
