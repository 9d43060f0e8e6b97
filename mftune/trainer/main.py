"""``run_finetune.py``'s body: one ``main()`` that reads top to bottom (STYLE #5).

config (completed from a Hugging Face directory: pretrained_model_dir) -> launch checks -> process group
-> output dir -> data -> model (PET, parallelize, weights) -> optimizer -> resume -> loop -> save -> report.
``train`` and ``finetune`` apply pet_config when present (LoRA: only adapters train, as MindFormers does in
both) and train every parameter otherwise; ``eval`` and ``predict`` build the model the same way and run
``mftune.trainer.evaluate`` / ``mftune.trainer.predict``.
"""
from __future__ import annotations

import logging
import os
import random

import torch

from mftune.checkpoint.formats import reads_strategy, recognise
from mftune.config.cli import parse_cli
from mftune.config.load import save_config
from mftune.config.schema import MFConfig
from mftune.data.dataset import open_dataset
from mftune.data.loader import TrainData
from mftune.errors import ConfigError, TrainingError, UserError, report
from mftune.fileio import disk_full, inside, remove_stale_temporaries
from mftune.log import setup_logging
from mftune.models.config import LlamaConfig
from mftune.parallel.mesh import ParallelContext, env_world, init_distributed, layout_errors, seed_ranks, shutdown
from mftune.trainer.build import BuiltModel, build_model
from mftune.trainer.checkpointing import CheckpointMonitor
from mftune.trainer.evaluate import run_evaluation
from mftune.trainer.loop import LoopSettings, Position, TrainRun, train_loop
from mftune.trainer.monitor import LossMonitor, fresh_metrics_file, progress_bar, report_outputs
from mftune.trainer.optim import LossScaler, build_optimizer, build_schedule
from mftune.trainer.outputs import note_set_aside, run_outputs, set_aside_previous_run
from mftune.trainer.predict import run_predict
from mftune.trainer.pretrained import apply_pretrained_dir
from mftune.trainer.restart import restart_config
from mftune.trainer.resume import ResumePoint, check_steps_left, find_resume_point, restore, same_layout

logger = logging.getLogger("mftune")


def cli(argv: list[str] | None = None) -> int:
    """Entry point of run_finetune.py: parse, run, and turn user mistakes into exit status 2
    (training that cannot go on: 1), without a traceback (``mftune.errors``)."""
    setup_logging()  # so that what the config loader logs (ignored keys) is shown
    try:
        return main(parse_cli(argv))
    except TrainingError as exc:
        logger.error("%s", exc)
        return report("mftune", exc)
    except UserError as exc:
        return report("mftune", exc)
    except OSError as exc:  # a full disk outside the checkpoint writes (a log, metrics.jsonl); else a bug
        if not disk_full(exc):
            raise
        return report("mftune", exc)


def main(cfg: MFConfig) -> int:
    cfg = restart_config(cfg)  # a job the launcher restarted (--max_restarts) resumes from its last checkpoint
    training = cfg.run_mode in ("train", "finetune")
    point = find_resume_point(cfg.load_checkpoint, cfg.resume_training) if training and cfg.resume_training else None
    gpu = _default_device().type == "cuda"  # architecture, tokenizer, weights from a Hugging Face directory
    cfg = apply_pretrained_dir(cfg, point, gpu=gpu, bf16=gpu and torch.cuda.is_bf16_supported())
    _check_supported(cfg)
    model_config = LlamaConfig.from_dict(cfg.model.model_config)
    world = _check_launch(cfg, model_config)  # before any heavy work or collective
    ctx = init_distributed(cfg.parallel_config) if world else ParallelContext(device=_default_device())
    try:
        return _run(cfg, model_config, ctx, point)
    finally:
        shutdown()


def _run(cfg: MFConfig, model_config: LlamaConfig, ctx: ParallelContext, point: ResumePoint | None) -> int:
    output_dir = _prepare_output_dir(cfg, ctx)
    _seed_everything(cfg.seed)  # the same seed on every rank: replicated values stay identical
    if cfg.run_mode == "predict":
        run_predict(cfg, model_config, ctx, output_dir)
    elif cfg.run_mode == "eval":
        eval_data = _dataset(cfg, model_config, ctx, "eval_dataset")  # before the model: cheap checks first
        run_evaluation(build_model(cfg, model_config, ctx).model, eval_data, ctx, output_dir)
    else:
        _train(cfg, model_config, ctx, output_dir, point)
    return 0


