"""Llama2 as a plain ``nn.Module`` with MindFormers parameter names.

No distributed code and no LoRA live here (see ``mftune.parallel`` and ``mftune.pet``).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mftune.models.attention import KVCache, PackedSamples, _varlen_attn, attention_mask_4d, packed_samples

# Every dtype string mftune accepts (any case): the one table that the model, config validation
# (mftune.config_checks), pet_config (mftune.pet.config) and the HF config translation
# (mftune.checkpoint.names) read. MindFormers' long names plus MindPet's short ones.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def to_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map a MindFormers dtype string ("bfloat16", "float16", "float32") to a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {sorted(set(DTYPES))}") from None


@dataclass
class LlamaConfig:
    """``model.model_config`` of a MindFormers Llama YAML.

    Keys that only matter on Ascend or for later features are accepted so that
    ``LlamaConfig(**model_config)`` takes the YAML block as it is.
    """

    type: str = "LlamaConfig"  # YAML registry name; only LlamaConfig exists
    batch_size: int = 1  # predict batch size (training uses runner_config.batch_size)
    seq_length: int = 2048  # tokens the model sees per sample (records hold seq_length + 1)
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    n_kv_heads: int | None = None  # grouped-query attention; None = num_heads
    max_position_embedding: int | None = None  # None = seq_length
    vocab_size: int = 32000
    multiple_of: int = 256  # Llama2 FFN size rounding
    ffn_dim_multiplier: float | None = None
    intermediate_size: int | None = None  # explicit FFN size; overrides the rule above
    rms_norm_eps: float = 1e-5
    theta: float = 10000.0  # RoPE base
    scaling_factor: float = 1.0  # RoPE position interpolation factor (extend_method PI)
    extend_method: str = "None"  # None | PI | NTK
    bos_token_id: int = 1
    eos_token_id: int | list[int] = 2
    pad_token_id: int = 0
    ignore_token_id: int = -100
    compute_dtype: str = "float16"
    layernorm_compute_type: str = "float32"
    softmax_compute_type: str = "float32"
    rotary_dtype: str = "float32"
    param_init_type: str = "float32"
    initializer_range: float = 0.02  # std of the normal init of weights
    tie_word_embeddings: bool = False
    use_past: bool = False  # KV cache for predict
    use_flash_attention: bool = True  # SDPA picks the fused kernel; False forces the math path
    qkv_concat: bool = False  # accepted; mftune always keeps wq/wk/wv separate
    offset: int = 0  # pipeline layer offset (ignored without pipeline parallel)
    checkpoint_name_or_path: str = ""
    repetition_penalty: float = 1.0
    max_decode_length: int = 512
    top_k: int = 5
    top_p: float = 1.0
    temperature: float = 1.0
    do_sample: bool = False
    block_size: int = 16  # paged attention (inference); accepted, unused
    num_blocks: int = 512  # paged attention (inference); accepted, unused
    is_dynamic: bool = False  # accepted, unused
    pet_config: dict[str, Any] | None = None  # PET settings, consumed by mftune.pet

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.num_heads
        if self.max_position_embedding is None:
            self.max_position_embedding = self.seq_length

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        """Build from a ``model_config`` mapping; an unknown key is a ValueError naming the closest key."""
        names = cls.field_names()
        unknown = [k for k in d if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError("unknown model_config key(s): " + ", ".join(hints))
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_hidden_size(self) -> int:
        """Llama2's FFN size rule (Meta ``FeedForward``), unless ``intermediate_size`` is given."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        hidden = int(2 * (4 * self.hidden_size) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


# ----------------------------------------------------------------------------------------------
# Model. Parameter names are MindFormers' (reference/mindformers.md §5); the layout is
# Hugging Face's (rotate-half RoPE, Linear weights [out, in]), so HF -> mftune is a pure rename.
# ----------------------------------------------------------------------------------------------

RopeMethod = Literal["None", "PI", "NTK"]


Fill = Callable[[Tensor, Callable[[Tensor], Any]], None]


def fill_in_place(param: Tensor, init: Callable[[Tensor], Any]) -> None:
    """Default ``fill`` of ``init_weights``: apply the in-place initialiser to the parameter itself."""
    init(param)


