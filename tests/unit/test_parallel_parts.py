"""Parallelism's parts in one process: the layout checks (every reason a layout cannot run, with its
key and fix), the global gradient norm against torch's on plain tensors, and one FSDP2 rank (gloo, in
this process) under bf16 autocast against the plain model, bit for bit."""
import math

import pytest
import torch

import parity as pp

from mftune.config import ParallelConfig
from mftune.models.llama import LlamaConfig, LlamaForCausalLM
from mftune.parallel.data_parallel import clip_grad_norm_
from mftune.parallel.mesh import layout_errors


def _model(**kw) -> LlamaConfig:
    base = dict(pp.MODEL)
    base.update(kw)
    return LlamaConfig.from_dict(base)


@pytest.mark.parametrize("layout, model, world, expect", [
    ((4, 2), {}, 8, []),
    ((4, 4), {}, 8, ["data_parallel x model_parallel=4x4=16 is invalid"]),
    ((1, 3), {}, 3, ["num_heads=8", "n_kv_heads=8", "FFN hidden size", "vocab_size=1000"]),
    ((1, 8), {"num_heads": 8, "n_kv_heads": 2}, 8, ["n_kv_heads=2 is invalid"]),
    ((2, 4), {"vocab_size": 1002}, 8, ["vocab_size=1002 is invalid"]),
    ((2, 4), {"tie_word_embeddings": True}, 8, []),  # one Parameter, one placement (tests/distributed)
    ((8, 1), {"vocab_size": 1002, "n_kv_heads": 2}, 8, []),  # no tensor parallel: no rule
])
def test_layout_errors_name_the_key_and_the_fix(layout, model, world, expect):
    pc = ParallelConfig(data_parallel=layout[0], model_parallel=layout[1], vocab_emb_dp=False)
    errors = layout_errors(pc, _model(**model), (0, world, 0))
    assert len(errors) == len(expect), errors
    for error, want in zip(errors, expect):
        assert want in error and ("Use" in error or "Set" in error), error


def test_sequence_parallel_needs_divisible_seq_length():
    pc = ParallelConfig(data_parallel=1, model_parallel=8, use_seq_parallel=True)
    errors = layout_errors(pc, _model(seq_length=100), (0, 8, 0))
    assert len(errors) == 1 and "seq_length=100" in errors[0] and "use_seq_parallel: False" in errors[0]


def test_clip_grad_norm_matches_torch_on_plain_tensors():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    ref = [p.grad.clone() for p in params]
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, g in zip(torch_params, ref):
        p.grad = g.clone()
    torch_norm = torch.nn.utils.clip_grad_norm_(torch_params, 1.0)
    norm = clip_grad_norm_(params, 1.0)
    assert norm > 1.0 and math.isclose(norm, float(torch_norm), rel_tol=1e-6)
    for p, q in zip(params, torch_params):
        torch.testing.assert_close(p.grad, q.grad)
    for p in params:
        p.grad[0, 0] = float("nan")
    assert not math.isfinite(clip_grad_norm_(params, 1.0))


def test_fsdp2_in_bf16_computes_what_one_process_computes(tmp_path):
    """One FSDP2 rank (gloo, in this process) against the plain model under bf16 autocast: the
    same loss bit for bit. FSDP2 gathers weights in bf16, which autocast would round them to
    anyway; it must not also round the float32 RoPE tables passed into every layer."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from mftune.parallel.data_parallel import apply_fsdp

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        cfg = dict(pp.MODEL, compute_dtype="bfloat16", rotary_dtype="float32", seq_length=64)
        torch.manual_seed(0)
        plain = LlamaForCausalLM(cfg)
        sharded = LlamaForCausalLM(cfg)
        sharded.load_state_dict(plain.state_dict())
        apply_fsdp(sharded, init_device_mesh("cpu", (1,), mesh_dim_names=("dp",)), torch.bfloat16)
        ids = torch.randint(0, 1000, (2, 65), generator=torch.Generator().manual_seed(0))
        assert torch.equal(plain(ids, ids), sharded(ids, ids))
    finally:
        dist.destroy_process_group()
