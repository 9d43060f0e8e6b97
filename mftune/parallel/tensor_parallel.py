"""Tensor and sequence parallelism of a plain ``LlamaForCausalLM`` (Megatron layout, with DTensor).

Per decoder layer: wq/wk/wv and w1/w3 are column-parallel (weight ``Shard(0)``: each rank computes
its own heads / FFN columns), wo and w2 row-parallel (weight ``Shard(1)``; the partial sums are
all-reduced, or reduce-scattered over the sequence with sequence parallel). A LoRA layer's factors
follow its base layer (STYLE #2): column-parallel base -> A ``[r, in]`` replicated, B ``[out, r]``
``Shard(0)``; row-parallel base -> A ``Shard(1)``, B replicated. Replicated factors get identical
values on every rank (same init and same all-reduced gradients). DoRA's magnitude follows the output rows
(``Shard(0)`` column-parallel, replicated row-parallel, where each rank's norms are partial sums of squares,
added over the ranks: ``mftune.pet.dora``).

``vocab_emb_dp: False`` shards the embedding and lm_head over the vocabulary; the logits stay
sharded (a DTensor) and the loss is computed under ``loss_parallel()`` without gathering them.
``vocab_emb_dp: True`` (MindFormers' default) keeps both replicated, as MindFormers does. Either way both
have one placement, so tied embeddings (``tie_word_embeddings``) stay one Parameter.

``use_seq_parallel: True`` keeps the residual stream split over the sequence (``Shard(1)``) between
the attention/FFN blocks: the norms run on sequence shards, the blocks all-gather their input and
reduce-scatter their output. Every parameter becomes a DTensor on the ``tp`` mesh (replicated ones
too), so FSDP2 and the optimizer see one kind of parameter.

A prefix method's keys/values follow their heads: the encoder is replicated and its output cut by head
(``_shard_prefix``).
"""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)
from torch.distributed.tensor.parallel.style import ParallelStyle

from mftune.pet.dora import LORA_M
from mftune.pet.init import INIT_A, INIT_B
from mftune.pet.lora import LORA_A, LORA_B, LoRALinear
from mftune.pet.prefix import prefix_encoder
from mftune.pet.slora import SLORA_A, SLORA_B, SLoRALinear


class PlaceParams(ParallelStyle):
    """Place a module's own parameters, convert its first input to ``desired_input`` and its output
    to ``output`` (a local tensor unless ``use_local_output=False``).

    What torch's Colwise/RowwiseParallel do for ``nn.Linear``, for modules they do not know:
    ``LoRALinear`` (several parameters with different placements), ``LlamaEmbedding`` (parameter
    ``embedding_weight``) and replicated layers.
    """

    def __init__(self, params: dict[str, Placement], *, input: Placement = Replicate(),
                 desired_input: Placement = Replicate(), output: Placement = Replicate(),
                 use_local_output: bool = True):
        super().__init__()
        self.params, self.input, self.desired_input = params, input, desired_input
        self.output, self.use_local_output = output, use_local_output

    def _partition(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for pname, placement in self.params.items():
            param = getattr(module, pname, None)
            if param is None or isinstance(param, DTensor):
                continue
            dparam = nn.Parameter(distribute_tensor(param.data, mesh, [placement]),
                                  requires_grad=param.requires_grad)
            module.register_parameter(pname, dparam)

    def _prepare_input(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, (_dim(self.input, x.ndim),), run_check=False)
        desired = _dim(self.desired_input, x.ndim)
        if x.placements != (desired,):
            x = x.redistribute(placements=(desired,))
        return (x, *inputs[1:])

    def _prepare_output(self, module: nn.Module, out: DTensor, mesh: DeviceMesh):
        output = _dim(self.output, out.ndim)
        if out.placements != (output,):
            out = out.redistribute(placements=(output,))
        return out.to_local() if self.use_local_output else out

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh,
                                 lambda name, mod, mesh: self._partition(name, mod, mesh) if mod is module else None,
                                 self._prepare_input, self._prepare_output)


def _dim(placement: Placement, ndim: int) -> Placement:
    """``Shard(-1)`` -> ``Shard(ndim - 1)``: DTensor reports non-negative dims."""
    return Shard(placement.dim % ndim) if placement.is_shard() and placement.dim < 0 else placement


def colwise(module: nn.Module) -> ParallelStyle:
    """Column parallel: replicated input, output sharded on its last dim (local)."""
    if isinstance(module, SLoRALinear):  # stacks [n + 1, r, in] / [n + 1, out, r]
        return PlaceParams({"weight": Shard(0), SLORA_A: Replicate(), SLORA_B: Shard(1)}, output=Shard(-1))
    if isinstance(module, LoRALinear):
        return PlaceParams({"weight": Shard(0), "bias": Shard(0), LORA_A: Replicate(), LORA_B: Shard(0),
                            LORA_M: Shard(0), INIT_A: Replicate(), INIT_B: Shard(0)}, output=Shard(-1))
    return ColwiseParallel()


