"""``model.model_config``: ``LlamaConfig``, the YAML and Python API contract, and what the model is
built from: ``ModelArgs`` (the architecture) and ``DtypePolicy`` (the dtypes).

``LlamaConfig`` takes a MindFormers ``model_config`` block as it is (``LlamaConfig(**model_config)``);
it also carries settings that are not the model's: decoding (read by ``mftune.generation``), the
predict batch size, and keys accepted for MindFormers compatibility with no effect here (their field
metadata says why). ``model_config_errors`` is the single list of rules on its values.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

# Every dtype string mftune accepts (any case): the one table that the model, config validation,
# pet_config (mftune.pet.config) and the HF config translation (mftune.checkpoint.names) read.
# MindFormers' long names plus MindPet's short ones.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
RopeMethod = Literal["None", "PI", "NTK", "DYNAMIC_NTK", "LLAMA3"]
ROPE_METHODS = ("PI", "NTK", "DYNAMIC_NTK", "LLAMA3")  # besides None
# extend_method LLAMA3: scaling_factor is a mapping of exactly these keys (MindFormers' FreqsMgr, HF rope_type llama3)
LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def to_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map a MindFormers dtype string ("bfloat16", "float16", "float32") to a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {sorted(set(DTYPES))}") from None


def ignored(default: Any, why: str) -> Any:
    """A field accepted for MindFormers compatibility that has no effect here (``why`` says so; the
    config loader reports such keys once, docs/config.md lists them). A callable ``default`` (``dict``)
    is a default factory."""
    if callable(default):
        return field(default_factory=default, metadata={"ignored": why})
    return field(default=default, metadata={"ignored": why})


@dataclass
class LlamaConfig:
    """``model.model_config`` of a MindFormers Llama YAML; every field is a YAML key."""

    type: str = "LlamaConfig"  # YAML registry name; only LlamaConfig exists
    batch_size: int = 1  # predict batch size (training uses runner_config.batch_size)
    # architecture (-> ModelArgs)
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
    # PI / NTK / DYNAMIC_NTK: a number; LLAMA3: {factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings}. DYNAMIC_NTK's original context length is max_position_embedding.
    scaling_factor: float | dict[str, float] = 1.0
    extend_method: str = "None"  # None | PI | NTK | DYNAMIC_NTK | LLAMA3
    # token ids
    bos_token_id: int = 1
    eos_token_id: int | list[int] = 2
    pad_token_id: int = 0
    ignore_token_id: int = -100  # labels equal to it are not trained on
    mask_pad_token: bool | None = None  # hide inputs == pad_token_id, drop their loss; None: unless pad is bos/eos
    # dtypes (-> DtypePolicy)
    compute_dtype: str = "float16"
    layernorm_compute_type: str = "float32"
    softmax_compute_type: str = "float32"  # SDPA accumulates softmax in float32 whatever this says
    rotary_dtype: str = "float32"
    param_init_type: str = "float32"
    # architecture, continued
    initializer_range: float = 0.02  # std of the normal init of weights
    tie_word_embeddings: bool = False
    use_past: bool = False  # KV cache for predict (predict always decodes with one)
    use_flash_attention: bool = True  # SDPA picks the fused kernel; False forces the math path
    embedding_init_type: str | None = None  # dtype of the embedding table; None = param_init_type
    init_method_std: float | None = None  # MindFormers' name for initializer_range (r1.5); wins when set
    residual_dtype: str | None = None  # None = compute_dtype, the only residual dtype mftune carries (checked)
    qkv_has_bias: bool = False  # must be False: Llama's wq/wk/wv have no bias (checked)
    attn_proj_has_bias: bool = False  # must be False: Llama's wo has no bias (checked)
    # wq/wk/wv (w1/w3) as one matmul in MindFormers; mftune keeps them separate and splits a fused checkpoint
    # (w_qkv / w_gate_hidden) when it loads one (mftune.checkpoint.fused), whatever this says
    qkv_concat: bool = ignored(False, "a fused w_qkv / w_gate_hidden checkpoint is split when loaded")
    calculate_per_token_loss: bool = False  # must be False: the loss is the mean over each micro-batch (checked)
    use_ring_attention: bool = False  # must be False: needs context parallelism (checked)
    moe_config: dict[str, Any] | None = None  # accepted only without experts (expert_num <= 1, checked)
    # quantized inference (RTN / smooth-quant / PTQ): refused with one message (mftune.config.checks)
    quantization_config: dict[str, Any] | None = None
    quant_config: dict[str, Any] | None = None
    offset: Any = 0  # layers added per pipeline stage (int or list): which layers per-stage recompute counts pick
    pipeline_stage: Any = ignored(None, "pipeline stage placement: pipeline stages run as data parallel")
    pp_interleave_num: int = ignored(1, "pipeline interleaving: pipeline stages run as data parallel")
    parallel_config: Any = ignored(None, "MindFormers copies the top-level parallel_config here; that one is read")
    parallel_optimizer: bool = ignored(False, "parallel.enable_parallel_optimizer is read")
    fine_grain_interleave: int = ignored(1, "Ascend communication/computation overlap inside a layer")
    use_rope_slice: bool = ignored(False, "the same rotate-half RoPE written with slices (identical values)")
    fused_rms_norm: bool = ignored(True, "Ascend fused RmsNorm kernel (same maths)")
    rmsnorm_compute_2d: bool = ignored(False, "Ascend RmsNorm on a 2-D view (same maths)")
    use_attn_mask_compression: bool = ignored(False, "Ascend flash-attention mask layout")
    use_eod_attn_mask_compression: bool = ignored(False, "Ascend flash-attention mask layout")
    input_sliced_sig: bool = ignored(False, "records hold seq_length + 1 tokens; inputs and labels are their shifts")
    chunk_prefill: bool = ignored(False, "MindSpore serving (paged attention)")
    llm_backend: str = ignored("", "MindSpore serving backend")
    return_hidden_states: bool = ignored(False, "MindSpore serving")
    auto_map: dict[str, Any] = ignored(dict, "names MindFormers' Python classes for its auto classes")
    checkpoint_name_or_path: str = ignored("", "weights come from load_checkpoint (a model name is not downloaded)")
    # decoding (-> mftune.generation.GenerationConfig)
    repetition_penalty: float = 1.0
    max_decode_length: int = 512  # prompt + generated tokens
    top_k: int = 5
    top_p: float = 1.0
    temperature: float = 1.0
    do_sample: bool = False
    block_size: int = ignored(16, "paged attention (MindSpore inference)")
    num_blocks: int = ignored(512, "paged attention (MindSpore inference)")
    is_dynamic: bool = ignored(False, "MindSpore dynamic-shape inference")
    pet_config: dict[str, Any] | None = None  # PET settings, consumed by mftune.pet

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.num_heads
        if self.max_position_embedding is None:
            self.max_position_embedding = self.seq_length
        if self.init_method_std is not None:  # MindFormers r1.5's name for the init std
            self.initializer_range = self.init_method_std

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


@dataclass(frozen=True)
class ModelArgs:
    """What ``LlamaForCausalLM``'s modules are built from: the architecture (and the loss's ignore id).
    Fields keep their ``model_config`` names, so a YAML key leads here and on to the code by grep."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    n_kv_heads: int
    ffn_hidden_size: int  # intermediate_size, or the Llama2 rule (LlamaConfig.ffn_hidden_size)
    rms_norm_eps: float
    theta: float  # RoPE base
    extend_method: RopeMethod  # normalised: "PI" divides positions by scaling_factor; "NTK" raises the base;
    scaling_factor: float | dict[str, float]  # "DYNAMIC_NTK" raises it with the length; "LLAMA3" rescales by band
    initializer_range: float
    tie_word_embeddings: bool
    use_flash_attention: bool
    ignore_token_id: int
    # DYNAMIC_NTK's original context length (model_config.max_position_embedding, HF max_position_embeddings);
    # None for the other methods, whose RoPE does not depend on it (so checkpoints are compared on it only then)
    max_position_embedding: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class DtypePolicy:
    """The torch dtypes of the ``model_config`` dtype keys: parameters are stored in ``param_init_type``;
    the forward runs under autocast to ``compute_dtype`` (none when float32); norms compute in
    ``layernorm_compute_type``, RoPE rotates in ``rotary_dtype``. The embedding table is stored in
    ``embedding_init_type`` (``param_init_type`` unless set, as in MindFormers)."""

    param_init_type: torch.dtype
    compute_dtype: torch.dtype
    layernorm_compute_type: torch.dtype
    rotary_dtype: torch.dtype
    embedding_init_type: torch.dtype


