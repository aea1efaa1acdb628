"""Command line of mica_train (also reached as ``mica train|eval|tiny-model|warm-start``).

    mica tiny-model --out runs/tiny/base
    mica warm-start --model runs/tiny/base --out runs/tiny/warm
    mica train --config demo model.path=runs/tiny/warm steps=20
    mica eval --config demo model.path=runs/tiny/warm --checkpoint latest --transcripts eval.jsonl
    mica train --help                      # every config field, its type, default and help

``--config`` is a YAML file or the name of a packaged config (demo, smollm2, study, tiny). Overrides
are ``key.sub=value`` words (Hydra and verl style) or ``--set key.sub=value``; positional
overrides apply after the ``--set`` ones. A bad config, a missing model or checkpoint, or
bad scenario files print one line on stderr and exit with status 2.

Heavy libraries (torch, transformers) are imported inside the commands: ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

__all__ = ["COMMANDS", "CommandError", "build_parser", "check_output_file", "checkpoint_weights", "command_parser",
           "main"]


class CommandError(Exception):
    """A user error of a training command: printed as one line, exit status 2."""


@contextlib.contextmanager
def _user_errors():
    """Turn the input errors of a command's set-up (config, model, checkpoint, scenario files)
    into a :class:`CommandError`. Errors once training runs keep their traceback."""
    from mica_core import MicaInputError

    try:
        yield
    except MicaInputError as exc:
        raise CommandError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


COMMANDS = {
    "train": "train a policy (resumes from the run's last checkpoint)",
    "eval": "evaluate a policy on the evaluation scenario set",
    "tiny-model": "build the tiny offline model and tokenizer",
    "warm-start": "supervised warm start on generated supportive replies",
}


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of ``mica NAME`` (train, eval, tiny-model, warm-start)."""
    p = argparse.ArgumentParser(prog=f"mica {name}", description=COMMANDS[name])
    if name in ("train", "eval"):
        from .config import add_config_arguments, format_field_help

        p.formatter_class = argparse.RawDescriptionHelpFormatter
        p.epilog = format_field_help()
        add_config_arguments(p)
    if name == "train":
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    elif name == "eval":
        p.add_argument(
            "--checkpoint",
            default="latest",
            help="'latest' (the newest checkpoint in run_dir; an error when there is none), "
            "'base' (model.path itself), or a checkpoint directory",
        )
        p.add_argument("--out", default=None, help="write the metrics as JSON to this file")
        p.add_argument("--transcripts", default=None, metavar="FILE.jsonl",
                       help="write every episode's conversation with its per-turn credit (JSON "
                       "lines; `mica report RUN_DIR --transcripts FILE.jsonl` shows them)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    elif name == "tiny-model":
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the tokenizer corpus")
        p.add_argument("--hidden-size", type=int, default=128)
        p.add_argument("--layers", type=int, default=2)
        p.add_argument("--heads", type=int, default=2, help="attention heads (key-value heads: half as many)")
        p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary cap (specials included)")
        p.add_argument("--episodes", type=int, default=200, help="corpus episodes the tokenizer is trained on")
    elif name == "warm-start":
        p.add_argument("--model", required=True, help="input model directory")
        p.add_argument("--out", required=True, help="output model directory")
        p.add_argument("--steps", type=int, default=400)
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--lr", type=float, default=3e-3)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--episodes", type=int, default=200, help="corpus episodes")
        p.add_argument("--context-messages", type=int, default=1, help="messages of context, as in rollouts")
        p.add_argument("--context-replies", type=int, default=2,
                       help="own earlier replies in the context, as in rollouts")
        p.add_argument("--no-progress", action="store_true")
    return p


