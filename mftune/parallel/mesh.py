"""Process group and DeviceMesh from torchrun's environment and ``parallel_config``.

``use_parallel: True`` runs under ``scripts/launcher.sh`` (torchrun): RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT come from the environment, the backend is NCCL on CUDA and
gloo on CPU, and ``MFTUNE_CLUSTER_TIME_OUT`` (the launcher's CLUSTER_TIME_OUT, seconds) is the
process-group timeout. The mesh is 2-D ``(dp, tp)``: ``data_parallel`` x ``model_parallel``;
tensor-parallel groups are consecutive ranks (fast links within a node), as in MindFormers.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mftune.config.schema import ParallelConfig
from mftune.models.llama import LlamaConfig

DEFAULT_TIMEOUT_S = 7200  # msrun_launcher.sh's CLUSTER_TIME_OUT


@dataclass
class ParallelContext:
    """This process's place in the job (one process: rank 0 of 1, no mesh)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: DeviceMesh | None = None  # dims ("dp", "tp")
    dp_rank: int = 0
    dp_size: int = 1
    tp_size: int = 1
    vocab_parallel: bool = False  # embedding, lm_head and logits split over the vocabulary (vocab_emb_dp False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_group(self):
        """The data-parallel process group, None without data parallelism."""
        return self.mesh.get_group("dp") if self.dp_size > 1 else None


def env_world() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's environment, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def layout_errors(parallel_config: ParallelConfig, model_config: LlamaConfig,
                  world: tuple[int, int, int] | None) -> list[str]:
    """Every reason this (data_parallel, model_parallel) layout cannot run this model, as
    ``"<key>=<value> is invalid: <why>. <fix>"`` lines (empty when it can). ``world`` is
    ``env_world()``: None outside torchrun."""
    dp, mp = parallel_config.data_parallel, parallel_config.model_parallel
    world_size = world[1] if world else None
    errors = []
    if world and torch.cuda.is_available() and world[2] >= torch.cuda.device_count():
        errors.append(f"LOCAL_RANK={world[2]} is invalid: this node has {torch.cuda.device_count()} GPUs. "
                      f"Start at most {torch.cuda.device_count()} workers per node (the launcher's "
                      f"WORKER_NUM, or LOCAL_WORKER in the multi-node form).")
    if world_size is None:
        errors.append("use_parallel=True is invalid: the process was not started by torchrun (RANK and "
                      "WORLD_SIZE are not set). Start it with bash scripts/launcher.sh \"run_finetune.py "
                      "...\" N, or pass --use_parallel False for one process.")
    elif dp * mp != world_size:
        fit = (world_size // mp, mp) if world_size % mp == 0 else (world_size, 1)
        errors.append(f"parallel_config.data_parallel x model_parallel={dp}x{mp}={dp * mp} is invalid: the "
                      f"launcher started {world_size} processes. Set them so that the product is "
                      f"{world_size} (e.g. --parallel_config.data_parallel {fit[0]} "
                      f"--parallel_config.model_parallel {fit[1]}), or start {dp * mp} processes.")
    if mp > 1:
        m = model_config
        rules = [("model.model_config.num_heads", m.num_heads, "attention heads are split over model_parallel"),
                 ("model.model_config.n_kv_heads", m.n_kv_heads, "key/value heads are split over model_parallel"),
                 ("FFN hidden size (from intermediate_size / ffn_dim_multiplier / multiple_of)",
                  m.ffn_hidden_size, "w1/w3 outputs and w2 inputs are split over model_parallel")]
        if not parallel_config.vocab_emb_dp:
            rules.append(("model.model_config.vocab_size", m.vocab_size,
                          "vocab_emb_dp False splits the embedding and lm_head over the vocabulary"))
        if parallel_config.use_seq_parallel:
            rules.append(("model.model_config.seq_length", m.seq_length,
                          "use_seq_parallel splits activations over the sequence"))
        for key, value, why in rules:
            if value % mp:
                errors.append(f"{key}={value} is invalid: {why}, and it is not divisible by "
                              f"parallel_config.model_parallel={mp}. Use a model_parallel that divides "
                              f"{value}" + (" (or vocab_emb_dp: True)" if "vocab" in key else "")
                              + (" (or use_seq_parallel: False)" if "seq_length" in key else "") + ".")
    return errors


def init_distributed(parallel_config: ParallelConfig) -> ParallelContext:
    """Join the process group and build the (dp, tp) mesh. Call after ``layout_errors`` is empty."""
    rank, world_size, local_rank = env_world()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = datetime.timedelta(seconds=int(os.environ.get("MFTUNE_CLUSTER_TIME_OUT", DEFAULT_TIMEOUT_S)))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    dp, mp = parallel_config.data_parallel, parallel_config.model_parallel
    mesh = init_device_mesh(device.type, (dp, mp), mesh_dim_names=("dp", "tp"))
    return ParallelContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device, mesh=mesh,
                           dp_rank=mesh.get_local_rank("dp"), dp_size=dp, tp_size=mp,
                           vocab_parallel=mp > 1 and not parallel_config.vocab_emb_dp)


def seed_ranks(seed: int, ctx: ParallelContext) -> None:
    """Seed what happens after initialisation (dropout): ``seed + dp_rank``, so data-parallel ranks
    draw independent masks for their different samples while the ranks of a tensor-parallel group
    draw the same ones (a replicated LoRA input must be dropped identically on each of them).

    On CUDA with tensor parallel, DTensor's RNG tracker is created here, once, without the state
    broadcast it would otherwise run lazily in the middle of the first forward (which activation
    checkpointing's recompute would not replay).
    """
    torch.manual_seed(seed + ctx.dp_rank)
    if ctx.tp_size > 1 and ctx.device.type == "cuda":
        from torch.distributed.tensor._random import manual_seed  # torchtitan's set_determinism does this
        manual_seed(seed + ctx.dp_rank, ctx.mesh["tp"])


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
