"""Command line of the support environment (``mica env ...``).

    python -m mica_train.env.cli replay EPISODES.jsonl
    python -m mica_train.env.cli eval --policy pacing --scenarios eval --json
    python -m mica_train.env.cli scenarios OUT.jsonl --n 200 --seed 0

Invalid input exits with status 2 and a one-line error on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

POLICIES = ("pacing", "advice_first", "validation_only", "random", "pacing_recent", "reactive", "greedy")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(f"{self.prog}: error: {message}")


def _end_rule_args(p, max_turns):
    p.add_argument("--max-turns", type=int, default=max_turns,
                   help=f"episode length limit (default {max_turns})")
    p.add_argument("--min-turns", type=int, default=12,
                   help="success and failure count from this turn (default 12)")
    p.add_argument("--success", choices=("empa", "zone"), default="empa",
                   help="success rule (default empa)")
    p.add_argument("--epsilon", type=float, default=1.0, help="target-zone width (default 1)")
    p.add_argument("--on-judge-failure", choices=("mean", "drop"), default="mean",
                   help="policy for failed judge turns (default mean)")


def build_parser(prog="mica env"):
    parser = _Parser(prog=prog, description="EMPA-style support-state environment.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("replay", help="replay recorded judge rubrics through the state engine",
                       description="Read one episode per line ({\"initial\": {C.1..P.3}, "
                                   "\"turns\": [{C.Prog..P.Neg} or null, ...]}) and print, per "
                                   "episode, one JSON line with states, distances, energies "
                                   "and the end status.")
    p.add_argument("file", help="JSONL file, '-' for stdin")
    _end_rule_args(p, 45)

    p = sub.add_parser("eval", help="run a scripted policy over scenarios",
                       description="Run a scripted policy over a scenario set and print the "
                                   "aggregated metrics.")
    p.add_argument("--policy", choices=POLICIES, required=True)
    p.add_argument("--scenarios", default="eval",
                   help="'eval' (the fixed 30-card set) or a scenarios JSONL file")
    p.add_argument("--seeds", type=int, default=1,
                   help="episodes per scenario, seeds 0..N-1 (default 1)")
    p.add_argument("--simulator", choices=("embedded", "llm", "llm_judge"),
                   default="embedded")
    p.add_argument("--base-url", default=None, help="LLM endpoint (default $MICA_LLM_BASE_URL)")
    p.add_argument("--model", default=None, help="LLM model (default $MICA_LLM_MODEL)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _end_rule_args(p, 45)

    p = sub.add_parser("scenarios", help="write generated training scenarios as JSONL")
    p.add_argument("out", help="output JSONL file")
    p.add_argument("--n", type=int, default=100, help="number of cards (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", action="store_true", help="write the fixed evaluation set instead")
    return parser


def _replay(args):
    from .engine import replay_episode, validate_end_rule
    from .rubric import iter_jsonl

    validate_end_rule(args.max_turns, args.min_turns, args.success, 5, 0.05, args.epsilon)
    name = "<stdin>" if args.file == "-" else args.file
    # bytes: a line that is not UTF-8 is reported with its number by iter_jsonl
    stream = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
    out = []
    try:
        for lineno, where, record in iter_jsonl(stream, name):
            result = replay_episode(record, max_turns=args.max_turns, min_turns=args.min_turns,
                                    success=args.success, epsilon=args.epsilon,
                                    on_judge_failure=args.on_judge_failure, where=where)
            out.append(json.dumps({"line": lineno, **result}))
    finally:
        if args.file != "-":
            stream.close()
    # Printed only once every episode parsed: a bad line gives no partial output.
    for line in out:
        print(line)
    return 0


def _eval(args):
    from .env import EnvConfig, aggregate_metrics, make_env
    from .policies import evaluate_policy
    from .scenarios import eval_scenarios, load_scenarios

    if args.seeds < 1:
        raise _UsageError("mica env eval: error: --seeds must be >= 1")
    if args.policy == "greedy" and args.simulator != "embedded":
        raise _UsageError("mica env eval: error: --policy greedy looks ahead in the embedded simulator only")
    scenarios = eval_scenarios() if args.scenarios == "eval" else load_scenarios(args.scenarios)
    cfg = EnvConfig(max_turns=args.max_turns, min_turns=args.min_turns, success=args.success,
                    epsilon=args.epsilon, on_judge_failure=args.on_judge_failure,
                    simulator=args.simulator, base_url=args.base_url, model=args.model)
    env = make_env(cfg)
    metrics = evaluate_policy(args.policy, scenarios, env, seeds=range(args.seeds))
    result = {"policy": args.policy, "scenarios": args.scenarios,
              "max_turns": args.max_turns, "min_turns": args.min_turns,
              "success": args.success, "seeds": args.seeds, **aggregate_metrics(metrics)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"policy {args.policy} on {args.scenarios}: {result['n']} episodes, "
              f"pass {result['pass_count']}/{result['n']} ({result['pass_rate']:.1%}), "
              f"mean final distance {result['mean_final_distance']:.3f}, "
              f"mean turns {result['mean_turns']:.2f}")
    return 0


def _scenarios(args):
    from .scenarios import eval_scenarios, generate_scenarios, save_scenarios

    cards = eval_scenarios() if args.eval else generate_scenarios(args.n, seed=args.seed)
    save_scenarios(cards, args.out)
    print(f"wrote {len(cards)} scenarios to {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """support-state environment: replay, eval, scenarios (mica_train)

    Runs ``mica env`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return {"replay": _replay, "eval": _eval, "scenarios": _scenarios}[args.command](args)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except _UsageError as e:
        print(str(e).splitlines()[0], file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # MicaInputError is a ValueError
        print(f"mica env {getattr(args, 'command', '')}: error: {' '.join(str(e).split())}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