def model_args(cfg: LlamaConfig) -> ModelArgs:
    """The architecture of a valid ``cfg`` (``check_model_config``)."""
    return ModelArgs(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                     num_heads=cfg.num_heads, n_kv_heads=cfg.n_kv_heads, ffn_hidden_size=cfg.ffn_hidden_size,
                     rms_norm_eps=cfg.rms_norm_eps, theta=float(cfg.theta),
                     extend_method=rope_method(cfg.extend_method), scaling_factor=_scaling(cfg.scaling_factor),
                     initializer_range=cfg.initializer_range, tie_word_embeddings=cfg.tie_word_embeddings,
                     use_flash_attention=cfg.use_flash_attention, ignore_token_id=cfg.ignore_token_id,
                     max_position_embedding=cfg.max_position_embedding if rope_method(cfg.extend_method) ==
                     "DYNAMIC_NTK" else None)


def dtype_policy(cfg: LlamaConfig) -> DtypePolicy:
    """The dtypes of a valid ``cfg`` (``check_model_config``)."""
    return DtypePolicy(param_init_type=to_dtype(cfg.param_init_type), compute_dtype=to_dtype(cfg.compute_dtype),
                       layernorm_compute_type=to_dtype(cfg.layernorm_compute_type),
                       rotary_dtype=to_dtype(cfg.rotary_dtype),
                       embedding_init_type=to_dtype(cfg.embedding_init_type or cfg.param_init_type))


def _scaling(value: float | dict[str, float]) -> float | dict[str, float]:
    """``scaling_factor`` as ModelArgs carries it: a float, or LLAMA3's mapping with float values."""
    if isinstance(value, dict):
        return {k: float(value[k]) for k in LLAMA3_SCALING_KEYS}
    return float(value)


def rope_method(extend_method: Any) -> RopeMethod:
    """Normalise ``extend_method`` (None | "None" | ``ROPE_METHODS``, any case); anything else is a ValueError."""
    method = "None" if extend_method is None else str(extend_method)
    if method.lower() == "none":
        return "None"
    if method.upper() in ROPE_METHODS:
        return method.upper()  # type: ignore[return-value]
    raise ValueError(f"extend_method={extend_method!r} is invalid: expected None, 'PI', 'NTK', 'DYNAMIC_NTK' or "
                     "'LLAMA3'.")


# ----------------------------------------------------------------------------------------------
# Rules on the values
# ----------------------------------------------------------------------------------------------

def check_model_config(cfg: LlamaConfig) -> None:
    """Raise every ``model_config_errors(cfg)`` message in one ValueError (nothing when valid)."""
    errors = model_config_errors(cfg)
    if errors:
        raise ValueError("invalid model_config:\n  " + "\n  ".join(errors))


