"""Dataclass configs for ``mica train`` and ``mica eval``: YAML files plus ``key.sub=value``
overrides.

A config file mirrors :class:`TrainConfig`: one YAML mapping per section; unknown keys are an
error. ``--config`` takes a YAML path or the name of a config shipped in the package
(``mica_train/configs/``: ``demo``, ``study``, ``tiny``; see :func:`packaged_configs`).
Overrides use the dotted form of Hydra and verl command lines, ``optim.lr=3e-4``, as
positional arguments or after ``--set``; the value is parsed as YAML, so ``optim.lr=3e-4``,
``lora.enabled=false`` and ``lora.target_modules=[q_proj,v_proj]`` all do what they say.
``mica train --help`` lists every field with its type, default and help text
(:func:`format_field_help`).

Every problem with a config (a missing file, an unknown key, a wrong type or value) raises
:class:`ConfigError`, a one-line :class:`mica_core.MicaInputError` naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mica_core import MicaInputError
from mica_core.estimators import resolve
from mica_core.options import TABLE_SPELLING, option_fields, options_from_mapping

__all__ = [
    "redact_override",
    "AdvantageConfig",
    "ConfigError",
    "DataConfig",
    "EnvSettings",
    "EvalConfig",
    "LoraSettings",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RolloutConfig",
    "TrainConfig",
    "add_config_arguments",
    "apply_overrides",
    "check_config",
    "check_device",
    "check_resume",
    "check_run_dir",
    "check_model_dir",
    "config_fields",
    "config_from_dict",
    "config_to_dict",
    "format_field_help",
    "make_env_config",
    "load_config",
    "overrides_from_args",
    "packaged_configs",
    "read_config_file",
    "redact_config",
]


class ConfigError(MicaInputError):
    """A bad training config: one line naming the field (or the file) and what is wrong."""

    def __init__(self, message: str):
        super().__init__(message)


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
    device: str = field(default="auto", metadata={"help": "auto, cpu, mps, cuda or cuda:N"})
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
    simulator: str = field(
        default="embedded", metadata={"help": "embedded, llm (LLM user and judge) or llm_judge (LLM judge only)"}
    )
    success: str = field(default="empa", metadata={"help": "success criterion of the environment"})
    max_turns: int = field(default=15, metadata={"help": "turn budget of a training episode"})
    min_turns: int = field(default=12, metadata={"help": "turns before the user may leave"})
    max_judge_failure_share: float = field(
        default=0.5,
        metadata={"help": "stop training (exit 2) when more than this share of a step's judged turns "
                          "failed (fallback rewards); 1 never stops, 0 stops at the first failure"},
    )
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
        default_factory=dict,
        metadata={"help": "estimator options (mica_core.EstimatorOptions, as compute_advantages spells them): "
                  + ", ".join(f.name if f.name not in TABLE_SPELLING else TABLE_SPELLING[f.name]
                              for f in option_fields("table"))},
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
    tensorboard: bool = field(default=True, metadata={"help": "write TensorBoard event files"})
    plot: bool = field(default=True, metadata={"help": "write learning-curve PNGs"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    transcripts_every: int = field(
        default=0,
        metadata={"help": "save the step's conversations with their credit to "
                          "RUN_DIR/transcripts/step_NNNNNN.jsonl every N steps (0 off)"},
    )
    tensorboard_conversations: int = field(
        default=2, metadata={"help": "sample conversations shown as TensorBoard text at each transcript step"}
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    env: EnvSettings = field(default_factory=EnvSettings)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


#: Fields a resumed run may change: they say how the run is watched, saved or evaluated, not
#: what is trained (evaluations fork the random state). Every other field must equal the
#: run's ``config.json``, or the resumed steps would train something the record does not say.
RESUME_MAY_CHANGE = ("threads", "save_every", "keep_checkpoints", "tensorboard", "plot",
                     "progress", "transcripts_every", "tensorboard_conversations", "eval.",
                     "env.max_judge_failure_share")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("options", "extra"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume(saved: dict, cfg: TrainConfig, where: str) -> None:
    """Refuse to resume a run with a config that trains something else than the run's
    ``config.json`` (``saved``): a :class:`ConfigError` naming the changed fields."""
    old, new = _flatten(redact_config(saved)), _flatten(config_to_dict(cfg))
    changed = [k for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and not k.startswith(RESUME_MAY_CHANGE)
               and k != "run_dir"]
    if changed:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise ConfigError(f"{where} has a checkpoint of a run trained with another config "
                          f"({shown}{more}); resuming would continue the old run under a "
                          f"record that no longer matches it: use a new run_dir, or the "
                          f"run's own config (only eval.*, save_every, keep_checkpoints, "
                          f"threads and logging may change on resume)")


PACKAGE_CONFIG_DIR = "configs"  # YAML files shipped inside mica_train (package data)


def packaged_configs() -> list[str]:
    """Names of the configs shipped with mica_train (``--config NAME``)."""
    from importlib.resources import files

    folder = files("mica_train") / PACKAGE_CONFIG_DIR
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _packaged(name: str) -> tuple[str, str] | None:
    from importlib.resources import files

    if not name or "/" in name or "\\" in name:
        return None
    res = files("mica_train") / PACKAGE_CONFIG_DIR / f"{name}.yaml"
    if not res.is_file():
        return None
    return res.read_text(encoding="utf-8"), f"{name} (packaged: mica_train/{PACKAGE_CONFIG_DIR}/{name}.yaml)"


def read_config_file(spec: str | Path) -> tuple[str, str]:
    """``(text, source)`` of a config: ``spec`` is a YAML file, or else the name of a packaged
    config (``demo``, ``demo.yaml``) read with ``importlib.resources``, so it works from a
    wheel. A bare packaged name (``demo``) always means the packaged config, whatever the
    working directory holds (``./demo`` names a file); with a suffix (``demo.yaml``) a file
    that exists wins over the packaged config."""
    if isinstance(spec, str) and spec in packaged_configs():
        return _packaged(spec)
    path = Path(spec)
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config {str(spec)!r}: cannot read it ({exc})") from None
    if path.is_dir():
        raise ConfigError(f"config {str(spec)!r} is a directory, not a YAML file")
    name = str(spec)
    if name.endswith((".yaml", ".yml")):
        name = name.rsplit(".", 1)[0]
    found = _packaged(name)
    if found is not None:
        return found
    raise ConfigError(f"config {str(spec)!r}: no such file, and no packaged config of that name "
                      f"(packaged: {', '.join(packaged_configs())})")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (YAML already typed it); ints and numeric
    strings are accepted for floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping (a config section), got {_shown(value, where)}")
        return config_from_dict(tp, value, where)
    if tp is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_shown(value, where)}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not match {_type_name(tp)}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML reads 3e-4 (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str and value is None:
        return ""
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _shown(value: Any, where: str) -> str:
    """``value`` for a message; under ``env`` (which may hold an API key) only its type."""
    return f"a {type(value).__name__}" if where.split(".")[0] == "env" else repr(value)


def _unknown_key(where: str, key: str, known: list[str]) -> ConfigError:
    name = f"{where}.{key}" if where else str(key)
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {(where + '.') if where else ''}{close[0]}? " if close else ""
    return ConfigError(f"{name}: unknown key ({hint}{where or 'the top level'} has: {', '.join(known)})")


def config_from_dict(cls, data: dict[str, Any] | None, where: str = ""):
    """Build dataclass ``cls`` from a nested mapping; missing keys keep their defaults.
    ``where`` is the dotted path of ``cls`` in the config (for error messages)."""
    data = dict(data or {})
    types_ = _field_types(cls)
    unknown = sorted((k for k in data if k not in types_), key=str)
    if unknown:
        raise _unknown_key(where, unknown[0], list(types_))
    kwargs = {name: _coerce(value, types_[name], f"{where}.{name}" if where else name)
              for name, value in data.items()}
    return cls(**kwargs)


#: ``env.extra`` fields that hold a secret: never written, printed or compared.
SECRET_EXTRA = ("api_key",)


def _hide_url_password(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part replaced by ``***``."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"  # not a URL we can take apart: show none of it
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def redact_config(data: Any) -> Any:
    """A copy of config mapping ``data`` without its secrets: ``env.extra.api_key`` left out,
    a password in ``env.extra.base_url`` replaced by ``***``. Used on everything that leaves
    the process (``config.json``, ``trainer_state.json``, ``--print-config``, messages), also
    on mappings read back from an older run."""
    import copy

    if not isinstance(data, dict):
        return data
    out = copy.deepcopy(data)
    env = out.get("env")
    extra = env.get("extra") if isinstance(env, dict) else None
    if isinstance(extra, dict):
        for key in SECRET_EXTRA:
            extra.pop(key, None)
        if isinstance(extra.get("base_url"), str):
            extra["base_url"] = _hide_url_password(extra["base_url"])
    return out


def redact_override(text: str) -> str:
    """One command-line word or ``KEY=VALUE`` override as it may be written or shown: the value
    of anything under ``env.extra`` (where keys and URLs with passwords live) is replaced by
    ``<not shown>``; the resolved, redacted config (:func:`config_to_dict`) says what it set."""
    prefix = "--set=" if text.startswith("--set=") else ""
    key, sep, _ = text[len(prefix):].partition("=")
    name = key.strip()
    if sep and (name in ("env", "env.extra") or name.startswith("env.extra.")):
        return f"{prefix}{key}=<not shown>"
    return text


def config_to_dict(cfg) -> dict[str, Any]:
    """The config as a nested mapping, as it may be written or shown: without its secrets
    (:func:`redact_config`); the key itself stays only in the live ``cfg``."""
    return redact_config(dataclasses.asdict(cfg))


def _parse_value(raw: str, key: str) -> Any:
    import yaml

    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        shown = key if key.split(".")[0] == "env" else f"{key}={raw}"  # env.* may hold a key
        raise ConfigError(f"{shown}: the value is not valid YAML ({problem})") from None


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to a nested mapping, in order (values parsed as YAML)."""
    for item in overrides or []:
        if "=" not in item:
            hint = f"; to read a config, use --config {item}" if "." not in item else ""
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=3e-4{hint}")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: {key!r} is not a dotted field name")
        node = data
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {'.'.join(parts[:i + 1])} is not a section")  # noqa: TRY004
        node[parts[-1]] = _parse_value(raw, key)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a config (a YAML path or a packaged name; the defaults when ``path`` is None) and
    apply the ``key.sub=value`` overrides. Raises :class:`ConfigError`."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        text, source = read_config_file(path)
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ConfigError(f"{source}: not valid YAML{at} ({problem})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of config sections")
    data = apply_overrides(data, overrides)
    return config_from_dict(TrainConfig, data)


