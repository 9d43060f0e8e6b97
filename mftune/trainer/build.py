"""The model of a run: built on the meta device, PET applied, parallelized, materialised, weights in.

Trainable parameters are float32 (master weights; frozen ones keep ``param_init_type``), set while
still on meta (free) and before FSDP2 records dtypes. Every rank then holds only its blocks, reads
only those from the checkpoint, or draws them as one process would (``mftune.parallel.layout``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch

from mftune.checkpoint.adapter_config import effective_pet_config
from mftune.checkpoint.recorded_pet import checkpoint_pet_config
from mftune.config.schema import MFConfig
from mftune.errors import UserError
from mftune.models.config import LlamaConfig
from mftune.models.llama import LlamaForCausalLM
from mftune.parallel import parallelize
from mftune.parallel.mesh import ParallelContext
from mftune.parallel.recompute import plan as recompute_plan
from mftune.checkpoint import slora_adapters
from mftune.checkpoint.formats import peft_adapter, peft_prefix
from mftune.checkpoint.formats.peft_adapter import forget_reads
from mftune.pet import get_pet_model, pet_config_from_dict, trainable_summary
from mftune.pet.config import is_slora
from mftune.trainer.checkpointing import save_strategy
from mftune.trainer.resume import ResumePoint
from mftune.trainer.weights import LoadedWeights, load_weights, plan_weights

logger = logging.getLogger("mftune")


@dataclass(frozen=True)
class BuiltModel:
    model: LlamaForCausalLM
    pet_config: dict | None  # the pet_config applied (None: every parameter trains)
    weights: LoadedWeights  # where the weights came from (empty after only_save_strategy)


def build_model(cfg: MFConfig, model_config: LlamaConfig, ctx: ParallelContext,
                point: ResumePoint | None = None) -> BuiltModel:
    """The run's model in ``ctx``'s layout with its starting weights (``mftune.trainer.weights``);
    with ``only_save_strategy``, the strategy files written and no weights."""
    # applied whenever present, in every run mode (MindFormers' build_network does the same); a run
    # without pet_config trains every parameter. A PEFT adapter or an mftune LoRA checkpoint as load_checkpoint
    # (or resume point) brings its own LoRA settings, which win over the YAML's (each difference logged); the
    # checkpoints the run saves record those.
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(model_config)
        if is_slora(model_config.pet_config) and cfg.load_checkpoint and (
                peft_adapter.matches(cfg.load_checkpoint) or peft_prefix.matches(cfg.load_checkpoint)):
            raise UserError(f"load_checkpoint={cfg.load_checkpoint} is a PEFT adapter, and pet_type slora takes its "
                            f"adapters from adapter_path. Give the base model as load_checkpoint and name the "
                            f"adapter in the adapter_path JSON.")
        if point is not None:  # what the resumed adapters were trained with (the run's own checkpoints)
            pet_config = checkpoint_pet_config(model_config.pet_config, point.files[0], model, cfg.run_mode,
                                               list(point.entries))
        else:
            pet_config = effective_pet_config(model_config.pet_config, cfg.load_checkpoint, model, cfg.run_mode)
        model.config = dataclasses.replace(model.config, pet_config=pet_config)
        if is_slora(pet_config):  # several adapters over the base, one per prompt (predict only)
            _check_slora(cfg)
            slora_adapters.apply(model, pet_config["adapter_path"])
        elif pet_config:
            get_pet_model(model, pet_config_from_dict(pet_config))  # LoRA or a prefix method
    except UserError:  # a CheckpointError naming the adapter's file
        raise
    except ValueError as exc:  # e.g. target_modules matches no layer
        raise UserError(str(exc)) from None
    if model.pad_mask_id is not None and cfg.run_mode != "predict":  # model_config.mask_pad_token
        logger.info("mask_pad_token: inputs equal to pad_token_id=%d are hidden from attention and not trained "
                    "on (MindFormers' input mask)", model.pad_mask_id)
    for param in model.parameters():  # on meta: free, and before FSDP2 records dtypes
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    seq_parallel = cfg.parallel_config.use_seq_parallel
    if seq_parallel and cfg.run_mode == "predict" and ctx.tp_size > 1:
        logger.info("run_mode predict: use_seq_parallel is off (decoding feeds one token at a time)")
        seq_parallel = False
    parallelize(model, ctx, vocab_emb_dp=cfg.parallel_config.vocab_emb_dp, use_seq_parallel=seq_parallel,
                parallel_optimizer=cfg.parallel.enable_parallel_optimizer,
                recompute=recompute_plan(cfg.recompute_config.recompute, cfg.recompute_config.select_recompute,
                                         cfg.recompute_config.select_recompute_exclude, model_config.num_layers,
                                         model_config.offset),
                compute_dtype=model.dtypes.compute_dtype)
    if cfg.run_mode in ("train", "finetune") or cfg.auto_trans_ckpt or cfg.only_save_strategy:
        save_strategy(os.path.join(os.path.abspath(cfg.output_dir), "strategy"), model, ctx,
                      parallel_config=dataclasses.asdict(cfg.parallel_config),
                      enable_parallel_optimizer=cfg.parallel.enable_parallel_optimizer)
    if cfg.only_save_strategy:
        return BuiltModel(model, pet_config, LoadedWeights({}, None))
    model.to_empty(device=ctx.device)
    weights = load_weights(model, plan_weights(cfg, point), cfg, ctx)
    forget_reads()  # the PEFT adapter tensors read along the way
    if not pet_config:  # get_pet_model logs it for PET runs
        logger.info(trainable_summary(model))
    return BuiltModel(model, pet_config, weights)


def _check_slora(cfg: MFConfig) -> None:
    """S-LoRA serves adapters: predict only."""
    if cfg.run_mode != "predict":
        raise UserError(f"model.model_config.pet_config.pet_type=slora is invalid with run_mode {cfg.run_mode}: "
                        f"S-LoRA serves trained adapters (MindFormers' predict_llama2_7b_slora.yaml). Use run_mode "
                        f"predict, or train one adapter with pet_type lora.")