def rope_method(config: LlamaConfig) -> RopeMethod:
    """Normalise ``extend_method`` (None | "None" | "PI" | "NTK"); anything else is a ValueError."""
    method = "None" if config.extend_method is None else str(config.extend_method)
    if method.lower() == "none":
        return "None"
    if method.upper() in ("PI", "NTK"):
        return method.upper()  # type: ignore[return-value]
    raise ValueError(f"extend_method={config.extend_method!r} is invalid: expected None, 'PI' or 'NTK'.")


def rope_cos_sin(config: LlamaConfig, seq_len: int, device: torch.device,
                 positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RoPE tables for positions 0..seq_len-1, each ``(seq_len, head_dim)`` float32, HF layout cat(freqs, freqs).

    ``positions`` (any shape, e.g. ``(bs, seqlen)`` for left-padded rows) replaces ``arange(seq_len)``;
    the tables then have shape ``positions.shape + (head_dim,)`` and the same values position by position.

    "PI" divides positions by ``scaling_factor``; "NTK" raises the base to
    ``theta * scaling_factor ** (head_dim / (head_dim - 2))`` (MindFormers' static NTK; HF's dynamic
    NTK reaches this base only at one sequence length). Always computed in float32, outside autocast.
    """
    dim, base, method = config.head_dim, float(config.theta), rope_method(config)
    if method == "NTK":
        base = base * config.scaling_factor ** (dim / (dim - 2))
    with torch.autocast(device_type=device.type, enabled=False):
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))  # (dim/2,)
        if positions is None:
            positions = torch.arange(seq_len, device=device)
        pos = positions.to(device=device, dtype=torch.float32)  # (seqlen,) or (bs, seqlen)
        if method == "PI":
            pos = pos / config.scaling_factor
        freqs = pos[..., None] * inv_freq  # (..., seqlen, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., seqlen, dim)
        return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor, dtype: torch.dtype) -> Tensor:
    """Rotate ``x`` (bs, seqlen, n_heads, head_dim) in ``dtype`` and return it in its own dtype.

    ``cos``/``sin`` are ``(seqlen, head_dim)`` (positions shared by the batch) or ``(bs, seqlen, head_dim)``.

    Autocast is off here: its ``cat`` promotion rejects a float16 tensor under bfloat16 autocast.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        xr = x.to(dtype)
        cos, sin = cos.to(dtype).unsqueeze(-2), sin.to(dtype).unsqueeze(-2)  # ([bs,] seqlen, 1, head_dim)
        return (xr * cos + rotate_half(xr) * sin).to(x.dtype)


class LlamaRMSNorm(nn.Module):
    """RMSNorm computed in ``compute_type`` (upcast, normalise, scale by weight), returned in the input dtype."""

    def __init__(self, dim: int, eps: float, compute_type: torch.dtype, param_dtype: torch.dtype) -> None:
        super().__init__()
        self.eps, self.compute_type = eps, compute_type
        self.weight = nn.Parameter(torch.ones(dim, dtype=param_dtype))

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(self.compute_type)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.to(self.compute_type)).to(x.dtype)


class LlamaEmbedding(nn.Module):
    """Token embedding whose parameter is MindFormers' ``embedding_weight`` ``[vocab, hidden]``."""

    def __init__(self, vocab_size: int, hidden_size: int, param_dtype: torch.dtype) -> None:
        super().__init__()
        self.embedding_weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=param_dtype))

    def forward(self, input_ids: Tensor) -> Tensor:
        return F.embedding(input_ids, self.embedding_weight)  # (bs, seqlen, hidden)


