"""Packing's parts: best-fit decreasing bin packing, the attention a packed record allows (mask and
varlen cu_seqlens agree; the flash kernel equals the mask on CUDA). End to end: tests/e2e/test_packing_runs.py."""
import math
import random

import pytest
import torch

from mftune.data.packing import pack_samples
from mftune.models.attention import packed_samples
from mftune.models.llama import LlamaForCausalLM

SEQ = 384
VOCAB = 1000


def test_pack_samples_is_a_valid_tight_packing():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)] + [100, 100]
    bins = pack_samples(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    optimum = math.ceil(sum(lengths) / 100)  # a lower bound
    assert len(bins) <= math.ceil(11 / 9 * optimum) + 1  # best-fit decreasing's guarantee


def test_packed_samples_mask_and_cu_seqlens_agree():
    """Row 0: samples of 3, 2, 3 tokens; row 1 starts mid-sample (position 5): a row start is a sample start."""
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [5, 6, 0, 1, 2, 3, 0, 1]])
    cu = packed_samples(positions, varlen=True)
    assert cu.cu_seqlens.tolist() == [0, 3, 5, 8, 10, 14, 16] and cu.max_len == 4
    mask = packed_samples(positions, varlen=False).mask[:, 0]  # (bs, seqlen, seqlen)
    flat = cu.cu_seqlens.tolist()
    for r in range(2):
        for q in range(8):
            sample = max(i for i, start in enumerate(flat[:-1]) if start <= r * 8 + q)
            allowed = [flat[sample] <= r * 8 + k <= r * 8 + q for k in range(8)]
            assert mask[r, q].tolist() == allowed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash varlen kernel needs CUDA")
def test_varlen_kernel_equals_the_mask_on_cuda():
    cfg = dict(seq_length=SEQ, hidden_size=256, num_layers=2, num_heads=4, n_kv_heads=2, vocab_size=VOCAB,
               multiple_of=16, compute_dtype="bfloat16", param_init_type="float32")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).cuda()
    positions = torch.tensor([list(range(100)) + list(range(150)) + list(range(SEQ + 1 - 250))] * 2, device="cuda")
    ids = torch.randint(3, VOCAB, positions.shape, device="cuda")
    if not model.model._use_varlen(ids):
        pytest.skip("this GPU or torch has no flash varlen kernel")
    with torch.no_grad():
        varlen = model(ids, positions=positions, packed=True)
        model.model._use_varlen = lambda tokens: False
        mask = model(ids, positions=positions, packed=True)
        alone = model(ids[:1, 100:250])
    torch.testing.assert_close(varlen, mask, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(varlen[:1, 100:250], alone, rtol=2e-2, atol=2e-2)
