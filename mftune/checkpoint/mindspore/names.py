"""MindFormers' names in a checkpoint besides the model's weights, and mftune's: one table each way.

Model weights, LoRA factors (``...wq.mindpet_delta_lora_a`` / ``_b``) and AdamW moments
(``adam_m.<name>``, ``adam_v.<name>``: MindSpore's ``AdamWeightDecay`` and MindFormers'
``FP32StateAdamWeightDecay`` clone the parameters with these prefixes) have the same names in both;
old MindPet checkpoints' ``tk_delta_lora_a`` / ``_b`` are read as ``mindpet_delta_...`` (MindFormers'
``load_ckpt`` renames them the same way).
Counters (MindFormers' ``CheckpointMonitor`` append_dict, the optimizer's and the loss-scale
wrapper's parameters) differ:

=================================  =============================================  ======================
MindFormers (.ckpt)                what it counts                                 mftune
=================================  =============================================  ======================
``epoch_num`` Int64 []             epoch of the last step (sink epochs in sink)   ``epoch_num``
``step_num`` Int64 []              steps run since the start, all epochs          ``global_step``
``global_step`` Int32 [1]          the optimizer's updates                        ``optimizer_step``
``loss_scale`` Float32 []          the scale the last step used                   ``loss_scale`` (read only
                                                                                  without scale_sense)
``scale_sense`` Float32 []         the wrapper's scale after the last update      ``loss_scale``
``current_iterator_step``,         dynamic loss scale: iterations run, the last   ``loss_scale_good_steps``
``last_overflow_iterator_step``    change                                         = current - 1 - last
``global_batch_size`` Int64 []                                                    ``global_batch_size``
=================================  =============================================  ======================

mftune's ``step_num`` (the step within its epoch), ``consumed_samples``, ``loss_scale_good_steps``
and RNG states have no MindFormers counterpart and are not written to ``.ckpt`` files. Other
MindSpore training state (``MINDSPORE_STATE``, ``STATE_PREFIXES``: the learning-rate parameter,
Adam's beta powers, gradient-accumulation buffers, other optimizers' moments, the adaptive loss
scale's counters) stays readable (``ckpt.ckpt_index`` lists it) but is not given to mftune: nothing
in mftune uses it.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from mftune.checkpoint.keys import SCALAR_KEYS

Spec = tuple[str, torch.dtype, tuple[int, ...]]

FROM_MINDFORMERS = {"epoch_num": "epoch_num", "step_num": "global_step", "global_step": "optimizer_step",
                    "loss_scale": "loss_scale", "global_batch_size": "global_batch_size"}
SCALE_SENSE, CURRENT_ITER, LAST_OVERFLOW = "scale_sense", "current_iterator_step", "last_overflow_iterator_step"
COUNTER_SOURCES = (*FROM_MINDFORMERS, SCALE_SENSE, CURRENT_ITER, LAST_OVERFLOW)
MINDSPORE_STATE = ("scale_window", "list_index", "scale_window_up_count", "scale_window_down_count",
                   "beta1_power", "beta2_power", "afactor_step")
STATE_PREFIXES = ("accu_grads.", "learning_rate", "moment1.", "moment2.", "moments.", "accum.", "exp_avg")
TO_MINDFORMERS: dict[str, tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]] = {
    "epoch_num": (("epoch_num", torch.int64, ()),),
    "global_step": (("step_num", torch.int64, ()),),
    "optimizer_step": (("global_step", torch.int32, (1,)),),
    "loss_scale": (("loss_scale", torch.float32, ()), (SCALE_SENSE, torch.float32, ())),
    "global_batch_size": (("global_batch_size", torch.int64, ()),)}
NOT_WRITTEN = tuple(k for k in SCALAR_KEYS if k not in TO_MINDFORMERS)  # mftune-only counters, RNG states


def mftune_name(name: str) -> str:
    """A tensor's mftune name from its name in a MindSpore checkpoint (old MindPet LoRA names renamed)."""
    return name.replace("tk_delta", "mindpet_delta")


def is_mindspore_state(name: str) -> bool:
    """MindSpore training state that mftune does not read (counters are read through ``mftune_counters``)."""
    return name in COUNTER_SOURCES or name in MINDSPORE_STATE or name.startswith(STATE_PREFIXES)


def mftune_counters(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mftune's counters (scalars) from the MindFormers ones a checkpoint holds (``COUNTER_SOURCES``)."""
    out = {}
    for source, name in FROM_MINDFORMERS.items():
        if source in stored:
            out[name] = _scalar(stored[source], torch.float32 if name == "loss_scale" else torch.int64)
    if SCALE_SENSE in stored:
        out["loss_scale"] = _scalar(stored[SCALE_SENSE], torch.float32)
    if CURRENT_ITER in stored and LAST_OVERFLOW in stored:
        good = int(stored[CURRENT_ITER].reshape(-1)[0]) - 1 - int(stored[LAST_OVERFLOW].reshape(-1)[0])
        out["loss_scale_good_steps"] = torch.tensor(max(good, 0), dtype=torch.int64)
    return out


def _scalar(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.reshape(-1)[0].to(dtype).clone() if t.numel() else torch.tensor(0, dtype=dtype)


def to_mindformers(specs: Sequence[Spec], tensors: Iterable[tuple[str, torch.Tensor]]
                   ) -> tuple[list[Spec], Iterator[tuple[str, torch.Tensor]]]:
    """``specs`` and a tensor stream in mftune's names -> in MindFormers' (counters renamed and
    retyped as MindFormers writes them, mftune-only ones dropped); weights and moments pass as is. A
    checkpoint without ``optimizer_step`` (every step an update) gives MindFormers' ``global_step``
    from its ``global_step``."""
    plan = dict(TO_MINDFORMERS)
    if "optimizer_step" not in {s[0] for s in specs} and "global_step" in {s[0] for s in specs}:
        plan["global_step"] = (*plan["global_step"], *plan["optimizer_step"])
    out: list[Spec] = []
    for name, dtype, shape in specs:
        if name in plan:
            out += [tuple(t) for t in plan[name]]
        elif name not in NOT_WRITTEN:
            out.append((name, dtype, tuple(shape)))

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            if name in plan:
                for target, dtype, shape in plan[name]:
                    yield target, tensor.reshape(-1)[0].to(dtype).reshape(shape).clone()
            elif name not in NOT_WRITTEN:
                yield name, tensor

    return out, stream()