class LLamaAttention(nn.Module):
    """Causal self-attention with RoPE and grouped-query attention (``n_kv_heads`` <= ``num_heads``).

    Head counts are taken from the projection outputs (``view(..., -1, head_dim)``), so a
    tensor-parallel plan that shards wq/wk/wv on their output dim gives each rank its local heads.
    Softmax: SDPA accumulates it in float32 for half inputs (fused kernels, and the math kernel since
    torch 2.5), which is what ``softmax_compute_type: float32`` asks for; a float16 softmax is never used.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        pdt, hd = to_dtype(config.param_init_type), config.head_dim
        self.head_dim = hd
        self.use_flash_attention = config.use_flash_attention
        self.rotary_dtype = to_dtype(config.rotary_dtype)
        self.wq = nn.Linear(config.hidden_size, config.num_heads * hd, bias=False, dtype=pdt)
        self.wk = nn.Linear(config.hidden_size, config.n_kv_heads * hd, bias=False, dtype=pdt)
        self.wv = nn.Linear(config.hidden_size, config.n_kv_heads * hd, bias=False, dtype=pdt)
        self.wo = nn.Linear(config.num_heads * hd, config.hidden_size, bias=False, dtype=pdt)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | PackedSamples | None = None,
                cache: KVCache | None = None, layer_id: int = 0) -> Tensor:
        """``mask`` None: plain causal attention over ``x``. A ``PackedSamples``: causal attention within
        each packed sample. Otherwise a boolean ``attention_mask_4d`` over the cache's past slots plus
        ``x``; with ``cache``, this call's keys/values are appended to it first."""
        bs, seqlen, _ = x.shape
        xq = self.wq(x).view(bs, seqlen, -1, self.head_dim)  # (bs, seqlen, n_heads, head_dim)
        xk = self.wk(x).view(bs, seqlen, -1, self.head_dim)  # (bs, seqlen, n_kv_heads, head_dim)
        xv = self.wv(x).view(bs, seqlen, -1, self.head_dim)  # (bs, seqlen, n_kv_heads, head_dim)
        # Rotate in rotary_dtype (MindFormers casts q/k to it and back); float32 when compute is float32.
        rot = self.rotary_dtype if xq.dtype != torch.float32 else torch.float32
        xq, xk = apply_rotary_emb(xq, cos, sin, rot), apply_rotary_emb(xk, cos, sin, rot)
        if isinstance(mask, PackedSamples) and mask.cu_seqlens is not None:  # flash attention per sample
            cu, n = mask.cu_seqlens, mask.max_len
            out = _varlen_attn()(xq.flatten(0, 1), xk.flatten(0, 1), xv.flatten(0, 1), cu, n)
            return self.wo(out.reshape(bs, seqlen, -1))  # (bs, seqlen, hidden)
        if isinstance(mask, PackedSamples):
            mask = mask.mask
        q, k, v = (t.transpose(1, 2) for t in (xq, xk, xv))  # (bs, heads, seqlen, head_dim)
        if cache is not None:
            k, v = cache.update(layer_id, k, v)  # (bs, n_kv_heads, past + seqlen, head_dim)
        backend = nullcontext() if self.use_flash_attention else sdpa_kernel(SDPBackend.MATH)
        with backend:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=k.shape[1] != q.shape[1]
            )  # (bs, n_heads, seqlen, head_dim)
        return self.wo(out.transpose(1, 2).reshape(bs, seqlen, -1))  # (bs, seqlen, hidden)


class LlamaFeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``; w1 = gate, w3 = up, w2 = down; inner size ``ffn_hidden_size``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        pdt, dim, inner = to_dtype(config.param_init_type), config.hidden_size, config.ffn_hidden_size
        self.w1 = nn.Linear(dim, inner, bias=False, dtype=pdt)
        self.w2 = nn.Linear(inner, dim, bias=False, dtype=pdt)
        self.w3 = nn.Linear(dim, inner, bias=False, dtype=pdt)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (bs, seqlen, hidden)


class LLamaDecodeLayer(nn.Module):
    """Pre-norm block: ``h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h))``."""

    def __init__(self, config: LlamaConfig, layer_id: int) -> None:
        super().__init__()
        pdt, ln = to_dtype(config.param_init_type), to_dtype(config.layernorm_compute_type)
        self.layer_id = layer_id
        self.attention_norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps, ln, pdt)
        self.attention = LLamaAttention(config)
        self.ffn_norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps, ln, pdt)
        self.feed_forward = LlamaFeedForward(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | PackedSamples | None = None,
                cache: KVCache | None = None) -> Tensor:
        # mask/cache by keyword: a sequence-parallel plan prepares exactly the positional (x, cos, sin).
        h = x + self.attention(self.attention_norm(x), cos, sin, mask=mask, cache=cache, layer_id=self.layer_id)
        return h + self.feed_forward(self.ffn_norm(h))  # (bs, seqlen, hidden)


