"""The environment: configuration, episodes and metrics.

``make_env(EnvConfig(...)).reset(scenario, seed)`` returns an ``Episode``; ``Episode.step(reply)``
judges the assistant's reply, moves the support state (``engine.SupportTrajectory``) and, while
the episode runs, appends the user's next message. Everything is deterministic given
``(scenario, seed)`` and the replies (the embedded simulator draws from generators seeded by
``scenario.id`` and ``seed``; an LLM endpoint is deterministic only as far as the server is).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, fields, replace

from mica_core import MicaInputError

from .engine import SupportTrajectory, mean_increment, validate_end_rule
from .errors import JudgeError, public_url
from .rubric import progress_increment
from .scenarios import Scenario
from .simulator import EmbeddedDynamics, EmbeddedJudge, EmbeddedUser

__all__ = ["EnvConfig", "StepResult", "Episode", "SupportEnv", "make_env", "aggregate_metrics",
           "JudgeError"]

SIMULATORS = ("embedded", "llm", "llm_judge")
JUDGE_FAILURE_POLICIES = ("mean", "drop")
MAX_TIMEOUT = 86400.0  # one request's deadline, seconds (a socket cannot wait much longer)


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class EnvConfig:
    """Settings of the support environment (each field's ``metadata["help"]`` says more).

    Defaults are the training settings (15 turns, decisions from turn 12);
    ``EnvConfig.for_evaluation()`` gives the evaluation settings (45 turns).
    """

    max_turns: int = _f(15, "episode length limit (EMPA: 15 for training, 45 for evaluation)")
    min_turns: int = _f(12, "success and failure are declared only from this turn on")
    success: str = _f("empa", "'empa': (|P_t| <= 0.05|P_0| or P_t.v0 >= -0.05|P_0|) and "
                              "E >= |P_0|; 'zone': every axis >= -epsilon")
    simulator: str = _f("embedded", "'embedded' (offline, default), 'llm' (LLM user and judge) "
                                    "or 'llm_judge' (template user, LLM judge)")
    epsilon: float = _f(1.0, "width of the target zone (distance and 'zone' success)")
    axis_weights: tuple | None = _f(None, "weights of the C, A, P axes in the distance")
    failure_streak: int = _f(5, "consecutive negative-energy turns that end in failure")
    success_tolerance: float = _f(0.05, "EMPA's relative tolerance of the success rule")
    on_judge_failure: str = _f("mean", "a judge turn that fails after retries: 'mean' applies "
                                       "the trajectory's mean valid increment (rounded), 'drop' "
                                       "leaves the state unchanged and does not score the turn")
    dynamics: EmbeddedDynamics | None = _f(None, "constants of the embedded simulator (None: "
                                                 "defaults; a dict of EmbeddedDynamics fields)")
    # LLM endpoint (OpenAI-compatible chat completions)
    base_url: str | None = _f(None, "endpoint base URL, e.g. http://127.0.0.1:8000/v1 "
                                    "(default: $MICA_LLM_BASE_URL)")
    model: str | None = _f(None, "model name sent to the endpoint (default: $MICA_LLM_MODEL)")
    api_key: str | None = _f(None, "API key (never logged; default: $<api_key_env>)",
                             repr=False)
    api_key_env: str = _f("MICA_LLM_API_KEY", "environment variable holding the API key")
    timeout: float = _f(60.0, "seconds per HTTP request (each attempt, from connecting to "
                              "the last byte of the answer)")
    retries: int = _f(3, "retries after a failed request or an unparsable reply")
    backoff: float = _f(0.5, "first retry delay in seconds, doubled at each retry")
    backoff_max: float = _f(8.0, "largest retry delay in seconds")
    backoff_jitter: float = _f(0.25, "each retry delay is multiplied by 1 - jitter * U(0, 1), "
                                     "so that concurrent episodes do not retry in step")
    max_concurrency: int = _f(64, "episodes stepped at once, and the size of the connection "
                                  "pool (LLM simulators; a vLLM/SGLang server batches them)")
    judge_temperature: float = _f(0.0, "sampling temperature of the judge")
    user_temperature: float = _f(0.7, "sampling temperature of the user simulator")
    max_tokens: int = _f(256, "max_tokens of each completion")
    json_mode: bool = _f(False, "send response_format={'type': 'json_object'} to the judge")
    json_schema: bool = _f(False, "send the progress rubric's JSON schema as response_format "
                                  "(guided decoding on vLLM/SGLang; overrides json_mode)")
    history_messages: int = _f(12, "most recent messages shown to the LLM user and judge")
    max_response_bytes: int = _f(1 << 20, "largest response body read, in bytes (1 MiB); a "
                                          "larger one is a failed attempt, retried")

    def __post_init__(self):
        validate_end_rule(self.max_turns, self.min_turns, self.success, self.failure_streak,
                          self.success_tolerance, self.epsilon)
        if self.simulator not in SIMULATORS:
            raise MicaInputError(f"simulator must be one of {SIMULATORS}, got "
                                 f"{self.simulator!r}", column="simulator", rule="choice")
        if self.on_judge_failure not in JUDGE_FAILURE_POLICIES:
            raise MicaInputError(f"on_judge_failure must be one of {JUDGE_FAILURE_POLICIES}, "
                                 f"got {self.on_judge_failure!r}", column="on_judge_failure",
                                 rule="choice")
        if self.axis_weights is not None:
            w = tuple(float(x) for x in self.axis_weights)
            if len(w) != 3 or any(not math.isfinite(x) or x < 0 for x in w):
                raise MicaInputError("axis_weights must be three finite numbers >= 0",
                                     column="axis_weights", rule="weights")
            self.axis_weights = w
        if self.dynamics is None:
            self.dynamics = EmbeddedDynamics()
        elif isinstance(self.dynamics, dict):  # from a YAML or JSON config
            self.dynamics = EmbeddedDynamics(**self.dynamics)
        elif not isinstance(self.dynamics, EmbeddedDynamics):
            raise MicaInputError("dynamics must be an EmbeddedDynamics or a dict of its fields",
                                 column="dynamics", rule="type")
        for name in ("timeout", "backoff", "backoff_max"):
            v = getattr(self, name)
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0
                    or not math.isfinite(v)):
                raise MicaInputError(f"{name} must be a finite number >= 0, got {v!r}",
                                     column=name, rule="range")
        if not 0 < self.timeout <= MAX_TIMEOUT:
            raise MicaInputError(f"timeout must be in (0, {MAX_TIMEOUT}] seconds, got "
                                 f"{self.timeout!r}", column="timeout", rule="range")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise MicaInputError(f"retries must be an integer >= 0, got {self.retries!r}",
                                 column="retries", rule="range")
        v = self.max_concurrency
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise MicaInputError(f"max_concurrency must be an integer >= 1, got {v!r}",
                                 column="max_concurrency", rule="range")
        v = self.max_response_bytes
        if isinstance(v, bool) or not isinstance(v, int) or v < 1024:
            raise MicaInputError(f"max_response_bytes must be an integer >= 1024, got {v!r}",
                                 column="max_response_bytes", rule="range")
        v = self.backoff_jitter
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise MicaInputError(f"backoff_jitter must be a number in [0, 1], got {v!r}",
                                 column="backoff_jitter", rule="range")

    def __repr__(self):
        # The dataclass repr, with credentials in base_url hidden (the API key is repr=False).
        shown = []
        for f in fields(self):
            if f.repr:
                v = getattr(self, f.name)
                shown.append(f"{f.name}={public_url(v) if f.name == 'base_url' and v else v!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    @classmethod
    def for_evaluation(cls, **overrides):
        """Evaluation settings: ``max_turns=45`` (EMPA), other defaults unchanged."""
        overrides.setdefault("max_turns", 45)
        return cls(**overrides)

    def to_dict(self):
        """Settings as a dict, without the API key or credentials in ``base_url``."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "api_key"}
        if d["base_url"]:
            d["base_url"] = public_url(d["base_url"])
        d["dynamics"] = asdict(self.dynamics)
        return d


@dataclass(frozen=True)
class StepResult:
    """What ``Episode.step`` returns."""

    distance: float          # D_t after this turn
    state: tuple             # P_t, three ints (C, A, P)
    energy: float            # e_t = dP_t . v0
    done: bool
    status: str              # "running" | "success" | "failure" | "max_turns"
    user_message: str | None  # the user's next message; None once done
    judge_failed: bool       # the judge failed and on_judge_failure was applied
    turn: int = 0            # 1-based index of this turn
    cumulative_energy: float = 0.0
    rubric: dict | None = None  # the judge's progress rubric (None when it failed)


def _episode_rng(scenario, seed, stream):
    return random.Random(f"mica-env|{scenario.id}|{seed}|{stream}")


class Episode:
    """One conversation. Use ``SupportEnv.reset`` to make one."""

    def __init__(self, scenario, seed, config, judge, user, messages=None):
        self.scenario = scenario
        self.seed = seed
        self.config = config
        self._judge = judge
        self._user = user
        self._traj = SupportTrajectory(
            scenario.initial_state, max_turns=config.max_turns, min_turns=config.min_turns,
            success=config.success, epsilon=config.epsilon, weights=config.axis_weights,
            failure_streak=config.failure_streak, success_tolerance=config.success_tolerance)
        self._valid_increments = []
        self.judge_failures = 0
        self.rubrics = []
        self.request_stats = getattr(judge, "stats", None)  # LLM traffic (llm.RequestStats)
        self.messages = [] if messages is None else messages
        self.messages.append({"role": "user", "content": user.message(self._traj.state)})

    # state views
    initial_state = property(lambda self: self._traj.initial_state)
    initial_distance = property(lambda self: self._traj.initial_distance)
    state = property(lambda self: self._traj.state)
    states = property(lambda self: list(self._traj.states))
    distances = property(lambda self: list(self._traj.distances))
    energies = property(lambda self: list(self._traj.energies))
    turn = property(lambda self: self._traj.turn)
    done = property(lambda self: self._traj.done)
    status = property(lambda self: self._traj.status)
    end_turn = property(lambda self: self._traj.end_turn)

    @property
    def cumulative_energy(self):
        return self._traj.cumulative_energy

    def step(self, reply):
        """Judge the assistant's ``reply`` (str) and advance one turn; returns ``StepResult``."""
        if self.done:
            raise RuntimeError(f"episode {self.scenario.id!r} has ended ({self.status} at "
                               f"turn {self.end_turn}); call reset for a new one")
        if not isinstance(reply, str):
            raise TypeError(f"reply must be a str, got {type(reply).__name__}")
        rubric = None
        try:
            rubric = self._judge.judge(reply, self._traj.state)
            increment = progress_increment(rubric)
        except JudgeError:
            rubric = None
        if rubric is not None:
            self._valid_increments.append(increment)
            rec = self._traj.apply(increment)
        else:
            self.judge_failures += 1
            if self.config.on_judge_failure == "drop":
                rec = self._traj.apply((0, 0, 0), scored=False)
            else:
                rec = self._traj.apply(mean_increment(self._valid_increments))
        self.rubrics.append(rubric)
        self.messages.append({"role": "assistant", "content": reply})
        user_message = None
        if not rec.done:
            user_message = self._user.message(rec.state)
            self.messages.append({"role": "user", "content": user_message})
        return StepResult(distance=rec.distance, state=rec.state, energy=rec.energy,
                          done=rec.done, status=rec.status, user_message=user_message,
                          judge_failed=rubric is None, turn=rec.turn,
                          cumulative_energy=rec.cumulative_energy, rubric=rubric)

    def fork(self, seed=None):
        """An independent copy of this episode as it stands: the conversation, the support
        state and the simulator's hidden state (rapport, act streaks, a pending setback).

        ``seed=None`` copies the random generators too, so the fork draws what the original
        would draw next (the same replies give the same future). An integer ``seed`` instead
        reseeds the user's and the judge's generators from ``(scenario, episode seed, seed)``:
        forks made with one ``seed`` share their future draws whatever replies they are sent
        (common random numbers), forks with different seeds do not. Embedded simulator only
        (an LLM endpoint cannot be copied); raises ``ValueError`` otherwise.
        """
        import copy

        if self.config.simulator != "embedded":
            raise ValueError(f"Episode.fork: the {self.config.simulator!r} simulator cannot be "
                             "copied (embedded only)")
        # Scenario, config and dynamics are never mutated: share them. The generators are
        # copied only when they are kept (a Random's state is most of a deep copy's cost).
        memo = {id(self.scenario): self.scenario, id(self.config): self.config,
                id(self.config.dynamics): self.config.dynamics}
        if seed is not None:
            memo[id(self._user.rng)] = None
            memo[id(self._judge.rng)] = None
        new = copy.deepcopy(self, memo)
        if seed is not None:
            new._user.rng = _episode_rng(self.scenario, self.seed, f"fork|{int(seed)}|user")
            new._judge.rng = _episode_rng(self.scenario, self.seed, f"fork|{int(seed)}|judge")
        return new

    def metrics(self):
        """``pass``, ``status``, ``turns``, ``initial_distance``, ``final_distance``,
        ``energy`` (cumulative), ``positive_energy_ratio``, ``judge_failures``,
        ``user_failures``, ``scenario_id``."""
        m = self._traj.metrics()
        m["judge_failures"] = self.judge_failures
        m["user_failures"] = getattr(self._user, "failures", 0)
        m["scenario_id"] = self.scenario.id
        if self.request_stats is not None:
            m.update(self.request_stats.as_metrics())
        return m


class SupportEnv:
    """Factory of episodes for one configuration (see ``make_env``)."""

    def __init__(self, config):
        self.config = config
        self._client = None
        self._pool = None
        if config.simulator != "embedded":
            from .llm import ChatClient

            self._client = ChatClient.from_config(config)

    def reset(self, scenario, seed=0):
        """A new ``Episode`` for ``scenario`` (a ``Scenario`` or its dict), deterministic given
        ``(scenario, seed)``; ``ep.messages`` starts with the user's opening message."""
        if isinstance(scenario, dict):
            scenario = Scenario.from_dict(scenario)
        elif not isinstance(scenario, Scenario):
            raise TypeError(f"scenario must be a Scenario or a dict, got "
                            f"{type(scenario).__name__}")
        cfg = self.config
        # The conversation list is shared: the episode appends to it, the LLM user and judge
        # read it.
        messages = []
        user = EmbeddedUser(scenario, _episode_rng(scenario, seed, "user"), cfg.dynamics)
        if cfg.simulator == "embedded":
            judge = EmbeddedJudge(_episode_rng(scenario, seed, "judge"), cfg.dynamics, user)
        else:
            from .llm import LLMJudge, LLMUser, RequestStats

            stats = RequestStats()  # one per episode, shared by its judge and user
            judge = LLMJudge(self._client, scenario, messages, cfg, stats=stats)
            if cfg.simulator == "llm":
                user = LLMUser(self._client, scenario, messages, cfg, fallback=user,
                               stats=stats)
        ep = Episode(scenario, seed, cfg, judge, user, messages)
        return ep

    # Many episodes at once. An LLM simulator spends its time waiting on the endpoint, so
    # the episodes' requests go out together (up to max_concurrency), which is what lets a
    # vLLM/SGLang server batch them. Each episode still runs in one thread at a time and
    # draws only from its own generators, so the results do not depend on the concurrency.
    def reset_episodes(self, scenarios, seeds):
        """``[self.reset(sc, seed) for sc, seed in zip(scenarios, seeds)]``, concurrently
        for LLM simulators."""
        return self._map(lambda job: self.reset(*job), list(zip(scenarios, seeds)))

    def step_episodes(self, episodes, replies):
        """``[ep.step(r) for ep, r in zip(episodes, replies)]``, concurrently for LLM
        simulators; results in input order. Every step finishes before an error (the first
        in input order) is raised."""
        episodes = list(episodes)
        if len({id(ep) for ep in episodes}) != len(episodes):
            raise ValueError("step_episodes: an episode appears twice in one call")
        return self._map(lambda job: job[0].step(job[1]), list(zip(episodes, replies)))

    def _map(self, fn, jobs):
        if self._client is None or self.config.max_concurrency <= 1 or len(jobs) <= 1:
            return [fn(job) for job in jobs]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=self.config.max_concurrency,
                                            thread_name_prefix="mica-env")
        from concurrent.futures import wait

        futures = []
        try:
            for job in jobs:
                futures.append(self._pool.submit(fn, job))
            wait(futures)
        except BaseException:
            # Interrupted (SIGTERM turned into an exception, Ctrl-C): the process is stopping.
            # Drop the queued steps and end the requests in flight at once, so that no worker
            # thread keeps the process alive waiting on a slow endpoint.
            for f in futures:
                f.cancel()
            self._client.abort()
            raise
        return [f.result() for f in futures]

    def close(self):
        """End the endpoint calls still in flight, stop the worker threads and close the
        endpoint's connections."""
        if self._client is not None:
            self._client.abort()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._client is not None:
            self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_env(config=None, **overrides):
    """An environment for ``config`` (an ``EnvConfig``; keyword overrides replace fields)."""
    if config is None:
        config = EnvConfig(**overrides)
    elif overrides:
        config = replace(config, **overrides)
    if not isinstance(config, EnvConfig):
        raise TypeError(f"config must be an EnvConfig, got {type(config).__name__}")
    return SupportEnv(config)


