"""Llama as a plain ``nn.Module`` with MindFormers parameter names.

The modules are built from ``ModelArgs`` (architecture) and ``DtypePolicy`` (dtypes), both derived from
the ``LlamaConfig`` the model is given. No distributed code and no LoRA live here (see
``mftune.parallel`` and ``mftune.pet``). Parameter names are MindFormers' (reference/mindformers.md
§5); the layout is Hugging Face's (rotate-half RoPE, Linear weights [out, in]), so HF -> mftune is a
pure rename.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mftune.models.attention import (KVCache, PackedSamples, _varlen_attn, attention_mask_4d, hide_keys,
                                     packed_samples, pad_keys_visible, prefix_visible)
from mftune.models.config import (DtypePolicy, LlamaConfig, ModelArgs, check_model_config, dtype_policy,
                                  model_args)
from mftune.models.rope import apply_rotary_emb, rope_cos_sin

__all__ = ["Fill", "LlamaConfig", "LlamaForCausalLM", "LlamaModel", "fill_in_place", "pad_mask_id"]

Fill = Callable[[Tensor, Callable[[Tensor], Any]], None]


def fill_in_place(param: Tensor, init: Callable[[Tensor], Any]) -> None:
    """Default ``fill`` of ``init_weights``: apply the in-place initialiser to the parameter itself."""
    init(param)


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

    def __init__(self, args: ModelArgs, dtypes: DtypePolicy) -> None:
        super().__init__()
        pdt, hd = dtypes.param_init_type, args.head_dim
        self.head_dim = hd
        self.use_flash_attention = args.use_flash_attention
        self.rotary_dtype = dtypes.rotary_dtype
        self.wq = nn.Linear(args.hidden_size, args.num_heads * hd, bias=False, dtype=pdt)
        self.wk = nn.Linear(args.hidden_size, args.n_kv_heads * hd, bias=False, dtype=pdt)
        self.wv = nn.Linear(args.hidden_size, args.n_kv_heads * hd, bias=False, dtype=pdt)
        self.wo = nn.Linear(args.num_heads * hd, args.hidden_size, bias=False, dtype=pdt)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | PackedSamples | None = None,
                cache: KVCache | None = None, layer_id: int = 0, prefix: Tensor | None = None) -> Tensor:
        """``mask`` None: plain causal attention over ``x``. A ``PackedSamples``: causal attention within
        each packed sample. Otherwise a boolean ``attention_mask_4d`` over the cache's past slots plus
        ``x``; with ``cache``, this call's keys/values are appended to it first. ``prefix`` (bs, P, 2,
        n_kv_heads, head_dim): keys ``[:, :, 0]`` and values ``[:, :, 1]`` put before all others, not rotated
        (a prefix method's; ``mask`` then has their P columns first)."""
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
        if prefix is not None:  # MindFormers casts the prefix to compute_dtype and concatenates it in front
            pk, pv = (prefix[:, :, i].transpose(1, 2).to(k.dtype) for i in (0, 1))  # (bs, n_kv_heads, P, head_dim)
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        backend = nullcontext() if self.use_flash_attention else sdpa_kernel(SDPBackend.MATH)
        with backend:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=k.shape[1] != q.shape[1]
            )  # (bs, n_heads, seqlen, head_dim)
        return self.wo(out.transpose(1, 2).reshape(bs, seqlen, -1))  # (bs, seqlen, hidden)


class LlamaFeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``; w1 = gate, w3 = up, w2 = down; inner size ``ffn_hidden_size``."""

    def __init__(self, args: ModelArgs, dtypes: DtypePolicy) -> None:
        super().__init__()
        pdt, dim, inner = dtypes.param_init_type, args.hidden_size, args.ffn_hidden_size
        self.w1 = nn.Linear(dim, inner, bias=False, dtype=pdt)
        self.w2 = nn.Linear(inner, dim, bias=False, dtype=pdt)
        self.w3 = nn.Linear(dim, inner, bias=False, dtype=pdt)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (bs, seqlen, hidden)


class LLamaDecodeLayer(nn.Module):
    """Pre-norm block: ``h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h))``."""

    def __init__(self, args: ModelArgs, dtypes: DtypePolicy, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        ln, pdt = dtypes.layernorm_compute_type, dtypes.param_init_type
        self.attention_norm = LlamaRMSNorm(args.hidden_size, args.rms_norm_eps, ln, pdt)
        self.attention = LLamaAttention(args, dtypes)
        self.ffn_norm = LlamaRMSNorm(args.hidden_size, args.rms_norm_eps, ln, pdt)
        self.feed_forward = LlamaFeedForward(args, dtypes)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | PackedSamples | None = None,
                cache: KVCache | None = None, prefix: Tensor | None = None) -> Tensor:
        # mask/cache/prefix by keyword: a sequence-parallel plan prepares exactly the positional (x, cos, sin).
        h = x + self.attention(self.attention_norm(x), cos, sin, mask=mask, cache=cache, layer_id=self.layer_id,
                               prefix=prefix)
        return h + self.feed_forward(self.ffn_norm(h))  # (bs, seqlen, hidden)


class LlamaModel(nn.Module):
    """Embedding, ``num_layers`` decoder layers, final norm. Returns hidden states (bs, seqlen, hidden).

    The residual stream is carried in ``compute_dtype`` (the embedding output is cast to it, as in
    MindFormers), so under bf16 autocast activations are bf16 while parameters stay in param_init_type.
    """

    def __init__(self, args: ModelArgs, dtypes: DtypePolicy) -> None:
        super().__init__()
        self.args, self.dtypes = args, dtypes
        ln, pdt = dtypes.layernorm_compute_type, dtypes.param_init_type
        self.tok_embeddings = LlamaEmbedding(args.vocab_size, args.hidden_size, dtypes.embedding_init_type)
        self.layers = nn.ModuleList(LLamaDecodeLayer(args, dtypes, i) for i in range(args.num_layers))
        self.norm_out = LlamaRMSNorm(args.hidden_size, args.rms_norm_eps, ln, pdt)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, attention_mask: Tensor | None = None,
                cache: KVCache | None = None, *, packed: bool = False, pad_id: int | None = None,
                prefix: Tensor | None = None) -> Tensor:
        """``positions`` (bs, seqlen) default to ``past .. past + seqlen - 1``; ``attention_mask``
        (bs, past + seqlen), 1 = real token, 0 = padding; ``past`` = ``cache.length`` (0 without a cache).
        ``packed``: each row holds several samples, each starting where ``positions`` is 0; a token
        attends only to earlier tokens of its own sample. ``pad_id`` (not with a cache or
        attention_mask): no query attends to a token equal to it (MindFormers' attention mask from
        ``pad_token_id``; ``hide_keys``). ``prefix`` (bs, P, 2 * num_layers, n_kv_heads, head_dim): every
        layer's prefix keys/values (``[:, :, 2 i]``, ``[:, :, 2 i + 1]``), seen by every query; positions are not
        shifted by P (MindFormers' prefix tuning)."""
        seqlen, past = tokens.shape[1], 0 if cache is None else cache.length
        if packed and (positions is None or cache is not None or attention_mask is not None):
            raise ValueError("packed=True takes positions (bs, seqlen) and no cache or attention_mask.")
        if pad_id is not None and (cache is not None or attention_mask is not None):
            raise ValueError("pad_id hides pad tokens in training and scoring; decoding passes attention_mask.")
        if positions is None and past:
            positions = torch.arange(past, past + seqlen, device=tokens.device)  # (seqlen,)
        cos, sin = rope_cos_sin(self.args, seqlen, tokens.device, positions)  # ([bs,] seqlen, head_dim) each
        mask = self._mask(tokens, positions, attention_mask, cache, packed, pad_id, prefix is not None)
        if prefix is not None:
            mask = prefix_visible(mask, prefix.shape[1], seqlen, tokens.device)
        h = self.tok_embeddings(tokens).to(self.dtypes.compute_dtype)  # (bs, seqlen, hidden)
        for i, layer in enumerate(self.layers):
            kv = None if prefix is None else prefix[:, :, 2 * i:2 * i + 2]  # (bs, P, 2, n_kv_heads, head_dim)
            h = layer(h, cos, sin, mask=mask, cache=cache, prefix=kv)
        if cache is not None:
            cache.length += seqlen
        return self.norm_out(h)

    def _mask(self, tokens: Tensor, positions: Tensor | None, attention_mask: Tensor | None,
              cache: KVCache | None, packed: bool, pad_id: int | None,
              prefix: bool = False) -> Tensor | PackedSamples | None:
        """What attention may see (see ``forward``); None: SDPA's own causal mask (the training path).
        Pad keys are hidden only where a pad precedes a real token (``pad_keys_visible``): elsewhere
        causal attention already keeps them from every query that is not itself a pad."""
        hide = pad_id is not None and pad_keys_visible(tokens, pad_id)
        if packed:  # the varlen kernel takes no mask: hiding pad keys needs the SDPA one
            varlen = not hide and not prefix and self._use_varlen(tokens)  # the prefix needs the mask too
            samples = packed_samples(positions, varlen=varlen, device=tokens.device)
            if hide:
                samples.mask = hide_keys(samples.mask, tokens != pad_id)
            return samples
        if cache is not None or attention_mask is not None:
            return attention_mask_4d(tokens.shape[1], 0 if cache is None else cache.length, attention_mask,
                                     tokens.device)
        return hide_keys(None, tokens != pad_id) if hide else None

    def _use_varlen(self, tokens: Tensor) -> bool:
        """Flash attention over variable-length samples: CUDA Ampere or newer, half compute, a head_dim
        flash supports (multiple of 8, <= 256), use_flash_attention; else the SDPA mask."""
        args = self.args
        if not (tokens.device.type == "cuda" and args.use_flash_attention and _varlen_attn() is not None
                and self.dtypes.compute_dtype in (torch.float16, torch.bfloat16)
                and args.head_dim % 8 == 0 and args.head_dim <= 256):
            return False
        return torch.cuda.get_device_capability(tokens.device) >= (8, 0)


def pad_mask_id(config: LlamaConfig) -> int | None:
    """The token id hidden from attention and dropped from the loss as an input (MindFormers'
    ``pad_token_id`` semantics), or None when ``mask_pad_token`` resolves to off.

    ``mask_pad_token`` True/False decides; None (the default) means on unless ``pad_token_id`` is the
    ``bos_token_id`` or one of the ``eos_token_id``: such a pad id (Hugging Face models whose pad is
    their eos) is also a real token of every sample, which must stay visible and trained on.
    """
    if config.mask_pad_token is not None:
        return config.pad_token_id if config.mask_pad_token else None
    eos = config.eos_token_id if isinstance(config.eos_token_id, (list, tuple)) else [config.eos_token_id]
    return None if config.pad_token_id in (config.bos_token_id, *eos) else config.pad_token_id


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
        check_model_config(self.config)
        self.args, self.dtypes = model_args(self.config), dtype_policy(self.config)
        self.model = LlamaModel(self.args, self.dtypes)
        self.lm_head = nn.Linear(self.args.hidden_size, self.args.vocab_size, bias=False,
                                 dtype=self.dtypes.param_init_type)
        self.pad_mask_id = pad_mask_id(self.config)  # the trainer logs it when not None
        self.set_prefix_encoder(None)
        self.init_weights()

    def set_prefix_encoder(self, encoder: Callable[[int, bool], Tensor] | None) -> None:
        """Give every layer's attention a prefix: ``encoder(batch_size, training)`` returns the keys/values
        ``(bs, P, 2 * num_layers, n_kv_heads, head_dim)`` (``mftune.pet.prefix``). Kept out of the module tree
        (``self.__dict__``): its parameters are registered on this model under MindFormers' names."""
        self.__dict__["prefix_encoder"] = encoder

    def tie_weights(self) -> None:
        """With ``tie_word_embeddings``, make ``lm_head.weight`` the embedding's Parameter again
        (``to_empty`` gives shared Parameters separate storage)."""
        if self.args.tie_word_embeddings:
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
        normal = functools.partial(nn.init.normal_, mean=0.0, std=self.args.initializer_range)
        for module in self.modules():
            if module is self:
                continue
            if isinstance(module, LlamaEmbedding):
                fill(module.embedding_weight, normal)
            elif isinstance(module, LlamaRMSNorm):
                fill(module.weight, nn.init.ones_)
            elif hasattr(module, "init_weights"):
                module.init_weights(fill)
            elif isinstance(module, nn.Linear) and not (self.args.tie_word_embeddings and module is self.lm_head):
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
          summed over the ``loss_targets`` (targets != ``ignore_token_id``, by default also dropping
          positions whose input is the pad id); ``reduction="mean"`` returns sum / count (0 with a
          grad_fn, never NaN, when every target is ignored); ``reduction="sum"`` returns
          ``(sum_loss, num_tokens)`` for token-weighted averaging across micro-batches and ranks.

        Pad tokens (``pad_mask_id``, MindFormers' semantics, on by default): without a cache or
        ``attention_mask``, no query attends to an input equal to the pad id. Logits where the input
        is the pad id are MindFormers' when a pad precedes a real token in the batch (what eval
        scores); a right-padded batch keeps plain causal attention there, which no loss reads.

        Decoding (``mftune.generation``): ``cache`` (a ``KVCache``) makes ``input_ids`` the continuation
        of the tokens fed before; ``positions`` (bs, seqlen) and ``attention_mask`` (bs, past + seqlen)
        describe left-padded rows (see ``LlamaModel.forward``). All three None is the training path.

        Packed records (``scripts/llama_preprocess.py --packing``): ``packed=True`` with ``positions``,
        the records' position ids (the shape of ``input_ids``), restarting at 0 for each sample; every
        sample is attended to on its own (``PackedSamples``), so its logits and loss are the ones it
        gets alone.
        """
        tokens, positions = _model_inputs(input_ids, labels, reduction, positions, cache, packed)
        compute = self.dtypes.compute_dtype
        amp = (
            torch.autocast(device_type=input_ids.device.type, dtype=compute)
            if compute != torch.float32 else nullcontext()
        )
        prefix = self._prefix(tokens.shape[0], cache)
        with amp:
            decoding = cache is not None or attention_mask is not None
            hidden = self.model(tokens, positions=positions, attention_mask=attention_mask, cache=cache,
                                packed=packed, pad_id=None if decoding else self.pad_mask_id, prefix=prefix)
            if last_only and labels is None:
                hidden = hidden[:, -1:]
            logits = self.lm_head(hidden).float()  # (bs, seqlen, vocab)
        if labels is None:
            return logits
        targets = self.loss_targets(input_ids, labels)  # (bs, seqlen)
        ignore = self.args.ignore_token_id
        loss_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore, reduction="sum")
        num_tokens = (targets != ignore).sum()
        if reduction == "sum":
            return loss_sum, num_tokens
        return loss_sum / num_tokens.clamp(min=1)

    def _prefix(self, batch_size: int, cache: KVCache | None) -> Tensor | None:
        """The prefix keys/values of a prefix method (None without one), computed once per ``cache``."""
        encoder = self.__dict__["prefix_encoder"]
        if encoder is None:
            return None
        if cache is not None and cache.prefix is not None:
            return cache.prefix
        prefix = encoder(batch_size, self.training)
        if cache is not None:
            cache.prefix = prefix
        return prefix

    def loss_targets(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        """The next-token targets of records (bs, seq_length + 1): ``labels[:, 1:]``, with
        ``ignore_token_id`` where the input token is ``pad_mask_id`` (MindFormers' input mask). What
        the loss is summed over, and what the trainer counts to average it."""
        targets = labels[:, 1:]  # (bs, seqlen)
        if self.pad_mask_id is None:
            return targets
        return targets.masked_fill(input_ids[:, :-1] == self.pad_mask_id, self.args.ignore_token_id)


def _model_inputs(input_ids: Tensor, labels: Tensor | None, reduction: str, positions: Tensor | None,
                  cache: KVCache | None, packed: bool) -> tuple[Tensor, Tensor | None]:
    """(the tokens the decoder reads, their positions), with the argument combinations checked: with
    labels a record's last token is only a target."""
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
    return tokens, positions
