"""Command line of mica_train (also reached as ``mica train|eval|tiny-model|warm-start``).

    python -m mica_train.cli tiny-model --out runs/tiny/base
    python -m mica_train.cli warm-start --model runs/tiny/base --out runs/tiny/warm
    python -m mica_train.cli train --config configs/demo.yaml --set steps=20
    python -m mica_train.cli eval --config configs/demo.yaml --checkpoint latest

Heavy libraries (torch, transformers) are imported inside the commands: ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["build_parser", "main"]


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (see configs/ and docs/training.md)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field, e.g. --set optim.lr=3e-4 (repeatable; values are YAML)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mica", description="mica_train: LoRA policy-gradient training with mica advantages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a policy (resumes from the run's last checkpoint)")
    _add_config_args(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    p = sub.add_parser("eval", help="evaluate a policy on the evaluation scenario set")
    _add_config_args(p)
    p.add_argument(
        "--checkpoint",
        default="latest",
        help="'latest' (the run's newest checkpoint, else the base model), 'base', or a checkpoint directory",
    )
    p.add_argument("--out", default=None, help="write the metrics as JSON to this file")

    p = sub.add_parser("tiny-model", help="build the tiny offline model and tokenizer")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the tokenizer corpus")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2, help="attention heads (key-value heads: half as many)")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary cap (specials included)")
    p.add_argument("--episodes", type=int, default=200, help="corpus episodes the tokenizer is trained on")

    p = sub.add_parser("warm-start", help="supervised warm start on generated supportive replies")
    p.add_argument("--model", required=True, help="input model directory")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", type=int, default=200, help="corpus episodes")
    p.add_argument("--context-messages", type=int, default=1, help="messages of context, as in rollouts")
    p.add_argument("--context-replies", type=int, default=2, help="own earlier replies in the context, as in rollouts")
    p.add_argument("--no-progress", action="store_true")
    return parser


def _train(args) -> int:
    from .config import config_to_dict, load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    from .trainer import Trainer

    trainer = Trainer(cfg)
    if trainer.resumed_from is not None and trainer.dist.is_main:
        print(f"resuming from {trainer.resumed_from} (step {trainer.step})", file=sys.stderr)
    last = trainer.train()
    if trainer.dist.is_main and last:
        keys = ("step", "pass_rate", "mean_final_distance", "reward_mean", "kl", "time_step")
        print(json.dumps({k: last[k] for k in keys if k in last}))
    return 0


def _eval(args) -> int:
    from pathlib import Path

    from .checkpoint import latest_checkpoint
    from .config import load_config
    from .policy import load_policy
    from .trainer import evaluate

    cfg = load_config(args.config, args.overrides)
    weights = None
    if args.checkpoint == "latest":
        ckpt = latest_checkpoint(cfg.run_dir)
        weights = None if ckpt is None else ckpt / "weights"
    elif args.checkpoint != "base":
        weights = Path(args.checkpoint)
        weights = weights / "weights" if (weights / "weights").is_dir() else weights
    policy = load_policy(cfg.model, cfg.lora, weights_dir=weights)
    metrics = evaluate(policy, cfg)
    metrics["weights"] = str(weights) if weights is not None else f"base: {cfg.model.path}"
    text = json.dumps(metrics, indent=2, sort_keys=True, default=str)
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
    args = build_parser().parse_args(argv)
    return _COMMANDS[args.command](args)


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