def _train(cfg: MFConfig, model_config: LlamaConfig, ctx: ParallelContext, output_dir: str,
           point: ResumePoint | None) -> None:
    """run_mode train / finetune; ``point``: where a resumed run continues from."""
    data = _dataset(cfg, model_config, ctx)  # cheap checks first: no model is built for bad data
    eval_data = _dataset(cfg, model_config, ctx, "eval_dataset") if cfg.do_eval else None
    if eval_data:
        _warn_if_no_evaluation(cfg, data)
    if point is not None:
        _check_resume_point(cfg, point, data)
    built = build_model(cfg, model_config, ctx, point)
    if cfg.only_save_strategy:
        logger.info("only_save_strategy: strategy files written to %s; exiting", os.path.join(output_dir, "strategy"))
        return
    seed_ranks(cfg.seed, ctx)  # dropout: independent per data-parallel rank
    optimizer, schedule, scaler = _optimization(cfg, built, data)
    start = _resume(built, optimizer, scaler, ctx) if built.weights.resume else Position()
    # the saver picks its file prefix only once the run can start (a failed resume leaves no unused prefix)
    run = TrainRun(built.model, optimizer, scaler, schedule, data, _loss_monitor(cfg, data, ctx, output_dir), ctx,
                   _checkpoint_monitor(cfg, output_dir, ctx.rank), _checkpoint_metadata(cfg, built, ctx))
    if eval_data:
        run.evaluate = lambda step: _note_eval(run, step, run_evaluation(built.model, eval_data, ctx, output_dir, step))
    settings = LoopSettings.from_config(cfg)
    built.model.train()
    with progress_bar(cfg.runner_config.epochs * data.steps_per_epoch if ctx.is_main else 0) as progress:
        global_step = train_loop(run, settings, start, progress)
    if run.saver and run.saver.last_step != global_step and global_step > start.global_step:
        run.save(cfg.runner_config.epochs, data.steps_per_epoch, global_step)
    if ctx.is_main:
        report_outputs(output_dir, run.monitor.metrics_path, run.saver)


def _optimization(cfg: MFConfig, built: BuiltModel, data: TrainData) -> tuple:
    """(AdamW over the trainable parameters, the LR schedule, the loss scaler)."""
    schedule = build_schedule(cfg.lr_schedule, cfg.optimizer, data.steps_per_epoch, cfg.runner_config.epochs)
    try:
        optimizer = build_optimizer(built.model, cfg.optimizer, schedule(0),
                                    (built.pet_config or {}).get("lora_plus_lr_ratio"))
    except ValueError as exc:  # nothing left to train (freeze_include)
        raise UserError(str(exc)) from None
    return optimizer, schedule, LossScaler(cfg.runner_wrapper)


def _resume(built: BuiltModel, optimizer, scaler: LossScaler, ctx: ParallelContext) -> Position:
    """Trainable weights, optimizer state, loss scale and RNG from the resume point; returns where it stands."""
    point = built.weights.resume
    restore(built.model, optimizer, point, ctx.rank, same_layout=same_layout(point, _layout(ctx)))
    scaler.scale, scaler.good_steps = point.loss_scale, point.loss_scale_good_steps
    start = Position(point.epoch, point.step_in_epoch, point.global_step)
    logger.info("Resuming from %s: epoch %d, step %d (global step %d)", point.files[0], start.epoch,
                start.done_in_epoch, start.global_step)
    return start


def _loss_monitor(cfg: MFConfig, data: TrainData, ctx: ParallelContext, output_dir: str) -> LossMonitor:
    """The MFLossMonitor callback: MindFormers' log lines, metrics.jsonl on rank 0."""
    runner, loss_cb = cfg.runner_config, cfg.callback("MFLossMonitor")
    return LossMonitor(fresh_metrics_file(output_dir) if ctx.is_main else None, epochs=runner.epochs,
                       steps_per_epoch=data.steps_per_epoch, world_size=ctx.world_size, device=ctx.device,
                       sink_mode=runner.sink_mode, per_print_times=loss_cb.per_print_times if loss_cb else 1)


def _checkpoint_metadata(cfg: MFConfig, built: BuiltModel, ctx: ParallelContext) -> dict:
    """What every checkpoint's header records besides its tensors."""
    return {"model_config": {**built.model.config.to_dict(), "pet_config": built.pet_config},
            "extra_metadata": {"run_mode": cfg.run_mode, "pet_config": built.pet_config,
                               "base_checkpoint": built.weights.base_checkpoint, "layout": _layout(ctx)}}