class LlamaModel(nn.Module):
    """Embedding, ``num_layers`` decoder layers, final norm. Returns hidden states (bs, seqlen, hidden).

    The residual stream is carried in ``compute_dtype`` (the embedding output is cast to it, as in
    MindFormers), so under bf16 autocast activations are bf16 while parameters stay in param_init_type.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        pdt, ln = to_dtype(config.param_init_type), to_dtype(config.layernorm_compute_type)
        self.config = config
        self.tok_embeddings = LlamaEmbedding(config.vocab_size, config.hidden_size, pdt)
        self.layers = nn.ModuleList(LLamaDecodeLayer(config, i) for i in range(config.num_layers))
        self.norm_out = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps, ln, pdt)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, attention_mask: Tensor | None = None,
                cache: KVCache | None = None, *, packed: bool = False) -> Tensor:
        """``positions`` (bs, seqlen) default to ``past .. past + seqlen - 1``; ``attention_mask``
        (bs, past + seqlen), 1 = real token, 0 = padding; ``past`` = ``cache.length`` (0 without a cache).
        ``packed``: each row holds several samples, each starting where ``positions`` is 0; a token
        attends only to earlier tokens of its own sample."""
        seqlen, past = tokens.shape[1], 0 if cache is None else cache.length
        if packed and (positions is None or cache is not None or attention_mask is not None):
            raise ValueError("packed=True takes positions (bs, seqlen) and no cache or attention_mask.")
        if positions is None and past:
            positions = torch.arange(past, past + seqlen, device=tokens.device)  # (seqlen,)
        cos, sin = rope_cos_sin(self.config, seqlen, tokens.device, positions)  # ([bs,] seqlen, head_dim) each
        mask: Tensor | PackedSamples | None = None  # training path: SDPA's own causal mask
        if packed:
            mask = packed_samples(positions, varlen=self._use_varlen(tokens), device=tokens.device)
        elif cache is not None or attention_mask is not None:
            mask = attention_mask_4d(seqlen, past, attention_mask, tokens.device)
        h = self.tok_embeddings(tokens).to(to_dtype(self.config.compute_dtype))  # (bs, seqlen, hidden)
        for layer in self.layers:
            h = layer(h, cos, sin, mask=mask, cache=cache)
        if cache is not None:
            cache.length += seqlen
        return self.norm_out(h)

    def _use_varlen(self, tokens: Tensor) -> bool:
        """Flash attention over variable-length samples: CUDA Ampere or newer, half compute, a head_dim
        flash supports (multiple of 8, <= 256), use_flash_attention; else the SDPA mask."""
        cfg = self.config
        if not (tokens.device.type == "cuda" and cfg.use_flash_attention and _varlen_attn() is not None
                and to_dtype(cfg.compute_dtype) in (torch.float16, torch.bfloat16)
                and cfg.head_dim % 8 == 0 and cfg.head_dim <= 256):
            return False
        return torch.cuda.get_device_capability(tokens.device) >= (8, 0)


class LlamaForCausalLM(nn.Module):
    """Llama2 decoder with an LM head; parameter names are MindFormers' (``state_dict`` holds no buffers).

    Invariants: every Linear is a plain ``nn.Linear`` (PET swaps them by attribute name, TP plans
    apply to them); RoPE tables are computed in ``forward`` from positions, so the model has no
    buffers and works after ``meta`` build + ``to_empty`` + ``init_weights``. With
    ``tie_word_embeddings`` ``lm_head.weight`` *is* ``model.tok_embeddings.embedding_weight`` (one
    Parameter, both keys appear in ``state_dict``). Parameters are in ``param_init_type``; when
    ``compute_dtype`` is not float32 the forward runs under ``torch.autocast(compute_dtype)``; logits and
    the loss are always float32.
    """

    def __init__(self, config: LlamaConfig | dict[str, Any]) -> None:
        super().__init__()
        self.config = LlamaConfig.from_dict(config) if isinstance(config, dict) else config
        _check_config(self.config)
        cfg = self.config
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=to_dtype(cfg.param_init_type))
        self.init_weights()

    def tie_weights(self) -> None:
        """With ``tie_word_embeddings``, make ``lm_head.weight`` the embedding's Parameter again
        (``to_empty`` gives shared Parameters separate storage)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.tok_embeddings.embedding_weight

    @torch.no_grad()
    def init_weights(self, fill: Fill | None = None) -> None:
        """(Re)initialise every parameter in place under the current torch RNG.

        Linear and embedding weights ~ N(0, initializer_range), norm weights = 1; re-ties lm_head to
        the embedding when ``tie_word_embeddings`` (``to_empty`` unties shared Parameters). Other
        submodules that define ``init_weights(fill)`` (e.g. PET layers swapped in) are delegated to.
        ``fill(param, init)`` applies an in-place ``init`` to a parameter (default: directly);
        sharded models pass one that draws the full tensor and keeps the local part.
        """
        fill = fill or fill_in_place
        self.tie_weights()
        normal = functools.partial(nn.init.normal_, mean=0.0, std=self.config.initializer_range)
        for module in self.modules():
            if module is self:
                continue
            if isinstance(module, LlamaEmbedding):
                fill(module.embedding_weight, normal)
            elif isinstance(module, LlamaRMSNorm):
                fill(module.weight, nn.init.ones_)
            elif hasattr(module, "init_weights"):
                module.init_weights(fill)
            elif isinstance(module, nn.Linear) and not (self.config.tie_word_embeddings and module is self.lm_head):
                fill(module.weight, normal)

    def forward(
        self, input_ids: Tensor, labels: Tensor | None = None, reduction: Literal["mean", "sum"] = "mean", *,
        positions: Tensor | None = None, attention_mask: Tensor | None = None, cache: KVCache | None = None,
        packed: bool = False, last_only: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits, or the next-token loss.

        - ``labels is None``: ``input_ids`` (bs, seqlen) -> float32 logits (bs, seqlen, vocab); with
          ``last_only``, of the last position only (bs, 1, vocab), which is all decoding reads.
        - ``labels`` given: ``input_ids`` and ``labels`` are records of seq_length+1 tokens; the model
          reads ``input_ids[:, :-1]`` and predicts ``labels[:, 1:]``. The float32 cross-entropy is
          summed over targets != ``ignore_token_id``; ``reduction="mean"`` returns sum / count (0 with a
          grad_fn, never NaN, when every target is ignored); ``reduction="sum"`` returns
          ``(sum_loss, num_tokens)`` for token-weighted averaging across micro-batches and ranks.

        MindFormers additionally masks positions whose *input* token equals ``pad_token_id``; mftune
        masks by label only, because its preprocessing already labels padding ``ignore_token_id``.

        Decoding (``mftune.generation``): ``cache`` (a ``KVCache``) makes ``input_ids`` the continuation
        of the tokens fed before; ``positions`` (bs, seqlen) and ``attention_mask`` (bs, past + seqlen)
        describe left-padded rows (see ``LlamaModel.forward``). All three None is the training path.

        Packed records (``scripts/llama_preprocess.py --packing``): ``packed=True`` with ``positions``,
        the records' position ids (the shape of ``input_ids``), restarting at 0 for each sample; every
        sample is attended to on its own (``PackedSamples``), so its logits and loss are the ones it
        gets alone.
        """
        cfg = self.config
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r} is invalid: expected 'mean' or 'sum'.")
        if labels is not None and cache is not None:
            raise ValueError("labels and cache are exclusive: the KV cache is for decoding, the loss for training.")
        tokens = input_ids if labels is None else input_ids[:, :-1]
        if packed:
            if positions is None or positions.shape != input_ids.shape:
                raise ValueError(f"packed=True needs positions of input_ids' shape {tuple(input_ids.shape)}, got "
                                 f"{None if positions is None else tuple(positions.shape)}.")
            positions = positions if labels is None else positions[:, :-1]
        elif labels is not None and positions is not None:
            raise ValueError("positions with labels are the position ids of packed records: pass packed=True.")
        compute = to_dtype(cfg.compute_dtype)
        amp = (
            torch.autocast(device_type=input_ids.device.type, dtype=compute)
            if compute != torch.float32 else nullcontext()
        )
        with amp:
            hidden = self.model(tokens, positions=positions, attention_mask=attention_mask, cache=cache,
                                packed=packed)
            if last_only and labels is None:
                hidden = hidden[:, -1:]
            logits = self.lm_head(hidden).float()  # (bs, seqlen, vocab)
        if labels is None:
            return logits
        targets = labels[:, 1:]  # (bs, seqlen)
        loss_sum = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=cfg.ignore_token_id, reduction="sum"
        )
        num_tokens = (targets != cfg.ignore_token_id).sum()
        if reduction == "sum":
            return loss_sum, num_tokens
        return loss_sum / num_tokens.clamp(min=1)


def model_config_errors(cfg: LlamaConfig) -> list[str]:
    """Every value problem of ``cfg``, each ``"<key>=<value> is invalid: <why>. <fix>"`` (keys of model_config).

    The single list of model checks: config validation prefixes ``model.model_config.`` and reports
    these with the rest of the config; ``LlamaForCausalLM`` raises them (``_check_config``). A rule
    that reads several keys runs only when each of them is valid on its own.
    """
    errors: list[str] = []

    def bad(key: str, why: str, fix: str) -> None:
        errors.append(f"{key}={getattr(cfg, key)!r} is invalid: {why}. {fix}")

    for key, fix in (("seq_length", "Use e.g. seq_length: 4096 (records hold seq_length + 1 tokens)."),
                     ("vocab_size", "Use the tokenizer's size, e.g. vocab_size: 32000."),
                     ("num_layers", "Use e.g. num_layers: 32."), ("num_heads", "Use e.g. num_heads: 32."),
                     ("hidden_size", "Use e.g. hidden_size: 4096."), ("n_kv_heads", "Use e.g. n_kv_heads: 8.")):
        value = getattr(cfg, key)
        if not (isinstance(value, int) and value > 0) and not (key == "n_kv_heads" and value == cfg.num_heads):
            bad(key, "must be a positive int", fix)  # n_kv_heads = num_heads: num_heads' error says it
    if not (isinstance(cfg.rms_norm_eps, (int, float)) and cfg.rms_norm_eps > 0):
        bad("rms_norm_eps", "must be > 0", "Use rms_norm_eps: 1.0e-5.")
    for key, fix in (("theta", "Use theta: 10000.0 (Llama2's RoPE base)."),
                     ("scaling_factor", "Use scaling_factor: 1.0 (no position interpolation).")):
        if not (isinstance(getattr(cfg, key), (int, float)) and getattr(cfg, key) > 0):
            bad(key, "must be > 0", fix)
    if not (isinstance(cfg.initializer_range, (int, float)) and cfg.initializer_range >= 0):
        bad("initializer_range", "must be >= 0 (it is a standard deviation)", "Use initializer_range: 0.02.")
    if not (isinstance(cfg.multiple_of, int) and cfg.multiple_of >= 1):
        bad("multiple_of", "must be an int >= 1", "Use multiple_of: 256.")
    if cfg.intermediate_size is not None and not (isinstance(cfg.intermediate_size, int)
                                                  and cfg.intermediate_size >= 1):
        bad("intermediate_size", "must be an int >= 1 when set", "Remove it to use the Llama2 FFN rule.")
    heads, kv, hidden = cfg.num_heads, cfg.n_kv_heads, cfg.hidden_size
    if all(isinstance(v, int) and v > 0 for v in (heads, kv, hidden)):
        if hidden % heads:
            even = heads * max(2, hidden // heads // 2 * 2)
            bad("hidden_size", f"it is not divisible by num_heads={heads}",
                f"Use num_heads x an even head_dim (e.g. {even}), or change num_heads.")
        elif hidden // heads % 2:
            bad("hidden_size", f"head_dim = hidden_size / num_heads = {hidden // heads} is odd "
                "(RoPE rotates pairs of channels)",
                f"Use num_heads x an even head_dim (e.g. {heads * (hidden // heads + 1)}), or change num_heads.")
        if heads % kv:
            bad("num_heads", f"it is not divisible by n_kv_heads={kv} (grouped-query attention)",
                "Use n_kv_heads dividing num_heads (n_kv_heads = num_heads disables GQA).")
    dtypes: dict[str, torch.dtype] = {}
    for key in ("compute_dtype", "layernorm_compute_type", "softmax_compute_type", "rotary_dtype", "param_init_type"):
        name = getattr(cfg, key)
        try:
            dtype = to_dtype(name)
        except ValueError:
            dtype = None
        if dtype in DTYPES.values():
            dtypes[key] = dtype
        else:
            close = difflib.get_close_matches(str(name).lower(), list(DTYPES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            bad(key, f"unknown dtype{hint}", "Use float32, float16 or bfloat16 (or fp32, fp16, bf16).")
    try:
        rope_method(cfg)
    except ValueError:
        bad("extend_method", "unknown RoPE extension", "Use None, PI or NTK.")
    compute, params = dtypes.get("compute_dtype"), dtypes.get("param_init_type")
    if compute == torch.float32 and params not in (None, torch.float32):
        half = str(params).removeprefix("torch.")
        bad("compute_dtype", f"float32 compute needs float32 parameters (param_init_type={cfg.param_init_type!r}): "
            f"without autocast, {half} weights would meet float32 activations",
            f"Set compute_dtype: {half} (the forward then runs under autocast), or param_init_type: float32.")
    return errors


def _check_config(cfg: LlamaConfig) -> None:
    """Raise every ``model_config_errors(cfg)`` message in one ValueError (nothing when valid)."""
    errors = model_config_errors(cfg)
    if errors:
        raise ValueError("invalid model_config:\n  " + "\n  ".join(errors))
