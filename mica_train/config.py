"""Dataclass configs for ``mica train`` and ``mica eval``, read from YAML with dotted overrides.

A config file mirrors :class:`TrainConfig`: one YAML mapping per section, unknown keys are an
error. ``--set section.key=value`` overrides one field; the value is parsed as YAML, so
``--set optim.lr=3e-4``, ``--set lora.enabled=false`` and
``--set lora.target_modules=[q_proj,v_proj]`` all do what they say.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "AdvantageConfig",
    "DataConfig",
    "EnvSettings",
    "EvalConfig",
    "LoraSettings",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RolloutConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
]


@dataclass
class ModelConfig:
    path: str = field(
        default="runs/tiny/warm",
        metadata={"help": "local directory of a causal-LM checkpoint and its tokenizer"},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "auto (bf16 on CUDA, float32 on CPU), float32, bfloat16 or float16"},
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory"})


@dataclass
class LoraSettings:
    enabled: bool = field(
        default=True, metadata={"help": "train a LoRA adapter; false trains every weight (tiny models)"}
    )
    r: int = field(default=8, metadata={"help": "adapter rank"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator (scale = alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "adapter dropout (0 keeps the PPO ratio exact)"})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "module names that get an adapter"},
    )


@dataclass
class EnvSettings:
    simulator: str = field(default="embedded", metadata={"help": "embedded or llm"})
    success: str = field(default="empa", metadata={"help": "success criterion of the environment"})
    max_turns: int = field(default=15, metadata={"help": "turn budget of a training episode"})
    min_turns: int = field(default=12, metadata={"help": "turns before the user may leave"})
    extra: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "further EnvConfig fields (for example LLM settings)"}
    )


@dataclass
class DataConfig:
    train_scenarios: int = field(default=256, metadata={"help": "size of the generated training pool"})
    scenario_seed: int = field(default=1, metadata={"help": "seed of the training pool"})
    scenarios_file: str = field(default="", metadata={"help": "load scenarios from this file instead"})
    scenarios_per_step: int = field(default=8, metadata={"help": "groups per rollout batch"})
    group_size: int = field(default=8, metadata={"help": "rollouts per scenario (G)"})


@dataclass
class RolloutConfig:
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    max_new_tokens: int = field(default=24, metadata={"help": "reply length cap in tokens"})
    context_messages: int = field(default=1, metadata={"help": "last messages the policy sees"})
    context_replies: int = field(
        default=2, metadata={"help": "the policy's own last replies shown before those messages (docs/training.md)"}
    )
    max_prompt_tokens: int = field(default=96, metadata={"help": "prompt length cap (left-truncated)"})
    system_prompt: str = field(default="", metadata={"help": "optional system message"})
    batch_size: int = field(default=256, metadata={"help": "prompts per generate call"})
    sampler: str = field(
        default="mica",
        metadata={"help": "mica (a KV-cache loop with inverse-CDF sampling) or hf (transformers' generate)"},
    )
    merge_lora: bool = field(
        default=True, metadata={"help": "merge the LoRA adapter into the weights while generating (exact restore)"}
    )


@dataclass
class AdvantageConfig:
    estimator: str = field(default="mica", metadata={"help": "any name in mica_core.list_estimators()"})
    options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "keyword options of mica_core.compute_advantages"}
    )


@dataclass
class LossConfig:
    eps_low: float = field(default=0.2, metadata={"help": "lower clip: ratio >= 1 - eps_low"})
    eps_high: float = field(default=0.28, metadata={"help": "upper clip: ratio <= 1 + eps_high"})
    dual_clip: float = field(default=10.0, metadata={"help": "dual-clip c for negative advantages (0 off)"})
    kl_coef: float = field(default=0.0, metadata={"help": "weight of the k3 KL to the frozen base"})
    entropy_coef: float = field(default=0.0, metadata={"help": "weight of the entropy bonus"})
    old_logprobs: str = field(
        default="auto",
        metadata={"help": "PPO's old log-probs: rollout (from generate's logits), recompute (a forward "
                          "pass, as verl), auto (rollout in float32, recompute otherwise)"},
    )
    kl_metric: bool = field(
        default=False, metadata={"help": "measure the KL to the base even when kl_coef is 0 (one more forward pass)"}
    )


@dataclass
class OptimConfig:
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"help": "AdamW betas"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of updates spent warming up"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine floor as a share of lr"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 off)"})
    epochs: int = field(default=1, metadata={"help": "passes over each rollout batch"})
    minibatches: int = field(default=4, metadata={"help": "optimizer updates per pass"})
    micro_batch_rows: int = field(default=0, metadata={"help": "rows per forward (0: whole minibatch)"})
    sort_by_length: bool = field(
        default=True, metadata={"help": "group rows of similar length into each forward (less padding)"}
    )


@dataclass
class EvalConfig:
    episodes_per_scenario: int = field(default=2, metadata={"help": "episodes per evaluation scenario"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0 is greedy)"})
    seed: int = field(default=1234, metadata={"help": "seed of evaluation episodes"})
    every: int = field(default=0, metadata={"help": "evaluate every N steps during training (0 off)"})
    max_turns: int = field(
        default=45, metadata={"help": "turn budget of an evaluation episode (EMPA: 45; 0: env.max_turns)"}
    )


@dataclass
class TrainConfig:
    run_dir: str = field(default="runs/train", metadata={"help": "output directory of the run"})
    seed: int = field(default=0, metadata={"help": "seed of everything random in the run"})
    threads: int = field(
        default=0, metadata={"help": "torch CPU threads (0: torch's default; 1 is fastest for tiny models)"}
    )
    steps: int = field(default=50, metadata={"help": "rollout batches (training steps)"})
    save_every: int = field(default=10, metadata={"help": "checkpoint every N steps (0: only the last)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept on disk (0: all)"})
    stop_after: int = field(
        default=0, metadata={"help": "exit after this many steps of this process (simulates a kill)"}
    )
    tensorboard: bool = field(default=True, metadata={"help": "write TensorBoard event files"})
    plot: bool = field(default=True, metadata={"help": "write learning-curve PNGs"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    env: EnvSettings = field(default_factory=EnvSettings)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (YAML already typed it); ints and numeric
    strings are accepted for floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return config_from_dict(tp, value, where)
    if tp is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: {value!r} does not match {tp}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML reads 3e-4 (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if tp is str and value is None:
        return ""
    if tp is bool and not isinstance(value, bool):
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        # Every config problem is a ValueError, whatever its kind.
        raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")  # noqa: TRY004
    return value


def config_from_dict(cls, data: dict[str, Any] | None, where: str = "config"):
    """Build dataclass ``cls`` from a nested mapping; missing keys keep their defaults."""
    data = dict(data or {})
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(types_)}")
    kwargs = {name: _coerce(value, types_[name], f"{where}.{name}") for name, value in data.items()}
    return cls(**kwargs)


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to a nested mapping (values parsed as YAML)."""
    import yaml

    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {p} is not a section")  # noqa: TRY004
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
    data = apply_overrides(data, overrides)
    return config_from_dict(TrainConfig, data)
