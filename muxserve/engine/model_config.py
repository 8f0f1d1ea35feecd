"""The architecture facts the engine needs, read from a Hugging Face ``config.json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from muxserve import files

# Architectures served by the one Llama-family implementation, and what differs between them.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelSpec:
    """Shape and variant of a Llama-family decoder."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeSpec = field(default_factory=RopeSpec)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    o_proj_bias: bool = False  # Llama / Qwen3 with attention_bias: o_proj carries one too
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k before rotary
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config") -> ModelSpec:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs!r} in {source}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        variant = SUPPORTED_ARCHITECTURES[arch]
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in cfg:
                raise ValueError(f"{source} lacks required field {key!r}")
        num_heads = int(cfg["num_attention_heads"])
        num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"{source}: num_attention_heads {num_heads} is not a multiple of "
                             f"num_key_value_heads {num_kv_heads}")
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // num_heads)
        if variant == "qwen2":
            bias = True  # Qwen2 always has q/k/v bias, whatever attention_bias says
        else:
            bias = bool(cfg.get("attention_bias", False))
        max_pos = int(cfg.get("max_position_embeddings", 2048))
        if variant == "mistral" and cfg.get("sliding_window"):
            # Sliding-window attention is not implemented: within the window it is full attention,
            # so the usable context is capped at the window.
            max_pos = min(max_pos, int(cfg["sliding_window"]))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_pos,
            rope=_rope_spec(cfg, source),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bias,
            o_proj_bias=variant in ("llama", "qwen3") and bool(cfg.get("attention_bias", False)),
            qk_norm=variant == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelSpec:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"model folder {folder} has no config.json")
        return cls.from_dict(files.load(path), source=str(path))


def end_token_ids(folder: str | Path, spec: ModelSpec) -> frozenset[int]:
    """Every id that ends generation: config.json's EOS ids and generation_config.json's."""
    ids = frozenset(spec.eos_token_ids)
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return ids
    eos = files.load(path).get("eos_token_id")
    if eos is None:
        return ids
    return ids | frozenset(eos if isinstance(eos, list) else [eos])


def _rope_spec(cfg: dict[str, Any], source: str) -> RopeSpec:
    # transformers >= 5 writes `rope_parameters`; older configs have `rope_theta` + `rope_scaling`.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r} in {source}; supported: {SUPPORTED_ROPE_TYPES}")
    return RopeSpec(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )
