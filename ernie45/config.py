"""One frozen, validated config for every ERNIE 4.5 checkpoint flavour.

HF ships four config layouts (reference §A):

* ``ernie4_5``         dense (0.3B), optional ``head_dim``;
* ``ernie4_5_moe``     text MoE (21B, 300B), MoE pattern from ``moe_layer_{start,interval,end}_index``;
* ``ernie4_5_vl_moe``  nested VL (``text_config`` / ``vision_config``), MoE pattern from ``mlp_layer_types``;
* ``ernie4_5_moe_vl``  the flat custom layout of the Thinking model: list-valued ``moe_num_experts`` /
  ``moe_intermediate_size`` / ``moe_layer_*``, a DFNRope vision config with ``embed_dim`` + ``mlp_ratio``.

They are normalised here, once, into :class:`ErnieConfig`. Nothing downstream (model specs, bridge tables, GGUF
writer) reads a raw HF dict again, and nothing downstream recomputes the dense/MoE rule: it reads
``cfg.mlp_layer_types``.

A missing required field is a :class:`ConfigError` naming the field; there are no silent defaults. The only
defaults applied are the ones the HF code itself applies, each given with its reason where it is read
(``_Reader.opt``). Every key of every level (top, ``text_config``, ``vision_config``) is consumed or listed as
ignored with a reason (``IGNORED_KEYS``); any other key is reported.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import InputError

__all__ = ["ConfigError", "ErnieConfig", "VisionConfig", "load_config"]


class ConfigError(InputError):
    """A config.json that cannot describe an ERNIE 4.5 model (missing or inconsistent field)."""


# Keys that are read by transformers but do not change the math or the weights layout. Anything that is neither
# consumed nor listed here is reported (a warning), so a new semantic field cannot slip through unnoticed.
IGNORED_KEYS: dict[str, str] = {
    "architectures": "class name only",
    "auto_map": "remote-code class names only",
    "model_type": "used to pick the layout, not a hyper-parameter",
    "transformers_version": "provenance only",
    "torch_dtype": "storage dtype is read from the tensors themselves",
    "dtype": "storage dtype is read from the tensors themselves",
    "use_cache": "inference-time switch",
    "initializer_range": "initialisation only",
    "output_router_logits": "training-time switch for the aux loss output",
    "pad_token_id": "padding_idx of the embedding has no effect on forward",
    "bos_token_id": "tokenizer metadata (kept in ErnieConfig.special_ids)",
    "eos_token_id": "tokenizer metadata (kept in ErnieConfig.special_ids)",
    "rope_scaling": "ERNIE 4.5 uses no scaling; VL mrope sections are read from rope_parameters",
    "use_flash_attention": "kernel choice",
    "use_rmsnorm": "always RMSNorm",
    "weight_share_add_bias": "Baidu training switch",
    "compression_ratio": "Baidu training switch",
    "moe_capacity": "Baidu capacity can never overflow (reference §C.7)",
    "moe_gate": "always top-k",
    "moe_use_aux_free": "bias is used for selection whenever present",
    "moe_multimodal_dispatch_use_allgather": "dispatch kernel choice",
    "moe_dropout_prob": "no dropout at inference",
    "num_nextn_predict_layers": "MTP depth; MTP tensors are carried by the bridge, not built",
    "multi_token_pred_lambda": "MTP training loss weight",
    "_attn_implementation": "kernel choice",
    "_name_or_path": "provenance only",
    "tie_word_embeddings": "read where it matters (top level for VL)",
    "router_aux_loss_coef": "kept as ErnieConfig.router_aux_loss_coef",
    "pixel_hidden_size": "flat VL layout: the ViT width, also given as vision_config.embed_dim (which is read)",
}


# config.json layout (``model_type``) -> the family it describes (reference §A)
LAYOUT_FAMILY: dict[str, str] = {
    "ernie4_5": "dense",
    "ernie4_5_moe": "moe",
    "ernie4_5_vl_moe": "vl",  # nested: text_config / vision_config
    "ernie4_5_moe_vl": "vl",  # flat: the Thinking model's custom layout
}


@dataclass(frozen=True)
class VisionConfig:
    """The DFNRope ViT + resampler hyper-parameters (reference §A.3, §A.4, §D, §E)."""

    depth: int
    hidden_size: int  # Cv, ViT width
    num_heads: int
    intermediate_size: int  # ViT MLP width
    hidden_act: str
    in_channels: int
    patch_size: int
    spatial_merge_size: int
    temporal_merge_size: int
    layer_norm_eps: float  # vision_config.rms_norm_eps: despite the name, the eps of the ViT *LayerNorms*
    rope_theta: float

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.temporal_merge_size != 2:
            raise ConfigError("the ERNIE resampler hard-codes temporal_merge_size = 2")


@dataclass(frozen=True)
class ErnieConfig:
    """Normalised ERNIE 4.5 hyper-parameters. Field names follow HF ``config.json`` keys."""

    family: str  # "dense" | "moe" | "vl"
    # which of the four config.json layouts this came from (module docstring); the model is the same whichever it
    # is, so it does not take part in ==, but the on-disk names of the flat VL layout differ (see ``flat_vl``)
    model_type: str = field(compare=False)
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense-layer SwiGLU width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    use_bias: bool
    mlp_layer_types: tuple[str, ...]  # "dense" | "sparse" per layer; the only source of the MoE pattern
    # MoE (None / () for dense)
    moe_num_experts: int | None = None  # per pool
    moe_k: int | None = None
    moe_intermediate_size: tuple[int, ...] = ()  # (I_t,) text MoE, (I_t, I_v) VL
    moe_num_shared_experts: int = 0
    moe_norm_min: float | None = None
    router_aux_loss_coef: float = 0.0
    # VL
    mrope_section: tuple[int, int, int] | None = None  # (H bands, W bands, T bands)
    vision: VisionConfig | None = None
    special_ids: Mapping[str, int | None] = field(default_factory=dict)
    # Megatron-side build choice, not read from config.json: "hf" = transformers' ViT replicated over TP,
    # "megatron" = the TP-sharded Megatron-Core ViT (megatron/vit.py). Models and bridge tables both follow it:
    # ``dataclasses.replace(cfg, vit_impl="megatron")``.
    vit_impl: str = "hf"
    # llama.cpp's context length (GGUF); not used by the math (ERNIE 4.5 has no RoPE scaling). None: the config.json
    # does not give it (a dict that never went through ``save_pretrained``)
    max_position_embeddings: int | None = None
    # the source dict, kept verbatim so exports write back the user's config.json unchanged
    hf_config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ----------------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if self.family not in ("dense", "moe", "vl"):
            raise ConfigError(f"unknown family {self.family!r}")
        if LAYOUT_FAMILY.get(self.model_type) != self.family:
            raise ConfigError(f"model_type {self.model_type!r} is not a {self.family} layout ({LAYOUT_FAMILY})")
        if self.vit_impl not in ("hf", "megatron") or (self.vit_impl == "megatron" and self.family != "vl"):
            raise ConfigError(f"vit_impl={self.vit_impl!r}: 'hf' or, for VL configs, 'megatron'")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act must be 'silu' for the ERNIE 4.5 LM, got {self.hidden_act!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if len(self.mlp_layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"mlp_layer_types has {len(self.mlp_layer_types)} entries for {self.num_hidden_layers} layers"
            )
        bad = sorted(set(self.mlp_layer_types) - {"dense", "sparse"})
        if bad:
            raise ConfigError(f"mlp_layer_types may only hold 'dense'/'sparse', got {bad}")
        if self.family == "dense":
            if any(t == "sparse" for t in self.mlp_layer_types):
                raise ConfigError("a dense config cannot have sparse layers")
            return
        for name in ("moe_num_experts", "moe_k", "moe_norm_min"):
            if getattr(self, name) is None:
                raise ConfigError(f"MoE config needs {name}")
        want_pools = 2 if self.family == "vl" else 1
        if len(self.moe_intermediate_size) != want_pools:
            raise ConfigError(
                f"moe_intermediate_size must give {want_pools} width(s) for family {self.family}, "
                f"got {list(self.moe_intermediate_size)}"
            )
        if not 0 < self.moe_k <= self.moe_num_experts:
            raise ConfigError(f"moe_k={self.moe_k} must lie in [1, moe_num_experts={self.moe_num_experts}]")
        if self.moe_num_shared_experts < 0:
            raise ConfigError("moe_num_shared_experts must be >= 0")
        if self.family == "vl":
            if self.vision is None:
                raise ConfigError("VL config needs a vision config")
            if self.mrope_section is None or sum(self.mrope_section) != self.head_dim // 2:
                raise ConfigError(
                    f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}"
                )
            if self.mrope_section[0] != self.mrope_section[1]:
                raise ConfigError(f"ERNIE 3-D RoPE alternates H/W bands: sections must be equal, {self.mrope_section}")

    # ----------------------------------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.family in ("moe", "vl")

    @property
    def flat_vl(self) -> bool:
        """The flat VL layout (reference §A.4): LM fields at the top level, vision weights under ``vision_model.*``."""
        return self.model_type == "ernie4_5_moe_vl"

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.mlp_layer_types) if t == "sparse")

    @property
    def num_pools(self) -> int:
        return len(self.moe_intermediate_size)

    @property
    def shared_expert_intermediate_size(self) -> int:
        # HF, Baidu and MB agree: the *text* expert width times the number of shared experts (reference §C.4, J.19).
        return self.moe_num_shared_experts * self.moe_intermediate_size[0] if self.is_moe else 0

    @property
    def num_query_groups(self) -> int:
        return self.num_key_value_heads

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, raw: Mapping[str, Any]) -> "ErnieConfig":
        """Build from an HF ``config.json`` dict (any of the four layouts)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config.json must be a JSON object, got a JSON {type(raw).__name__}")
        model_type = raw.get("model_type")
        builders = {
            "ernie4_5": _from_dense,
            "ernie4_5_moe": _from_text_moe,
            "ernie4_5_vl_moe": _from_vl_nested,
            "ernie4_5_moe_vl": _from_vl_flat,
        }
        if model_type not in builders:
            raise ConfigError(f"model_type {model_type!r} is not an ERNIE 4.5 model (expected one of {list(builders)})")
        cfg = builders[model_type](raw)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "ErnieConfig":
        return load_config(path)

    def to_hf(self) -> dict[str, Any]:
        """The config.json to write next to exported weights: the source dict, verbatim."""
        if not self.hf_config:
            raise ConfigError("this config was not built from an HF config.json; nothing to write back")
        return json.loads(json.dumps(self.hf_config))