def model_config_errors(cfg: LlamaConfig) -> list[str]:
    """Every value problem of ``cfg``, each ``"<key>=<value> is invalid: <why>. <fix>"`` (keys of model_config).

    The single list of model checks: config validation prefixes ``model.model_config.`` and reports
    these with the rest of the config; ``LlamaForCausalLM`` raises them (``check_model_config``). A
    rule that reads several keys runs only when each of them is valid on its own.
    """
    errors: list[str] = []

    def bad(key: str, why: str, fix: str) -> None:
        errors.append(f"{key}={getattr(cfg, key)!r} is invalid: {why}. {fix}")

    _check_sizes(cfg, bad)
    _check_shapes(cfg, bad)
    dtypes = _check_dtypes(cfg, bad)
    _check_rope(cfg, bad)
    _check_unsupported(cfg, bad, dtypes)
    compute, params = dtypes.get("compute_dtype"), dtypes.get("param_init_type")
    if compute == torch.float32 and params not in (None, torch.float32):
        half = str(params).removeprefix("torch.")
        bad("compute_dtype", f"float32 compute needs float32 parameters (param_init_type={cfg.param_init_type!r}): "
            f"without autocast, {half} weights would meet float32 activations",
            f"Set compute_dtype: {half} (the forward then runs under autocast), or param_init_type: float32.")
    embedding = dtypes.get("embedding_init_type")
    if compute == torch.float32 and cfg.tie_word_embeddings and embedding not in (None, torch.float32):
        bad("embedding_init_type", "with tie_word_embeddings the embedding table is also lm_head, and float32 "
            "compute has no autocast to meet its half-precision weight", "Use embedding_init_type: float32.")
    return errors


def _check_sizes(cfg: LlamaConfig, bad) -> None:
    """Each size and scalar on its own."""
    for key, fix in (("seq_length", "Use e.g. seq_length: 4096 (records hold seq_length + 1 tokens)."),
                     ("vocab_size", "Use the tokenizer's size, e.g. vocab_size: 32000."),
                     ("num_layers", "Use e.g. num_layers: 32."), ("num_heads", "Use e.g. num_heads: 32."),
                     ("hidden_size", "Use e.g. hidden_size: 4096."), ("n_kv_heads", "Use e.g. n_kv_heads: 8.")):
        value = getattr(cfg, key)
        if not (isinstance(value, int) and value > 0) and not (key == "n_kv_heads" and value == cfg.num_heads):
            bad(key, "must be a positive int", fix)  # n_kv_heads = num_heads: num_heads' error says it
    if not (isinstance(cfg.rms_norm_eps, (int, float)) and cfg.rms_norm_eps > 0):
        bad("rms_norm_eps", "must be > 0", "Use rms_norm_eps: 1.0e-5.")
    if not (isinstance(cfg.theta, (int, float)) and cfg.theta > 0):
        bad("theta", "must be > 0", "Use theta: 10000.0 (Llama2's RoPE base).")
    if not (isinstance(cfg.initializer_range, (int, float)) and cfg.initializer_range >= 0):
        bad("initializer_range", "must be >= 0 (it is a standard deviation)", "Use initializer_range: 0.02.")
    if not (isinstance(cfg.multiple_of, int) and cfg.multiple_of >= 1):
        bad("multiple_of", "must be an int >= 1", "Use multiple_of: 256.")
    if cfg.intermediate_size is not None and not (isinstance(cfg.intermediate_size, int)
                                                  and cfg.intermediate_size >= 1):
        bad("intermediate_size", "must be an int >= 1 when set", "Remove it to use the Llama2 FFN rule.")


def _check_unsupported(cfg: LlamaConfig, bad, dtypes: dict[str, torch.dtype]) -> None:
    """MindFormers keys whose non-default values change the model in ways mftune does not build."""
    for key, why, fix in (
            ("qkv_has_bias", "mftune's Llama has no bias on wq/wk/wv", "Use qkv_has_bias: False."),
            ("attn_proj_has_bias", "mftune's Llama has no bias on wo", "Use attn_proj_has_bias: False."),
            ("calculate_per_token_loss", "the loss is the mean over each micro-batch's labelled tokens",
             "Use calculate_per_token_loss: False."),
            ("use_ring_attention", "ring attention needs context parallelism, which mftune does not have",
             "Use use_ring_attention: False.")):
        if getattr(cfg, key) is True:
            bad(key, why, fix)
    residual, compute = dtypes.get("residual_dtype"), dtypes.get("compute_dtype")
    if residual is not None and compute is not None and residual != compute:
        bad("residual_dtype", f"mftune carries the residual stream in compute_dtype={cfg.compute_dtype!r}",
            "Remove residual_dtype, or set it to compute_dtype.")
    experts = (cfg.moe_config or {}).get("expert_num", 1)
    if isinstance(experts, int) and experts > 1:
        bad("moe_config", f"expert_num={experts}: mftune's Llama has no mixture-of-experts layers",
            "Remove moe_config (or set expert_num: 1).")
    if cfg.init_method_std is not None and not (isinstance(cfg.init_method_std, (int, float))
                                                and cfg.init_method_std >= 0):
        bad("init_method_std", "must be >= 0 (it is a standard deviation)", "Use init_method_std: 0.02.")