# ---------------------------------------------------------------------------- checks
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
AT_LEAST = {  # integer field: smallest value that makes sense
    "seed": 0, "threads": 0, "steps": 1, "save_every": 0, "keep_checkpoints": 0,
    "transcripts_every": 0, "tensorboard_conversations": 0,
    "lora.r": 1,
    "data.train_scenarios": 1, "data.scenario_seed": 0, "data.scenarios_per_step": 1, "data.group_size": 2,
    "rollout.max_new_tokens": 1, "rollout.context_messages": 0, "rollout.context_replies": 0,
    "rollout.max_prompt_tokens": 0, "rollout.batch_size": 1,
    "optim.epochs": 1, "optim.minibatches": 1, "optim.micro_batch_rows": 0,
    "eval.episodes_per_scenario": 1, "eval.seed": 0, "eval.every": 0, "eval.max_turns": 0,
}
#: float field: (low, high, low included, high included); every float must also be finite.
RANGES = {
    "lora.alpha": (0.0, math.inf, False, False),
    "lora.dropout": (0.0, 1.0, True, False),
    "rollout.temperature": (0.0, math.inf, False, False),
    "rollout.top_p": (0.0, 1.0, False, True),
    "loss.eps_low": (0.0, 1.0, True, True),
    "loss.eps_high": (0.0, math.inf, True, False),
    "loss.kl_coef": (0.0, math.inf, True, False),
    "loss.entropy_coef": (0.0, math.inf, True, False),
    "optim.lr": (0.0, math.inf, False, False),
    "optim.weight_decay": (0.0, math.inf, True, False),
    "optim.warmup_ratio": (0.0, 1.0, True, True),
    "optim.min_lr_ratio": (0.0, 1.0, True, True),
    "optim.max_grad_norm": (0.0, math.inf, True, False),
    "eval.temperature": (0.0, math.inf, True, False),
}
WHY = {
    "data.group_size": ": group baselines need several rollouts",
    "rollout.temperature": ": training rollouts sample (eval.temperature=0 is greedy)",
}
CHOICES = {  # field: the values it takes
    "rollout.sampler": ("mica", "hf"), "loss.old_logprobs": ("auto", "rollout", "recompute"),
}


