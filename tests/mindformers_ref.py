"""MindFormers itself as a test reference, run in its own interpreter (mftune never imports it).

The interpreter is ``$MFTUNE_MINDFORMERS_PYTHON``, else ``/work/mfenv/bin/python`` when it exists: a venv with
``mindspore==2.7.0 mindformers==1.3.2`` (reference/mindformers.md §13). Tests call ``run_mindformers(script,
*args)``, which skips when there is no such interpreter or it cannot import mindformers. The script runs after
``PREAMBLE``: the three CPU shims of §13 (none changes the maths), PyNative mode on the CPU, and
``build_llama(model_config, weights)``, a MindFormers ``LlamaForCausalLM`` holding given weights. Only
tests/e2e uses this (subprocesses).
"""
from __future__ import annotations

from mindspore_ref import reference_python, run_reference

DEFAULT_PYTHON = "/work/mfenv/bin/python"
ENV_VAR = "MFTUNE_MINDFORMERS_PYTHON"

# Prepended to every script. Shims: fused RmsNorm off (Ascend-only kernel); rotate_half as a plain matmul
# with the swap mask (the CPU BatchMatMul does not broadcast a 2-D operand; same product); Cell.cast, which
# mindformers 1.3 expects from MindSpore 2.4's Cell.
PREAMBLE = '''
import json, sys
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops
nn.Cell.cast = ops.Cast()
from mindformers.modules import layers as _mf_layers
_mf_layers.RotaryEmbedding.rotate_half = lambda self, x, swap_mask: ops.matmul(x, swap_mask)
from mindformers.models.llama import LlamaConfig, LlamaForCausalLM
ms.set_context(mode=ms.PYNATIVE_MODE)
ms.set_device("CPU")


def build_llama(model_config, weights):
    """MindFormers' LlamaForCausalLM of ``model_config`` (float32, no flash attention, no KV cache) holding
    ``weights`` (name -> array under MindFormers' parameter names; every parameter must be given)."""
    config = dict(model_config, fused_rms_norm=False, use_flash_attention=False, use_past=False,
                  compute_dtype="float32", layernorm_compute_type="float32", softmax_compute_type="float32",
                  rotary_dtype="float32", param_init_type="float32")
    net = LlamaForCausalLM(LlamaConfig(**config))
    params = {p.name: p for p in net.get_parameters()}
    if set(params) != set(weights):
        raise SystemExit(f"weights do not match MindFormers' parameters: missing {sorted(set(params) - set(weights))}, "
                         f"extra {sorted(set(weights) - set(params))}")
    for name, p in params.items():
        p.set_data(Tensor(np.asarray(weights[name], dtype=np.float32)))
    return net
'''


def mindformers_python() -> str:
    """The interpreter with MindFormers, or pytest.skip saying why there is none."""
    return reference_python(ENV_VAR, DEFAULT_PYTHON, "mindformers",
                            " (python -m venv /work/mfenv && /work/mfenv/bin/pip install mindspore==2.7.0 "
                            "mindformers==1.3.2)")


def run_mindformers(script: str, *args: str, timeout: int = 600, cwd: str | None = None) -> str:
    """Run ``PREAMBLE + script`` with the MindFormers interpreter and ``args`` (``sys.argv[1:]``); its stdout.
    A failure fails the test with the script's stderr (MindFormers' own log lines are not failures)."""
    return run_reference(mindformers_python(), PREAMBLE + script, *args, timeout=timeout, cwd=cwd)