def _check_rope(cfg: LlamaConfig, bad) -> None:
    """extend_method and its scaling_factor: a number > 0, or for LLAMA3 MindFormers' mapping
    (high_freq_factor must exceed low_freq_factor, as the band between them is interpolated).
    DYNAMIC_NTK also reads max_position_embedding (its original context length): an int >= 1."""
    try:
        method = rope_method(cfg.extend_method)
    except ValueError:
        bad("extend_method", "unknown RoPE extension", "Use None, PI, NTK, DYNAMIC_NTK or LLAMA3.")
        method = None
    longest = cfg.max_position_embedding
    if method == "DYNAMIC_NTK" and not (isinstance(longest, int) and not isinstance(longest, bool) and longest >= 1):
        bad("max_position_embedding", "extend_method DYNAMIC_NTK scales RoPE beyond this original context "
            "length, so it must be an int >= 1", "Use the length the model was trained for (HF "
            "max_position_embeddings), e.g. max_position_embedding: 4096.")
    value = cfg.scaling_factor
    example = ("{factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192}")
    if method != "LLAMA3":
        if isinstance(value, dict):
            bad("scaling_factor", f"a mapping is for extend_method LLAMA3, not {cfg.extend_method!r}",
                "Use a number (1.0: no scaling), or extend_method: LLAMA3.")
        elif not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            bad("scaling_factor", "must be > 0", "Use e.g. scaling_factor: 2.0 (config.json's rope_scaling factor)."
                if method == "DYNAMIC_NTK" else "Use scaling_factor: 1.0 (no position interpolation).")
        return
    if not isinstance(value, dict) or set(value) != set(LLAMA3_SCALING_KEYS):
        got = f"keys {sorted(value)}" if isinstance(value, dict) else "a number"
        bad("scaling_factor", f"extend_method LLAMA3 takes a mapping of exactly {', '.join(LLAMA3_SCALING_KEYS)}; "
            f"got {got}", f"Use scaling_factor: {example} (Llama 3.1's).")
        return
    num = {k: v for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if len(num) < 4 or num["factor"] < 1 or num["low_freq_factor"] <= 0 or \
            num["high_freq_factor"] <= num["low_freq_factor"] or \
            not float(num["original_max_position_embeddings"]).is_integer() or \
            num["original_max_position_embeddings"] < 1:
        bad("scaling_factor", "LLAMA3 needs numbers with factor >= 1, 0 < low_freq_factor < high_freq_factor "
            "and an integer original_max_position_embeddings >= 1", f"Use e.g. {example}.")


def _check_shapes(cfg: LlamaConfig, bad) -> None:
    """How the head counts and the hidden size fit together (when each is a positive int)."""
    heads, kv, hidden = cfg.num_heads, cfg.n_kv_heads, cfg.hidden_size
    if not all(isinstance(v, int) and v > 0 for v in (heads, kv, hidden)):
        return
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


def _check_dtypes(cfg: LlamaConfig, bad) -> dict[str, torch.dtype]:
    """The dtype keys that name a known dtype, by key; an error for each that does not."""
    dtypes: dict[str, torch.dtype] = {}
    for key in ("compute_dtype", "layernorm_compute_type", "softmax_compute_type", "rotary_dtype", "param_init_type",
                "embedding_init_type", "residual_dtype"):
        name = getattr(cfg, key)
        if name is None and key in ("embedding_init_type", "residual_dtype"):
            continue  # None: param_init_type / compute_dtype
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
    return dtypes