def build_parser() -> argparse.ArgumentParser:
    """``python -m mica_train.cli``: the list of commands (each parses its own arguments)."""
    parser = argparse.ArgumentParser(
        prog="mica", description="mica_train: LoRA policy-gradient training with mica advantages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _load(args):
    """The resolved and checked config of a train or eval command."""
    from .config import check_config, check_model_dir, load_config, overrides_from_args

    cfg = load_config(args.config, overrides_from_args(args))
    check_config(cfg)
    check_model_dir(cfg.model.path)
    return cfg


def _train(args) -> int:
    if args.print_config:
        import yaml

        from .config import SECRET_EXTRA, config_to_dict, load_config, overrides_from_args

        with _user_errors():
            cfg = load_config(args.config, overrides_from_args(args))
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        hidden = [k for k in SECRET_EXTRA if cfg.env.extra.get(k)]
        if hidden:
            print(f"# env.extra.{', env.extra.'.join(hidden)}: set, not shown (never written or printed)")
        return 0
    from .trainer import JudgeFailureStop, Trainer, TrainingDiverged

    with _user_errors():
        trainer = Trainer(_load(args))
    if trainer.resumed_from is not None and trainer.dist.is_main:
        print(f"resuming from {trainer.resumed_from} (step {trainer.step})", file=sys.stderr)
    from .env.errors import EndpointConfigError

    try:
        last = trainer.train()
    except (JudgeFailureStop, TrainingDiverged, EndpointConfigError) as exc:
        # stops the trainer or the endpoint explain in one line (the URL without credentials)
        raise CommandError(str(exc).splitlines()[0]) from None
    if trainer.dist.is_main and last:
        keys = ("step", "pass_rate", "mean_final_distance", "reward_mean", "kl", "time_step")
        print(json.dumps({k: last[k] for k in keys if k in last}))
    return 0


def checkpoint_weights(checkpoint: str, run_dir: str | Path, lora: bool) -> Path | None:
    """The weights directory that ``mica eval --checkpoint`` names: ``latest`` (the run's newest
    checkpoint), ``base`` (None: the model itself) or a checkpoint (or weights) directory.
    Raises :class:`mica_train.config.ConfigError` when there is nothing to load."""
    from .checkpoint import latest_checkpoint
    from .config import ConfigError

    if checkpoint == "base":
        return None
    if checkpoint == "latest":
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ConfigError(f"--checkpoint latest: run_dir {run_dir} has no checkpoint (train first, "
                              "set run_dir, or pass --checkpoint base to evaluate model.path itself)")
        return ckpt / "weights"
    weights = Path(checkpoint)
    if not weights.is_dir():
        raise ConfigError(f"--checkpoint {checkpoint}: no such directory (use latest, base or a checkpoint directory)")
    if (weights / "weights").is_dir():
        weights = weights / "weights"
    need = "adapter_config.json" if lora else "model.safetensors"
    if not (weights / need).is_file():
        kind = "a LoRA checkpoint (lora.enabled=true)" if lora else "a full fine-tuning checkpoint (lora.enabled=false)"
        raise ConfigError(f"--checkpoint {checkpoint}: {weights} has no {need}, as {kind} needs")
    return weights


def check_output_file(path: str | Path, option: str) -> None:
    """``option``'s file ``path`` can be written (atomically, creating its folders): not a
    directory, and the nearest existing folder on its way takes a new file. Checked before any
    work, so a long evaluation never ends in a refusal. Raises ``ConfigError``."""
    import tempfile

    from .config import ConfigError

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a directory; name a file")
    for folder in path.parents:
        if folder.exists():
            break
    if not folder.is_dir():
        raise ConfigError(f"{option} {path}: {folder} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".mica-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot write in {folder} ({exc.strerror or exc})") from None


def _eval(args) -> int:
    with _user_errors():
        for option, target in (("--out", args.out), ("--transcripts", args.transcripts)):
            if target:
                check_output_file(target, option)
        cfg = _load(args)
        weights = checkpoint_weights(args.checkpoint, cfg.run_dir, cfg.lora.enabled)
        import torch

        from .policy import load_policy

        if cfg.threads > 0:  # as Trainer does: evaluations run on the config's threads too
            torch.set_num_threads(cfg.threads)
        policy = load_policy(cfg.model, cfg.lora, weights_dir=weights)  # lora.target_modules checked
    from .env.errors import EndpointConfigError
    from .metrics import json_safe
    from .trainer import evaluate

    try:
        metrics = evaluate(policy, cfg, transcripts=args.transcripts,
                           progress=cfg.progress and not args.no_progress)
    except EndpointConfigError as exc:  # a wrong URL, model or key: one line
        raise CommandError(str(exc).splitlines()[0]) from None
    metrics["weights"] = str(weights) if weights is not None else f"base: {cfg.model.path}"
    text = json.dumps(json_safe(metrics), indent=2, sort_keys=True, default=str, allow_nan=False)
    if args.out:
        from mica_core.atomic import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0


def _tiny_model(args) -> int:
    from .tiny import TinyModelConfig, write_tiny_model
    from .warmstart import corpus_texts, generate_corpus

    texts = corpus_texts(generate_corpus(args.episodes, seed=args.seed))
    cfg = TinyModelConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 2),
        seed=args.seed,
    )
    out = write_tiny_model(args.out, texts, cfg)
    print(out)
    return 0


def _warm_start(args) -> int:
    from .warmstart import WarmStartConfig, warm_start

    cfg = WarmStartConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        n_episodes=args.episodes,
        context_messages=args.context_messages,
        context_replies=args.context_replies,
    )
    summary = warm_start(args.model, args.out, cfg, progress=not args.no_progress)
    print(json.dumps(summary, sort_keys=True))
    return 0


_COMMANDS = {"train": _train, "eval": _eval, "tiny-model": _tiny_model, "warm-start": _warm_start}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # --help, or a usage error naming the commands
        return 2
    # Intermixed: KEY=VALUE overrides may come before, between or after the options.
    args = command_parser(argv[0]).parse_intermixed_args(argv[1:])
    args.command = argv[0]
    try:
        return _COMMANDS[args.command](args)
    except CommandError as exc:
        print(f"mica {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _subcommand(name: str, help_line: str):
    """``mica NAME ...`` as an entry point of the ``mica.commands`` group (see pyproject)."""

    def run(argv: list[str]) -> int:
        return main([name, *argv])

    run.__name__ = run.__qualname__ = name.replace("-", "_") + "_command"
    run.__doc__ = help_line
    return run


train_command = _subcommand("train", "train a LoRA policy with mica advantages (mica_train)")
eval_command = _subcommand("eval", "evaluate a policy on the evaluation scenarios (mica_train)")
tiny_model_command = _subcommand("tiny-model",
                                 "build the tiny offline model and tokenizer (mica_train)")
warm_start_command = _subcommand("warm-start",
                                 "supervised warm start of a policy (mica_train)")


if __name__ == "__main__":
    raise SystemExit(main())