def _note_eval(run: TrainRun, step: int, result: dict) -> None:
    if run.saver:
        run.saver.note_eval(step, result)


def _prepare_output_dir(cfg: MFConfig, ctx: ParallelContext) -> str:
    """output_dir created, this rank's log there, the resolved config written by rank 0, which also removes the
    temporary files a killed earlier save left there and in the checkpoint folder (``fileio.stale_temporaries``)."""
    output_dir = os.path.abspath(cfg.output_dir)
    try:
        os.makedirs(output_dir, exist_ok=True)  # an earlier run's files are moved to *.1, never overwritten:
        moved = set_aside_previous_run(output_dir, ctx.rank,  # rank 0 the shared ones, each rank its log
                                       run_outputs(cfg.run_mode, cfg.only_save_strategy) if ctx.is_main else [])
        setup_logging(output_dir, ctx.rank)
        note_set_aside(output_dir, moved)
        if ctx.is_main:
            _remove_stale_temporaries(cfg, output_dir)
            save_config(cfg, os.path.join(output_dir, "resolved_config.yaml"))
    except OSError as exc:
        raise UserError(f"output_dir={cfg.output_dir} cannot be written ({exc}). "
                        f"Pass a writable directory with --output_dir.") from None
    return output_dir


def _remove_stale_temporaries(cfg: MFConfig, output_dir: str) -> None:
    ckpt_cb = cfg.callback("CheckpointMonitor")
    folders = {output_dir, os.path.abspath(ckpt_cb.directory)} if ckpt_cb and ckpt_cb.directory else {output_dir}
    for folder in sorted(folders):
        removed = remove_stale_temporaries(folder)
        if removed:
            logger.warning("Removed %d temporary file(s) an interrupted earlier save left in %s: %s", len(removed),
                           folder, ", ".join(os.path.relpath(p, folder) for p in removed[:5]))


def _dataset(cfg: MFConfig, model_config: LlamaConfig, ctx: ParallelContext, which: str = "train_dataset") -> TrainData:
    return open_dataset(cfg, model_config, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, which=which)


def _warn_if_no_evaluation(cfg: MFConfig, data: TrainData) -> None:
    epochs = cfg.runner_config.epochs
    if not (0 < cfg.eval_step_interval <= epochs * data.steps_per_epoch or 0 < cfg.eval_epoch_interval <= epochs):
        logger.warning("do_eval=True but no evaluation falls within this run's %d epochs of %d steps "
                       "(eval_step_interval=%d, eval_epoch_interval=%d): set one of them lower",
                       epochs, data.steps_per_epoch, cfg.eval_step_interval, cfg.eval_epoch_interval)


def _check_resume_point(cfg: MFConfig, point: ResumePoint, data: TrainData) -> None:
    """The checkpoint to resume from (``resume_training``) against this run's global batch and length."""
    if point.global_batch_size != data.global_batch_size:
        raise UserError(f"resume_training: the checkpoint was saved with a global batch of "
                        f"{point.global_batch_size} sequences, this run has {data.global_batch_size} "
                        f"(batch_size x data_parallel x gradient_accumulation_steps). Keep the global batch.")
    check_steps_left(point, cfg.runner_config.epochs, data.steps_per_epoch)


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
    read_with_strategy = os.path.isdir(cfg.load_checkpoint or "") and reads_strategy(recognise(cfg.load_checkpoint))
    if cfg.src_strategy_path_or_dir and not cfg.auto_trans_ckpt and not read_with_strategy:
        logger.warning("src_strategy_path_or_dir=%s has no effect without auto_trans_ckpt True",
                       cfg.src_strategy_path_or_dir)
    for key, on in (("parallel.enable_parallel_optimizer", cfg.parallel.enable_parallel_optimizer),
                    ("parallel_config.use_seq_parallel", cfg.parallel_config.use_seq_parallel)):
        if on and not cfg.use_parallel:
            logger.warning("%s=True has no effect on one process (use_parallel False)", key)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _layout(ctx: ParallelContext) -> dict:
    """What a checkpoint records of the layout that saved it (RNG states are per rank of it)."""
    return {"world_size": ctx.world_size, "data_parallel": ctx.dp_size, "model_parallel": ctx.tp_size}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
