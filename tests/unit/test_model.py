"""mftune's Llama against transformers' LlamaForCausalLM with the same weights (STYLE #8).

Every expected number comes from a reference that does not share code with mftune: transformers'
model (logits, loss), an explicit log-softmax over the reference logits, Meta's Llama2 FFN sizes
published with the checkpoints, or a property of the maths (0 loss when nothing is counted).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tiny_hf
from mftune.checkpoint.names import hf_config_to_model_config, hf_to_mftune
from mftune.models.llama import LlamaConfig, LlamaForCausalLM

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, HEADS, LAYERS, FFN = 128, 64, 4, 2, 96


def hf_model(n_kv_heads: int = HEADS, seed: int = 0, **overrides) -> "transformers.LlamaForCausalLM":
    """The shared tiny transformers Llama (tests/tiny_hf.py), all heads by default."""
    return tiny_hf.hf_model(n_kv_heads=n_kv_heads, seed=seed, **overrides)


mftune_from_hf = tiny_hf.mftune_from_hf


def tokens(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def expected_names(n_layers: int) -> list[str]:
    """The MindFormers names of reference/mindformers.md §5, written out by hand."""
    names = ["model.tok_embeddings.embedding_weight"]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        names += [p + "attention_norm.weight"] + [p + f"attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")]
        names += [p + "ffn_norm.weight"] + [p + f"feed_forward.{w}.weight" for w in ("w1", "w2", "w3")]
    return names + ["model.norm_out.weight", "lm_head.weight"]


# (a) logits: transformers' LlamaForCausalLM forward is the reference.
@pytest.mark.parametrize("n_kv_heads", [HEADS, 2, 1], ids=["mha", "gqa", "mqa"])
def test_logits_match_transformers(n_kv_heads: int) -> None:
    hf = hf_model(n_kv_heads)
    ours = mftune_from_hf(hf)
    x = tokens()
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x)
    assert got.dtype == torch.float32 and got.shape == (2, 12, VOCAB)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_math_backend_matches_default() -> None:
    """use_flash_attention False forces SDPA's math kernel; same numbers in fp32 (reference: HF eager)."""
    hf = hf_model(2)
    ours = mftune_from_hf(hf, use_flash_attention=False)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=1e-5)


# (b) loss: HF's own shifted loss, and an explicit log-softmax over HF's logits.
def test_loss_matches_reference_cross_entropy() -> None:
    hf = hf_model(2)
    ours = mftune_from_hf(hf)
    record = tokens(seq=13)  # seq_length + 1 tokens (DESIGN §1.4)
    labels = record.clone()
    labels[0, :5] = -100  # a masked prompt
    labels[1, -3:] = -100  # padding labelled -100 by preprocessing
    with torch.no_grad():
        ref_logits = hf(record).logits[:, :-1]  # (bs, seq_length, vocab): positions that predict labels[:, 1:]
        hf_loss = hf(record, labels=labels).loss
        got = ours(record, labels=labels)
        got_sum, got_n = ours(record, labels=labels, reduction="sum")
    targets = labels[:, 1:]
    keep = targets != -100
    logp = torch.log_softmax(ref_logits.double(), dim=-1)
    nll = -logp[keep].gather(-1, targets[keep][:, None]).squeeze(-1)
    assert int(got_n) == int(keep.sum()) == 2 * 12 - 4 - 3
    torch.testing.assert_close(got.double(), nll.mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_sum.double(), nll.sum(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got, hf_loss, atol=1e-5, rtol=1e-5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got_sum / got_n, got)  # one code path: mean = sum / count


def test_loss_uses_configured_ignore_token_id() -> None:
    hf = hf_model()
    ours = mftune_from_hf(hf, ignore_token_id=-1)
    record = tokens(seq=9)
    labels = record.clone()
    labels[:, :4] = -1
    with torch.no_grad():
        ref = F.cross_entropy(hf(record).logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-1)
        torch.testing.assert_close(ours(record, labels=labels), ref, atol=1e-5, rtol=1e-5)


# (c) FFN size: Meta's published Llama2 intermediate sizes (HF config.json of 7B/13B/70B).
@pytest.mark.parametrize(
    "hidden, extra, expected",
    [
        (4096, {}, 11008),  # Llama-2-7b
        (5120, {}, 13824),  # Llama-2-13b
        (8192, {"ffn_dim_multiplier": 1.3, "multiple_of": 4096}, 28672),  # Llama-2-70b
        (4096, {"intermediate_size": 1234}, 1234),  # explicit size wins
    ],
)
def test_ffn_hidden_size_rule(hidden: int, extra: dict, expected: int) -> None:
    assert LlamaConfig(hidden_size=hidden, **extra).ffn_hidden_size == expected


def test_ffn_size_reaches_the_layers() -> None:
    m = LlamaForCausalLM(dict(hidden_size=64, num_heads=4, num_layers=1, vocab_size=32, multiple_of=32))
    # int(2 * 4 * 64 / 3) = 170 -> rounded up to a multiple of 32 = 192
    assert m.model.layers[0].feed_forward.w1.weight.shape == (192, 64)
    assert m.model.layers[0].feed_forward.w2.weight.shape == (64, 192)


# (d) meta build -> to_empty -> init_weights.
@pytest.mark.parametrize("tie", [False, True])
def test_meta_build_materialise_init(tie: bool) -> None:
    cfg = dict(hidden_size=64, num_heads=4, n_kv_heads=2, num_layers=2, vocab_size=VOCAB,
               intermediate_size=FFN, compute_dtype="float32", tie_word_embeddings=tie)
    with torch.device("meta"):
        m = LlamaForCausalLM(cfg)
    assert all(p.is_meta for p in m.parameters())
    m.to_empty(device="cpu")
    torch.manual_seed(0)
    m.init_weights()
    assert not any(t.is_meta for t in list(m.parameters()) + list(m.buffers()))
    assert list(m.state_dict()) == expected_names(2)  # no buffers, MindFormers names, in order
    assert (m.lm_head.weight is m.model.tok_embeddings.embedding_weight) == tie
    assert torch.isfinite(m(tokens())).all()
    # Same RNG -> same weights as a model built directly on CPU (init_weights is the whole init).
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg)
    torch.manual_seed(0)
    ref.init_weights()
    for (k, a), (_, b) in zip(m.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    w = m.model.layers[0].attention.wq.weight
    assert abs(w.std().item() - 0.02) < 0.005 and torch.equal(m.model.norm_out.weight, torch.ones(64))


def test_tied_embeddings_match_transformers() -> None:
    hf = hf_model(2, tie_word_embeddings=True)
    ours = mftune_from_hf(hf)
    assert ours.lm_head.weight is ours.model.tok_embeddings.embedding_weight
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=1e-5)