def _range_text(low: float, high: float, low_in: bool, high_in: bool) -> str:
    if high == math.inf:
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def _check_float(name: str, value: float, low: float, high: float, low_in: bool, high_in: bool) -> None:
    ok = math.isfinite(value) and (value >= low if low_in else value > low) and \
        (value <= high if high_in else value < high)
    if not ok:
        raise ConfigError(f"{name} must be a finite number {_range_text(low, high, low_in, high_in)}, "
                          f"got {value}{WHY.get(name, '')}")


def check_device(name: str) -> None:
    """``model.device`` must exist on this machine (``cuda:N`` with N below the device
    count, ``mps`` where available). Raises :class:`ConfigError`."""
    if name in ("auto", "cpu"):
        return
    import torch

    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError("model.device: mps is not available on this machine (use auto or cpu)")
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= count:
        have = f"{count} CUDA device{'s' if count != 1 else ''}"
        raise ConfigError(f"model.device: {name} is not available ({have} on this machine; use auto or cpu)")


def check_run_dir(run_dir: str) -> None:
    """``run_dir`` must name a directory that exists or can be created: not empty, not a file,
    no file on the way to it. Raises :class:`ConfigError`."""
    if not str(run_dir).strip():
        raise ConfigError("run_dir must name a directory, got ''")
    path = Path(run_dir)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"cannot be created: {p} is a file"
                raise ConfigError(f"run_dir {run_dir} {what}, not a directory")
            return