def load_config(path: str | Path) -> ErnieConfig:
    """Read ``config.json`` (a file, or a directory containing one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    try:
        return ErnieConfig.from_hf(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------------------------------------------
# layout readers


# What a field may hold: (check, description). JSON gives ints, floats, bools, strings, lists and objects; a size
# written as "64", 64.5 or [64] (or a bool, which Python counts as an int) is refused, naming the field.
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "count": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "index": (lambda v: _is_int(v) and v >= -1, "an integer >= -1 (-1: the last layer)"),
    "positive": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "nonneg": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "bool": (lambda v: isinstance(v, bool), "true or false (a JSON boolean, not a string)"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, dict), "a JSON object"),
    "any": (lambda v: True, "anything"),
}


def _typed(value: Any, kind: str, name: str) -> Any:
    """``value`` if it is of ``kind`` (a list of them for ``kind + "s"``: "sizes", "indexs"), else a ConfigError
    naming the field. Numbers come back as int / float."""
    if kind.endswith("s") and kind[:-1] in KINDS:
        items = value if isinstance(value, list) else None
        if not items:
            raise ConfigError(f"{name} must be a non-empty list of {KINDS[kind[:-1]][1]}s, got {value!r}")
        return [_typed(v, kind[:-1], f"{name}[{i}]") for i, v in enumerate(items)]
    check, what = KINDS[kind]
    if not check(value):
        raise ConfigError(f"{name} must be {what}, got {value!r}")
    return float(value) if kind in ("positive", "nonneg") else value


class _Reader:
    """Reads fields from one dict, typed and ranged (``KINDS``), remembering which keys were consumed."""

    def __init__(self, raw: Mapping[str, Any], where: str = "", ignored: Mapping[str, str] | None = None) -> None:
        """``ignored``: keys of this dict alone that are not read ({key: reason}), on top of ``IGNORED_KEYS``."""
        self.raw, self.where, self.used = raw, where, set()
        self.ignored = {**IGNORED_KEYS, **(ignored or {})}

    def req(self, key: str, kind: str = "any") -> Any:
        if key not in self.raw or self.raw[key] is None:
            raise ConfigError(f"missing required field {self.where}{key}")
        self.used.add(key)
        return _typed(self.raw[key], kind, self.where + key)

    def opt(self, key: str, default: Any, why: str, kind: str = "any") -> Any:
        """A field whose absence has a documented meaning in the HF code (``why``)."""
        del why  # documentation at the call site
        self.used.add(key)
        value = self.raw.get(key)
        return default if value is None else _typed(value, kind, self.where + key)

    def report_unused(self) -> None:
        unknown = sorted(k for k in self.raw if k not in self.used and k not in self.ignored and not isinstance(self.raw[k], dict))
        if unknown:
            warnings.warn(f"config keys not used by ernie45 (check they do not change the model): {self.where}{unknown}")


def _rope_theta(r: _Reader) -> float:
    params = r.opt("rope_parameters", None, "legacy configs carry a top-level rope_theta instead", "object")
    if params is not None:
        if params.get("rope_type", "default") != "default":
            raise ConfigError(f"unsupported rope_type {params.get('rope_type')!r} (ERNIE 4.5 uses 'default')")
        if "rope_theta" not in params:
            raise ConfigError(f"missing required field {r.where}rope_parameters.rope_theta")
        return _typed(params["rope_theta"], "positive", f"{r.where}rope_parameters.rope_theta")
    return r.req("rope_theta", "positive")


def _lm_common(r: _Reader, *, head_dim: int | None) -> dict[str, Any]:
    H, nh = r.req("hidden_size", "size"), r.req("num_attention_heads", "size")
    nkv = r.opt("num_key_value_heads", nh, "HF: None means multi-head attention", "size")
    if head_dim is not None:
        head_dim = _typed(head_dim, "size", f"{r.where}head_dim")
    if head_dim is None:
        if H % nh:
            raise ConfigError(f"hidden_size {H} not divisible by num_attention_heads {nh} and no head_dim given")
        head_dim = H // nh
    return dict(
        vocab_size=r.req("vocab_size", "size"),
        hidden_size=H,
        intermediate_size=r.req("intermediate_size", "size"),
        num_hidden_layers=r.req("num_hidden_layers", "size"),
        num_attention_heads=nh,
        num_key_value_heads=nkv,
        head_dim=head_dim,
        hidden_act=r.opt("hidden_act", "silu", "absent from the original Thinking json; HF conversion uses silu", "str"),
        rms_norm_eps=r.req("rms_norm_eps", "positive"),
        rope_theta=_rope_theta(r),
        use_bias=r.opt("use_bias", False, "HF default False", "bool"),
        max_position_embeddings=r.opt(
            "max_position_embeddings", None, "absent from dicts never saved by transformers; GGUF needs it", "size"
        ),
    )


def _special_ids(raw: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, int | None]:
    return {k: raw.get(k) for k in keys}


def _layer_rule(L: int, start: int, interval: int, end: int) -> tuple[str, ...]:
    """HF text-MoE rule (reference §A.2): sparse iff (l+1) % interval == 0 and start <= l <= end."""
    if interval <= 0:
        raise ConfigError(f"moe_layer_interval must be positive, got {interval}")
    end = L - 1 if end == -1 else end
    return tuple("sparse" if (l + 1) % interval == 0 and start <= l <= end else "dense" for l in range(L))


def _moe_fields(r: _Reader, pools: int) -> dict[str, Any]:
    E = r.req("moe_num_experts", "sizes" if isinstance(r.raw.get("moe_num_experts"), list) else "size")
    if isinstance(E, list):
        if len(set(E)) != 1:
            raise ConfigError(f"moe_num_experts {E}: pools of different sizes are not an ERNIE 4.5 layout")
        E = E[0]
    widths = r.req("moe_intermediate_size", "sizes" if isinstance(r.raw.get("moe_intermediate_size"), list) else "size")
    widths = tuple(widths if isinstance(widths, list) else [widths])
    if len(widths) != pools:
        raise ConfigError(f"moe_intermediate_size {list(widths)} must have {pools} entr{'y' if pools == 1 else 'ies'}")
    return dict(
        moe_num_experts=E,
        moe_k=r.req("moe_k", "size"),
        moe_intermediate_size=widths,
        moe_num_shared_experts=r.req("moe_num_shared_experts", "count"),
        moe_norm_min=r.opt("moe_norm_min", 1e-12, "Baidu-orig hard-codes 1e-12", "nonneg"),
        router_aux_loss_coef=r.opt("router_aux_loss_coef", 0.0, "no aux loss unless configured", "nonneg"),
    )


def _from_dense(raw: Mapping[str, Any]) -> ErnieConfig:
    r = _Reader(raw)
    common = _lm_common(r, head_dim=r.opt("head_dim", None, "HF: None means hidden_size // num_attention_heads"))
    cfg = ErnieConfig(
        family="dense",
        model_type="ernie4_5",
        tie_word_embeddings=r.req("tie_word_embeddings", "bool"),
        mlp_layer_types=("dense",) * common["num_hidden_layers"],
        special_ids=_special_ids(raw, ("pad_token_id", "bos_token_id", "eos_token_id")),
        hf_config=dict(raw),
        **common,
    )
    r.report_unused()
    return cfg


def _from_text_moe(raw: Mapping[str, Any]) -> ErnieConfig:
    r = _Reader(raw)
    # Ernie4_5_MoeConfig declares no head_dim, yet its attention and RoPE read ``getattr(config, "head_dim", H // nh)``
    # (transformers 5.23), so a head_dim in config.json is honoured exactly as for the dense model
    common = _lm_common(r, head_dim=r.opt("head_dim", None, "HF: absent means hidden_size // num_attention_heads"))
    L = common["num_hidden_layers"]
    if "mlp_layer_types" in raw:
        types = tuple(r.req("mlp_layer_types", "strs"))
    else:
        types = _layer_rule(
            L, r.req("moe_layer_start_index", "count"), r.req("moe_layer_interval", "size"),
            r.req("moe_layer_end_index", "index"),
        )
    cfg = ErnieConfig(
        family="moe",
        model_type="ernie4_5_moe",
        tie_word_embeddings=r.req("tie_word_embeddings", "bool"),
        mlp_layer_types=types,
        special_ids=_special_ids(raw, ("pad_token_id", "bos_token_id", "eos_token_id")),
        hf_config=dict(raw),
        **common,
        **_moe_fields(r, pools=1),
    )
    r.report_unused()
    return cfg


_VL_IDS = (
    "image_start_token_id",
    "image_end_token_id",
    "image_token_id",
    "video_start_token_id",
    "video_end_token_id",
    "video_token_id",
)
# Reference §A.3: the released defaults, used by HF and MB when a flat config omits them.
_VL_DEFAULT_IDS = dict(
    image_start_token_id=101304,
    image_end_token_id=101305,
    image_token_id=100295,
    video_start_token_id=101306,
    video_end_token_id=101307,
    video_token_id=103367,
)


def _mrope_section(params: Mapping[str, Any] | None, head_dim: int, t_bands: int | None) -> tuple[int, int, int]:
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"rope_parameters / rope_scaling must be a JSON object, got {params!r}")
    if params and params.get("mrope_section") is not None:
        sec = tuple(_typed(params["mrope_section"], "counts", "rope_parameters.mrope_section"))
    elif t_bands is not None:
        hw = head_dim // 2 - t_bands
        sec = (hw // 2, hw - hw // 2, t_bands)
    else:
        # HF Ernie4_5_VLMoeTextRotaryEmbedding: absent => [22, 22, 20] (for hd 128); scaled to this head_dim.
        t = round(head_dim // 2 * 20 / 64)
        hw = head_dim // 2 - t
        sec = (hw // 2, hw - hw // 2, t)
    if len(sec) != 3:
        raise ConfigError(f"mrope_section must have 3 entries, got {list(sec)}")
    return sec  # type: ignore[return-value]


def _from_vl_nested(raw: Mapping[str, Any]) -> ErnieConfig:
    top = _Reader(raw)
    text = raw.get("text_config")
    vis = raw.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vis, dict):
        raise ConfigError("ernie4_5_vl_moe config needs text_config and vision_config objects")
    r = _Reader(text, "text_config.")
    common = _lm_common(r, head_dim=None)
    types = tuple(r.req("mlp_layer_types", "strs"))
    v = _Reader(vis, "vision_config.")
    vparams = v.opt("rope_parameters", {"rope_theta": 10000.0}, "HF default axial theta 10000", "object")
    vision = VisionConfig(
        depth=v.req("depth", "size"),
        hidden_size=v.req("hidden_size", "size"),
        num_heads=v.req("num_heads", "size"),
        intermediate_size=v.req("intermediate_size", "size"),
        hidden_act=v.req("hidden_act", "str"),
        in_channels=v.req("in_channels", "size"),
        patch_size=v.req("patch_size", "size"),
        spatial_merge_size=v.req("spatial_merge_size", "size"),
        temporal_merge_size=v.req("temporal_merge_size", "size"),
        layer_norm_eps=v.req("rms_norm_eps", "positive"),
        rope_theta=_typed(vparams.get("rope_theta"), "positive", "vision_config.rope_parameters.rope_theta"),
    )
    for k in _VL_IDS:
        top.used.add(k)  # read below, the released defaults when absent
    cfg = ErnieConfig(
        family="vl",
        model_type="ernie4_5_vl_moe",
        # reference §A.3: the *top-level* tie_word_embeddings is the one the VL model honours
        tie_word_embeddings=top.req("tie_word_embeddings", "bool"),
        mlp_layer_types=types,
        mrope_section=_mrope_section(text.get("rope_parameters"), common["head_dim"], None),
        vision=vision,
        special_ids={k: raw.get(k, _VL_DEFAULT_IDS[k]) for k in _VL_IDS},
        hf_config=dict(raw),
        **common,
        **_moe_fields(r, pools=2),
    )
    for reader in (top, r, v):
        reader.report_unused()
    return cfg


def _from_vl_flat(raw: Mapping[str, Any]) -> ErnieConfig:
    """The Thinking model's custom layout (reference §A.4)."""
    r = _Reader(raw)
    common = _lm_common(r, head_dim=None)
    L = common["num_hidden_layers"]
    if "mlp_layer_types" in raw:
        types = tuple(r.req("mlp_layer_types", "strs"))
    else:
        start, end = (r.req(k, "indexs" if isinstance(r.raw.get(k), list) else "index")
                      for k in ("moe_layer_start_index", "moe_layer_end_index"))
        start = min(start) if isinstance(start, list) else start
        end = max(end) if isinstance(end, list) else end
        # HF conversion script: sparse iff (l+1) % interval == 0 and min(start) <= l <= max(end)
        types = _layer_rule(L, start, r.req("moe_layer_interval", "size"), end)
    v = raw.get("vision_config")
    if not isinstance(v, dict):
        raise ConfigError("ernie4_5_moe_vl config needs a vision_config object")
    vr = _Reader(v, "vision_config.", ignored={"hidden_size": "embed_dim, when given, is the ViT width (HF conversion)"})
    width = vr.opt("embed_dim", None, "the flat layout's name for the ViT width", "size")
    width = width or vr.req("hidden_size", "size")
    mlp_ratio = vr.req("mlp_ratio", "positive")
    vision = VisionConfig(
        depth=vr.req("depth", "size"),
        hidden_size=width,
        num_heads=vr.req("num_heads", "size"),
        intermediate_size=int(width * mlp_ratio),
        hidden_act=vr.req("hidden_act", "str"),
        in_channels=vr.req("in_channels", "size"),
        patch_size=vr.req("patch_size", "size"),
        # HF conversion maps the top-level conv sizes onto the vision merge sizes
        spatial_merge_size=r.opt("spatial_conv_size", vr.opt("spatial_merge_size", 2, "HF default", "size"), "HF conv",
                                 "size"),
        temporal_merge_size=r.opt("temporal_conv_size", 2, "HF conversion default", "size"),
        # reference §A.4 / I.3 #14: the vision LayerNorm eps is 1e-6, never the LM's rms_norm_eps
        layer_norm_eps=vr.opt("rms_norm_eps", 1e-6, "HF conversion sets 1e-6 for the ViT", "positive"),
        rope_theta=10000.0,
    )
    t_bands = r.opt("freq_allocation", None, "absent => mrope_section / default split", "count")
    scaling = raw.get("rope_scaling") or {}
    ids = dict(_VL_DEFAULT_IDS)
    for k in _VL_IDS:
        if raw.get(k) is not None:
            ids[k] = raw[k]
            r.used.add(k)
    if raw.get("im_patch_id") is not None:
        ids["image_token_id"] = raw["im_patch_id"]
        r.used.add("im_patch_id")
    cfg = ErnieConfig(
        family="vl",
        model_type="ernie4_5_moe_vl",
        tie_word_embeddings=r.req("tie_word_embeddings", "bool"),
        mlp_layer_types=types,
        mrope_section=_mrope_section(raw.get("rope_parameters") or scaling, common["head_dim"], t_bands),
        vision=vision,
        special_ids=ids,
        hf_config=dict(raw),
        **common,
        **_moe_fields(r, pools=2),
    )
    for reader in (r, vr):
        reader.report_unused()
    return cfg