def _mean(xs):
    return float(sum(xs) / len(xs)) if xs else float("nan")


def aggregate_metrics(episode_metrics):
    """Aggregate per-episode metrics (dicts from ``Episode.metrics``).

    Returns ``n``, ``pass_count``, ``pass_rate``, ``mean_final_distance``, ``mean_turns``,
    ``mean_energy``, ``mean_positive_energy_ratio``, ``mean_initial_distance``,
    ``mean_turns_to_success`` (None without successes), ``status_counts``,
    ``judge_failures``, ``judge_failure_rate`` (per turn), ``user_failures``, and for LLM
    simulators the sums of the ``llm_*`` request counters (``llm.RequestStats``).
    """
    ms = list(episode_metrics)
    if not ms:
        raise MicaInputError("aggregate_metrics needs at least one episode", rule="empty")
    passed = [m for m in ms if m["pass"]]
    turns = sum(m["turns"] for m in ms)
    statuses = {}
    for m in ms:
        s = m.get("status", "success" if m["pass"] else "unknown")
        statuses[s] = statuses.get(s, 0) + 1
    failures = sum(m.get("judge_failures", 0) for m in ms)
    return {
        "n": len(ms),
        "pass_count": len(passed),
        "pass_rate": len(passed) / len(ms),
        "mean_final_distance": _mean([m["final_distance"] for m in ms]),
        "mean_turns": _mean([m["turns"] for m in ms]),
        "mean_energy": _mean([m["energy"] for m in ms]),
        "mean_positive_energy_ratio": _mean([m["positive_energy_ratio"] for m in ms]),
        "mean_initial_distance": _mean([m["initial_distance"] for m in ms
                                        if "initial_distance" in m]),
        "mean_turns_to_success": _mean([m["turns"] for m in passed]) if passed else None,
        "status_counts": statuses,
        "judge_failures": failures,
        "judge_failure_rate": failures / turns if turns else 0.0,
        "user_failures": sum(m.get("user_failures", 0) for m in ms),
        **{k: sum(m.get(k, 0) for m in ms)
           for k in sorted({k for m in ms for k in m if k.startswith("llm_")})},
    }