def _get(cfg, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """The rules a run needs before it loads anything heavy: sizes, choices, a registered
    estimator whose ``advantage.options`` it accepts, valid environment settings. Raises
    :class:`ConfigError`."""
    import mica_core as mc

    check_run_dir(cfg.run_dir)
    for name, low in AT_LEAST.items():
        if _get(cfg, name) < low:
            raise ConfigError(f"{name} must be >= {low}, got {_get(cfg, name)}{WHY.get(name, '')}")
    for name, bounds in RANGES.items():
        _check_float(name, _get(cfg, name), *bounds)
    if cfg.loss.dual_clip != 0:
        _check_float("loss.dual_clip", cfg.loss.dual_clip, 1.0, math.inf, False, False)
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {betas}")
    targets = cfg.lora.target_modules
    if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
        raise ConfigError(f"lora.target_modules must name at least one module (e.g. [q_proj, v_proj]), "
                          f"got {targets}")
    if cfg.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {', '.join(DTYPES)}, got {cfg.model.dtype!r}")
    for name, allowed in CHOICES.items():
        if _get(cfg, name) not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {_get(cfg, name)!r}")
    share = cfg.env.max_judge_failure_share
    if not 0 <= share <= 1:
        raise ConfigError(f"env.max_judge_failure_share must be a number in [0, 1], got {share!r}")
    if not DEVICE_PATTERN.fullmatch(cfg.model.device):
        raise ConfigError(f"model.device must be auto, cpu, mps, cuda or cuda:N, got {cfg.model.device!r}")
    check_device(cfg.model.device)
    known = mc.list_estimators()
    if cfg.advantage.estimator not in known:
        raise ConfigError(f"advantage.estimator {cfg.advantage.estimator!r} is not registered; "
                          f"known: {', '.join(known)}")
    # The options are checked against mica_core.EstimatorOptions (names, types, ranges) and
    # resolved with the estimator (e.g. eps=0 with a std scale) before the first rollout.
    try:
        options = options_from_mapping(cfg.advantage.options, "table", spelling=TABLE_SPELLING,
                                       prefix="advantage.options.")
        resolve(cfg.advantage.estimator, options, reward_given=False)
    except MicaInputError as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    from .env import EnvConfig

    env_fields = {f.name for f in dataclasses.fields(EnvConfig)}
    unknown = sorted(k for k in cfg.env.extra if k not in env_fields)
    if unknown:
        raise _unknown_key("env.extra", unknown[0], sorted(env_fields))
    try:
        make_env_config(cfg.env)
    except (TypeError, ValueError) as exc:
        column = getattr(exc, "column", None)
        message = str(exc).splitlines()[0].replace(f"column {column!r}: ", "")
        if column is None:
            name = "env"
        else:
            name = f"env.{column}" if column in _field_types(EnvSettings) else f"env.extra.{column}"
        raise ConfigError(f"{name}: {message}") from None
    if cfg.data.scenarios_file and not Path(cfg.data.scenarios_file).is_file():
        raise ConfigError(f"data.scenarios_file: {cfg.data.scenarios_file}: no such file")


def check_model_dir(path: str | Path) -> None:
    """``model.path`` must be a local directory holding a causal LM (``config.json``) and its
    tokenizer; nothing is downloaded. Raises :class:`ConfigError`."""
    p = Path(path)
    hint = "build one with `mica tiny-model --out DIR` or point model.path at a local checkpoint"
    if not p.exists():
        raise ConfigError(f"model.path: {path}: no such directory ({hint})")
    if not p.is_dir():
        raise ConfigError(f"model.path: {path} is not a directory ({hint})")
    if not (p / "config.json").is_file():
        what = ("a LoRA adapter, not a model: use it with `mica eval --checkpoint`"
                if (p / "adapter_config.json").is_file() else f"not a model directory ({hint})")
        raise ConfigError(f"model.path: {path} has no config.json: {what}")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ConfigError(f"model.path: {path} has no tokenizer (tokenizer.json or tokenizer_config.json)")


# ---------------------------------------------------------------------------- command lines
def add_config_arguments(parser, default: str | None = None, scope: str = "") -> None:
    """``--config FILE|NAME``, ``--set KEY=VALUE`` and positional ``KEY=VALUE`` words: the
    config options of every training command (``mica train``, ``eval``, ``study``, the demo).
    Parse with ``parse_intermixed_args`` so the words may come among the options."""
    parser.add_argument("--config", default=None, metavar="FILE|NAME",
                        help=f"training config{scope}: a YAML file or a packaged config "
                        f"({', '.join(packaged_configs())}; default: {default or 'the built-in defaults'})")
    parser.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one config field{scope}, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides in dotted form, e.g. optim.lr=3e-4 lora.r=16 (values are YAML; "
                        "applied after --set; `mica train --help` lists the fields)")


def overrides_from_args(args) -> list[str]:
    """The overrides of a command line parsed with :func:`add_config_arguments`, in the order
    they apply: ``--set`` ones first, then the dotted words."""
    return [*args.set_overrides, *args.overrides]


# ---------------------------------------------------------------------------- help
def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _show(value: Any) -> str:
    """A default as the user would type it (YAML flow style)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return repr(value)


def config_fields(cls=TrainConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """``(dotted name, type, default, help)`` of every field of ``cls``, sections expanded."""
    rows = []
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = types_[f.name]
        if dataclasses.is_dataclass(tp):
            rows += config_fields(tp, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        rows.append((prefix + f.name, _type_name(tp), default, f.metadata.get("help", "")))
    return rows


def format_field_help(width: int = 100) -> str:
    """Every config field with its type, default and help, for ``mica train --help``."""
    rows = config_fields()
    pad = max(len(name) for name, *_ in rows) + 4
    lines = ["config fields (override with KEY=VALUE or --set KEY=VALUE; values are YAML):"]
    section = None
    for name, tp, default, text in rows:
        head = name.split(".")[0] if "." in name else ""
        if head != section:
            section = head
            lines.append("")
        body = f"{text} [{tp}, default {_show(default)}]" if text else f"[{tp}, default {_show(default)}]"
        lines += textwrap.wrap(body, width=width, initial_indent=f"  {name:<{pad - 2}}",
                               subsequent_indent=" " * pad, break_on_hyphens=False)
    return "\n".join(lines)


def make_env_config(env_settings, max_turns: int | None = None):
    """The environment's :class:`mica_train.env.EnvConfig` from the ``env`` settings (and an
    evaluation's own turn limit)."""
    from .env import EnvConfig

    max_turns = max_turns or env_settings.max_turns
    kwargs = {
        "simulator": env_settings.simulator,
        "success": env_settings.success,
        "max_turns": max_turns,
        "min_turns": min(env_settings.min_turns, max_turns),
    }
    kwargs.update(env_settings.extra)
    return EnvConfig(**kwargs)