def rowwise(module: nn.Module, output: Placement) -> ParallelStyle:
    """Row parallel: input sharded on its last dim, partial sums reduced to ``output`` (local)."""
    if isinstance(module, SLoRALinear):
        return PlaceParams({"weight": Shard(1), SLORA_A: Shard(2), SLORA_B: Replicate()},
                           input=Shard(-1), desired_input=Shard(-1), output=output)
    if isinstance(module, LoRALinear):
        return PlaceParams({"weight": Shard(1), "bias": Replicate(), LORA_A: Shard(1), LORA_B: Replicate(),
                            LORA_M: Replicate(), INIT_A: Shard(1), INIT_B: Replicate()},
                           input=Shard(-1), desired_input=Shard(-1), output=output)
    return RowwiseParallel(output_layouts=output)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, *, vocab_parallel: bool,
                          seq_parallel: bool) -> None:
    """Shard ``model`` (a ``LlamaForCausalLM``, LoRA applied or not, on any device incl. meta) in place."""
    stream = Shard(1) if seq_parallel else Replicate()  # layout of the residual stream between blocks

    def norm() -> ParallelStyle:
        return SequenceParallel() if seq_parallel else PlaceParams({"weight": Replicate()})

    def gather_input(n_extra: int) -> ParallelStyle:  # all-gather the sequence once per block
        return PrepareModuleInput(input_layouts=(Shard(1),) + (None,) * n_extra,
                                  desired_input_layouts=(Replicate(),) + (None,) * n_extra,
                                  use_local_output=True)

    top = {"model.tok_embeddings": PlaceParams({"embedding_weight": Shard(0) if vocab_parallel else Replicate()},
                                               output=stream),
           "model.norm_out": norm()}
    head = model.lm_head
    if isinstance(head, SLoRALinear):  # S-LoRA on lm_head: replicated or split over the vocabulary
        top["lm_head"] = PlaceParams({"weight": Shard(0), SLORA_A: Replicate(), SLORA_B: Shard(1)}, input=stream,
                                     desired_input=Replicate(), output=Shard(-1), use_local_output=False) \
            if vocab_parallel else PlaceParams({"weight": Replicate(), SLORA_A: Replicate(), SLORA_B: Replicate()},
                                               input=stream, desired_input=Replicate())
    elif vocab_parallel and isinstance(head, LoRALinear):  # LoRA on lm_head: B and the magnitude follow the vocab
        top["lm_head"] = PlaceParams({"weight": Shard(0), LORA_A: Replicate(), LORA_B: Shard(0), LORA_M: Shard(0),
                                      INIT_A: Replicate(), INIT_B: Shard(0)}, input=stream,
                                     desired_input=Replicate(), output=Shard(-1), use_local_output=False)
    elif vocab_parallel:  # logits stay a vocab-sharded DTensor for loss_parallel()
        top["lm_head"] = ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1), use_local_output=False)
    else:
        top["lm_head"] = PlaceParams({name: Replicate() for name in ("weight", LORA_A, LORA_B, LORA_M, INIT_A, INIT_B)},
                                     input=stream, desired_input=Replicate())
    parallelize_module(model, tp_mesh, top)
    # tie_word_embeddings: the embedding table and lm_head's weight have the same placement (Shard(0) on the
    # vocabulary, or replicated), so lm_head takes the embedding's DTensor Parameter again
    model.tie_weights()

    _shard_prefix(model, tp_mesh)
    for layer in model.model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        plan = {"attention_norm": norm(), "ffn_norm": norm(),
                "attention.wq": colwise(attn.wq), "attention.wk": colwise(attn.wk),
                "attention.wv": colwise(attn.wv), "attention.wo": rowwise(attn.wo, stream),
                "feed_forward.w1": colwise(ffn.w1), "feed_forward.w3": colwise(ffn.w3),
                "feed_forward.w2": rowwise(ffn.w2, stream)}
        if seq_parallel:
            plan["attention"] = gather_input(2)  # forward(x, cos, sin)
            plan["feed_forward"] = gather_input(0)
        parallelize_module(layer, tp_mesh, plan)


def _shard_prefix(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """A prefix method's encoder (``mftune.pet.prefix``): its parameters replicated (small: P x D and the MLP), its
    output ``(bs, P, 2L, n_kv_heads, head_dim)`` cut to this rank's key/value heads, the ones its wk/wv compute.
    Backward all-gathers the heads' gradients, so each replica gets the whole, identical gradient."""
    encoder = prefix_encoder(model)
    if encoder is None:
        return

    def replicate(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for pname, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(pname, nn.Parameter(distribute_tensor(param.data, mesh, [Replicate()]),
                                                          requires_grad=param.requires_grad))

    def local_heads(module: nn.Module, out: DTensor, mesh: DeviceMesh):
        return out.redistribute(placements=(Shard(3),)).to_local()

    distribute_module(encoder, tp_mesh, replicate, output_fn=local_heads)