# (e) reduced-precision compute with fp32 parameters; reference: the same model in fp32.
@pytest.mark.parametrize(
    "compute, rotary", [("bfloat16", "float32"), ("bfloat16", "float16"), ("float16", "float16")]
)
def test_half_compute_fp32_params(compute: str, rotary: str) -> None:
    hf = hf_model(2)
    ref = mftune_from_hf(hf)
    ours = mftune_from_hf(hf, compute_dtype=compute, rotary_dtype=rotary)
    x = tokens()
    with torch.no_grad():
        expected = ref(x)
    got = ours(x)
    assert got.dtype == torch.float32
    rel = (got - expected).norm() / expected.norm()
    assert rel < 0.05, f"relative error {rel:.3g} vs fp32"
    loss = ours(tokens(seq=13), labels=tokens(seq=13))
    assert loss.dtype == torch.float32
    loss.backward()
    for name, p in ours.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


def test_half_params_and_compute() -> None:
    """param_init_type bf16 + compute bf16: parameters are created in bf16, logits still fp32."""
    m = LlamaForCausalLM(dict(hidden_size=64, num_heads=4, num_layers=1, vocab_size=32, intermediate_size=96,
                              compute_dtype="bfloat16", param_init_type="bfloat16"))
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m(torch.randint(0, 32, (1, 5))).dtype == torch.float32


# (f) RoPE variants: transformers' linear scaling is position interpolation (PI).
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_pi_and_theta_match_transformers(theta: float) -> None:
    hf = hf_model(2, rope_theta=theta, rope_scaling={"rope_type": "linear", "factor": 2.0})
    ours = mftune_from_hf(hf)
    assert (ours.config.extend_method, ours.config.scaling_factor, ours.config.theta) == ("PI", 2.0, theta)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=1e-5)


def test_ntk_is_mindformers_static_ntk() -> None:
    """MindFormers' FreqsMgr (r1.1-r1.5) with extend_method NTK: ``theta *= scaling_factor``, i.e. plain
    RoPE with base theta x f: transformers' Llama with rope_theta = theta x f is the reference."""
    hf = hf_model(2, rope_theta=10000.0 * 2.0)
    mc = hf_config_to_model_config({**hf.config.to_dict(), "rope_parameters": None, "rope_scaling": None})
    mc.update(compute_dtype="float32", extend_method="NTK", scaling_factor=2.0, theta=10000.0)
    ours = LlamaForCausalLM(mc)
    ours.load_state_dict({hf_to_mftune(k): v for k, v in hf.state_dict().items()})
    x = tokens(seq=6)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=1e-5)
        plain = mftune_from_hf(hf_model(2))(x)
    assert not torch.allclose(ours(x), plain, atol=1e-3)  # NTK really changes something


def test_invalid_config_reports_every_problem() -> None:
    with pytest.raises(ValueError) as err:
        LlamaForCausalLM(dict(hidden_size=60, num_heads=8, n_kv_heads=3, num_layers=1, vocab_size=32,
                              extend_method="YaRN", rotary_dtype="float8"))
    for key in ("extend_method='YaRN'", "rotary_dtype", "hidden_size=60", "n_kv_heads=3"):
        assert key in str(err.value)
    with pytest.raises(ValueError, match="float32 compute needs float32 parameters"):
        LlamaForCausalLM(dict(hidden_size=64, num_heads=4, num_layers=1, compute_dtype="float32",
                              param_init_type="bfloat16"))


# (g) all targets ignored: 0 (sum of nothing), with a grad_fn, never NaN.
def test_all_ignored_labels_give_zero_loss_with_grad() -> None:
    m = LlamaForCausalLM(dict(hidden_size=64, num_heads=4, num_layers=1, vocab_size=32, intermediate_size=96,
                              compute_dtype="float32"))
    x = torch.randint(0, 32, (2, 7))
    labels = torch.full_like(x, -100)
    loss = m(x, labels=labels)
    assert loss.item() == 0.0 and not torch.isnan(loss) and loss.grad_fn is not None
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
    s, n = m(x, labels=labels, reduction="sum")
    assert s.item() == 0.0 and int(n) == 0


def test_dict_config_and_unknown_key() -> None:
    m = LlamaForCausalLM({"hidden_size": 64, "num_heads": 4, "num_layers": 1, "vocab_size": 32})
    assert isinstance(m.config, LlamaConfig)
    with pytest.raises(ValueError, match="num_layer"):
        LlamaForCausalLM({"hidden_size": 64, "num_heads": 4, "num_layer": 1})
