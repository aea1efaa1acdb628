"""The training loop: rollouts -> mica_core advantages -> PPO-clip updates, with checkpoints.

One step (one rollout batch)::

    rollout    scenarios_per_step groups x group_size episodes, each turn one batched generate
    advantage  mica_core.compute_advantages on the trajectory table (one row per turn)
    update     old (and reference) log-probs, then epochs x minibatches AdamW updates of the
               token-mean PPO-clip loss, gradients clipped; the schedule advances per update

Old log-probs come from the rollout's own logits (``loss.old_logprobs``: ``auto`` takes them in
float32) or from a forward pass; the reference pass runs only for a KL term (``loss.kl_coef``)
or the ``loss.kl_metric``; rollouts and evaluations generate with the LoRA adapter merged
(``rollout.merge_lora``) in mica's sampling loop (``rollout.sampler``); forward passes take
rows of similar length together (``optim.sort_by_length``). Switched back, these give the
trainer as it was, which ``python -m bench.train`` measures side by side with them.

Everything random in step ``k`` is seeded from ``(seed, k)``: scenario choice, environment
seeds, sampling, minibatch order. With the optimizer, scheduler and weights restored from the
checkpoint of step ``k``, a resumed run computes step ``k + 1`` exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import TrainConfig, config_to_dict, make_env_config
from .rollout import derive_seed

# Test hook of tests/train/test_train_resume.py, not a setting: with this variable set to N the
# process SIGKILLs itself in the middle of step N + 1 (after N steps of this process).
KILL_AFTER_STEPS_ENV = "MICA_TRAIN_TEST_KILL_AFTER_STEPS"

__all__ = ["JudgeFailureStop", "StepTimes", "Trainer", "TrainingDiverged", "evaluate",
           "training_scenarios", "warmup_cosine"]


class JudgeFailureStop(RuntimeError):
    """A step's rollouts had more failed judge turns than ``env.max_judge_failure_share``: the
    run stops before training on their fallback rewards (``mica train`` exits with status 2)."""


class TrainingDiverged(RuntimeError):
    """The loss, the gradient or the weights became NaN or infinite: training stops (``mica
    train`` prints the one-line message and exits with status 2)."""


def warmup_cosine(total: int, warmup: int, min_ratio: float):
    """LR multiplier: linear warm-up over ``warmup`` updates, then cosine decay to ``min_ratio``."""

    def factor(i: int) -> float:
        if warmup > 0 and i < warmup:
            return (i + 1) / warmup
        span = max(1, total - warmup)
        progress = min(1.0, (i - warmup) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def training_scenarios(data_cfg) -> list:
    from .env import generate_scenarios, load_scenarios

    if data_cfg.scenarios_file:
        return list(load_scenarios(data_cfg.scenarios_file))
    return list(generate_scenarios(data_cfg.train_scenarios, seed=data_cfg.scenario_seed))


def seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def generation_context(policy, rollout_cfg):
    """Where rollouts and evaluations generate: the merged adapter when ``rollout.merge_lora``."""
    return policy.merged_adapter() if rollout_cfg.merge_lora else contextlib.nullcontext()


def evaluate(policy, cfg: TrainConfig, scenarios=None, dist=None, *, transcripts=None,
             progress: bool = False) -> dict[str, Any]:
    """Pass rate and the other aggregate metrics on the evaluation scenarios (default: the fixed
    evaluation set). The torch RNG is forked, so evaluating does not change the training run.

    ``transcripts``: a JSON-lines path for the episodes' transcripts (``mica_train.transcripts``;
    credit from ``cfg.advantage``, episodes grouped by scenario). ``progress``: a bar of
    finished episodes on stderr."""
    import torch

    from .distributed import DistInfo, all_gather_objects
    from .env import aggregate_metrics, eval_scenarios, make_env
    from .rollout import run_episodes

    dist = dist or DistInfo()
    scenarios = list(eval_scenarios() if scenarios is None else scenarios)
    env = make_env(make_env_config(cfg.env, cfg.eval.max_turns or None))
    per = cfg.eval.episodes_per_scenario
    jobs = [(i, k) for i in range(len(scenarios)) for k in range(per)]
    mine = jobs[dist.rank::dist.world_size]
    bar = None
    if progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc="mica eval", unit="episode", dynamic_ncols=True)

    def report(finished, total, turn):
        bar.update(finished - bar.n)
        bar.set_postfix(turn=turn)

    try:
        with torch.random.fork_rng(devices=[policy.device] if policy.device.type == "cuda" else []), \
                generation_context(policy, cfg.rollout):
            torch.manual_seed(derive_seed(cfg.eval.seed, dist.rank))
            records = run_episodes(
                policy,
                env,
                [scenarios[i] for i, _ in mine],
                [derive_seed(cfg.eval.seed, i, k) for i, k in mine],
                [i for i, _ in mine],
                [i * per + k for i, k in mine],
                cfg.rollout,
                temperature=cfg.eval.temperature,
                progress=report if bar is not None else None,
            )
    finally:
        if bar is not None:
            bar.close()
        env.close()
    metrics = [m for part in all_gather_objects(dist, [r.metrics for r in records]) for m in part]
    if transcripts is not None:
        from .transcripts import add_credit, episode_transcripts, write_transcripts

        parts = all_gather_objects(dist, episode_transcripts(records, split="eval"))
        if dist.is_main:
            episodes = sorted((t for part in parts for t in part), key=lambda t: t["traj"])
            write_transcripts(transcripts, add_credit(episodes, cfg.advantage.estimator, **cfg.advantage.options))
    return dict(aggregate_metrics(metrics))


def _lengths(prompts, responses) -> np.ndarray:
    """``[n, 2]`` prompt and reply lengths of the turn rows."""
    return np.array([[len(p), len(r)] for p, r in zip(prompts, responses)], dtype=np.int64).reshape(-1, 2)


@dataclass
class StepTimes:
    rollout: float = 0.0
    advantage: float = 0.0
    update: float = 0.0

    @property
    def total(self) -> float:
        return self.rollout + self.advantage + self.update


class Trainer:
    """``Trainer(cfg).train()`` runs (or resumes) the run in ``cfg.run_dir``."""

    def __init__(self, cfg: TrainConfig):
        import torch

        from .distributed import init_distributed

        self.cfg = cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.dist = init_distributed()
        self.run_dir = Path(cfg.run_dir)
        self._validate()
        self.logger = None
        self._lock = None
        created = self._claim_run_dir() if self.dist.is_main else None
        try:
            self._setup()
        except BaseException:
            self._abandon(created)
            raise

    def _claim_run_dir(self) -> Path | None:
        """Create the run directory (main process) and lock it; returns the topmost directory
        this call created (None when it existed), which :meth:`_abandon` removes again if the
        set-up fails."""
        from .checkpoint import RunDirLock
        from .config import ConfigError

        created = next((p for p in reversed((self.run_dir, *self.run_dir.parents)) if not p.exists()), None)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._lock = RunDirLock(self.run_dir)
            self._lock.acquire()
        except OSError as exc:
            self._abandon(created)
            raise ConfigError(f"run_dir {self.run_dir}: cannot write there ({exc.strerror or exc})") from None
        except BaseException:
            self._abandon(created)
            raise
        return created

    def _abandon(self, created: Path | None) -> None:
        """A set-up that failed leaves nothing behind: the lock released, and the run
        directory removed again when this trainer created it (it holds only the lock file)."""
        import shutil

        if self.logger is not None:
            self.logger.close()
        if self._lock is not None:
            if self._lock.held and created is not None:
                self._lock.path.unlink(missing_ok=True)
            self._lock.release()
        if created is not None and (not self.run_dir.is_dir() or not any(self.run_dir.iterdir())):
            shutil.rmtree(created, ignore_errors=True)

    def _setup(self) -> None:
        import torch

        from .checkpoint import (
            CheckpointError,
            latest_checkpoint,
            load_checkpoint_state,
            read_json_object,
            read_trainer_state,
            restore_rng_state,
        )
        from .config import check_resume
        from .env import make_env
        from .policy import load_policy

        cfg = self.cfg
        seed_all(derive_seed(cfg.seed, 0, self.dist.rank))
        ckpt = latest_checkpoint(self.run_dir)
        self.resumed_from = ckpt
        if ckpt is not None:
            # The checkpoint's own record of its config is the reference; config.json (rewritten
            # at every start) must agree with it too when present.
            where = f"run_dir {self.run_dir}"
            check_resume(read_trainer_state(ckpt)["config"], cfg, where)
            saved_config = self.run_dir / "config.json"
            if saved_config.is_file():
                check_resume(read_json_object(saved_config), cfg, where)
            state = load_checkpoint_state(ckpt)  # before the model: a bad file fails fast
        self.policy = load_policy(
            cfg.model,
            cfg.lora,
            weights_dir=None if ckpt is None else ckpt / "weights",
            need_reference=cfg.loss.kl_coef > 0 or cfg.loss.kl_metric,
        )
        self.env = make_env(make_env_config(cfg.env))
        self.scenarios = training_scenarios(cfg.data)
        params = self.policy.trainable_parameters()
        self.params = params
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
        )
        total_updates = cfg.steps * cfg.optim.epochs * cfg.optim.minibatches
        warmup = round(cfg.optim.warmup_ratio * total_updates)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(total_updates, warmup, cfg.optim.min_lr_ratio)
        )
        self.step = 0
        self.elapsed = 0.0
        self._steps_this_process = 0
        self._kill_after_steps = int(os.environ.get(KILL_AFTER_STEPS_ENV) or 0)
        if ckpt is not None:
            try:
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
                rng = state["rng"]
                restore_rng_state(rng[self.dist.rank] if self.dist.rank < len(rng) else rng[0])
                self.elapsed = float(state.get("elapsed_seconds", 0.0))
            except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
                why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(f"{ckpt}: the optimizer, scheduler or RNG state does not fit this "
                                      f"run ({why[:200]})") from None
            self.step = int(state["step"])
        if self.dist.is_main:
            from mica_core.atomic import atomic_write_json

            from .metrics import MetricsLogger

            atomic_write_json(self.run_dir / "config.json", config_to_dict(cfg))
            self.logger = MetricsLogger(self.run_dir, resume_step=self.step, tensorboard=cfg.tensorboard)

    def close(self) -> None:
        """Close the metrics writers and release the run directory (``train`` does this when
        it ends; a later ``train`` takes the lock again)."""
        if self.logger is not None:
            self.logger.close()
        if self._lock is not None:
            self._lock.release()

    def _validate(self) -> None:
        from .config import ConfigError, check_config

        check_config(self.cfg)
        if self.cfg.data.scenarios_per_step < self.dist.world_size:
            raise ConfigError("data.scenarios_per_step must be >= the number of processes")

    @property
    def old_logprobs_from_rollout(self) -> bool:
        """Whether PPO's old log-probs are the rollout's (``loss.old_logprobs``; ``auto``: in
        float32, where generate's logits and a forward pass agree to rounding; in bf16/fp16
        they differ by up to ~1e-2 and are recomputed, as verl does)."""
        import torch

        mode = self.cfg.loss.old_logprobs
        return mode == "rollout" or (mode == "auto" and self.policy.dtype == torch.float32)

    @property
    def needs_reference_pass(self) -> bool:
        """A KL term in the loss or the KL metric asks for the reference log-probs."""
        lc = self.cfg.loss
        return self.policy.has_reference and (lc.kl_coef > 0 or lc.kl_metric)

    # ------------------------------------------------------------------ rollout
    def _scenario_index(self, step: int, group: int) -> int:
        """Scenarios are drawn without replacement, a fresh permutation of the pool per pass."""
        n = len(self.scenarios)
        k = (step - 1) * self.cfg.data.scenarios_per_step + group
        perm = np.random.default_rng(derive_seed(self.cfg.seed, 7, k // n)).permutation(n)
        return int(perm[k % n])

    def rollout(self, step: int):
        from .rollout import run_episodes

        cfg = self.cfg
        G = cfg.data.group_size
        groups = list(range(cfg.data.scenarios_per_step))[self.dist.rank::self.dist.world_size]
        scen, seeds, grp, traj = [], [], [], []
        for g in groups:
            sc = self.scenarios[self._scenario_index(step, g)]
            for k in range(G):
                scen.append(sc)
                seeds.append(derive_seed(cfg.seed, step, g, k))
                grp.append(g)
                traj.append(g * G + k)
        with generation_context(self.policy, cfg.rollout):
            return run_episodes(self.policy, self.env, scen, seeds, grp, traj, cfg.rollout,
                                with_logprobs=self.old_logprobs_from_rollout)

    def save_transcripts(self, step: int, records, credit) -> None:
        """``RUN_DIR/transcripts/step_NNNNNN.jsonl`` (this process's episodes, with the credit
        the update used) and a few of them as TensorBoard text."""
        from .transcripts import conversation_markdown, episode_transcripts, pick_samples, write_transcripts

        found = episode_transcripts(records, credit, step=step, estimator=self.cfg.advantage.estimator)
        write_transcripts(self.run_dir / "transcripts" / f"step_{step:06d}.jsonl", found)
        if self.logger is not None:
            for k, t in enumerate(pick_samples(found, self.cfg.tensorboard_conversations)):
                self.logger.log_text(f"conversations/sample_{k}", conversation_markdown(t), step)

    def plot_curves(self) -> None:
        """``RUN_DIR/learning_curves.png`` from the metrics so far."""
        if self.logger is not None and self.cfg.plot and self.logger.records:
            from .metrics import plot_learning_curves

            plot_learning_curves(self.logger.records, self.run_dir / "learning_curves.png", title=str(self.run_dir))

    # ---------------------------------------------------------------- advantage
    def advantages(self, table):
        """Turn advantages of this process's rows, and the mica_core output table (reward,
        return, advantage) of the whole batch: the turns of every process are gathered first,
        so batch-scope estimators see the whole batch."""
        import pyarrow as pa

        import mica_core as mc

        from .distributed import all_gather_objects

        local = table.select(["group_id", "traj_id", "turn", "distance", "initial_distance"])
        start = 0
        full = local
        if self.dist.enabled:
            parts = all_gather_objects(self.dist, local.to_pydict())
            full = pa.concat_tables([pa.table(p, schema=local.schema) for p in parts])
            start = sum(len(p["turn"]) for p in parts[: self.dist.rank])
        out = mc.compute_advantages(full, estimator=self.cfg.advantage.estimator, **self.cfg.advantage.options)
        adv = out.column("advantage").to_numpy()[start:start + local.num_rows]
        return adv, out

    # ------------------------------------------------------------------- update
    def _micro_slices(self, idx: np.ndarray, lengths: np.ndarray | None = None) -> list[np.ndarray]:
        """Rows ``idx`` in forward passes of at most ``optim.micro_batch_rows``; with
        ``optim.sort_by_length`` the rows are ordered by (prompt, reply) length first, so each
        pass pads less (about 13 % padding instead of 30 % in the demo's minibatches). The
        gradient is a sum over all rows of the minibatch either way."""
        size = self.cfg.optim.micro_batch_rows
        if size <= 0 or len(idx) <= size:
            return [idx]
        if lengths is not None and self.cfg.optim.sort_by_length:
            idx = idx[np.lexsort((lengths[idx, 1], lengths[idx, 0]))]
        return [idx[i:i + size] for i in range(0, len(idx), size)]

    def _batch(self, prompts, responses, idx):
        from .policy import collate_turns

        return collate_turns([prompts[i] for i in idx], [responses[i] for i in idx],
                             self.policy.tokenizer.pad_token_id, self.policy.device)

    def _pad_rows(self, rows, idx, width):
        import torch

        out = torch.zeros((len(idx), width), dtype=torch.float32, device=self.policy.device)
        for j, i in enumerate(idx):
            out[j, : rows[i].shape[0]] = rows[i]
        return out

    def _score(self, model, prompts, responses, with_entropy: bool):
        """Per-row log-probs (and entropies) under ``model``, no gradient."""
        import torch

        from .policy import response_logprobs

        logps, ents = [None] * len(prompts), [None] * len(prompts)
        idx = np.arange(len(prompts))
        with torch.no_grad():
            for sl in self._micro_slices(idx, _lengths(prompts, responses)):
                batch = self._batch(prompts, responses, sl)
                lp, ent = response_logprobs(model, batch, self.cfg.rollout.temperature, with_entropy=with_entropy)
                for j, i in enumerate(sl):
                    n = len(responses[i])
                    logps[i] = lp[j, :n].float()
                    if with_entropy:
                        ents[i] = ent[j, :n].float()
        return logps, ents if with_entropy else []

    def update(self, table, advantage: np.ndarray, step: int) -> dict[str, float]:
        import torch

        import mica_core as mc

        from .distributed import all_reduce_grads, all_reduce_sum
        from .loss import policy_loss
        from .policy import response_logprobs

        cfg = self.cfg
        lc = cfg.loss
        prompts = table.column("prompt_ids").to_pylist()
        responses = table.column("response_ids").to_pylist()
        model = self.policy.model
        t0 = time.perf_counter()
        if self.old_logprobs_from_rollout:
            old_logp = [torch.tensor(x, dtype=torch.float32, device=self.policy.device)
                        for x in table.column("logprobs").to_pylist()]
            old_ent = [torch.tensor(x, dtype=torch.float32) for x in table.column("entropies").to_pylist()]
        else:
            old_logp, old_ent = self._score(model, prompts, responses, with_entropy=lc.entropy_coef <= 0)
        ref_logp = None
        if self.needs_reference_pass:
            with self.policy.reference_model() as ref:
                ref_logp, _ = self._score(ref, prompts, responses, with_entropy=False)
        t_score = time.perf_counter() - t0

        # transformers checkpoints activations only in train mode; otherwise dropout stays off so
        # the ratio is exactly 1 before the first update.
        model.train(cfg.model.gradient_checkpointing)
        n = len(prompts)
        lengths = _lengths(prompts, responses)
        sums = dict.fromkeys(("loss", "pg_loss", "clip_frac", "dual_clip_frac", "ppo_kl", "kl", "entropy"), 0.0)
        grad_norm = 0.0
        n_updates = 0
        for epoch in range(cfg.optim.epochs):
            order = np.random.default_rng(derive_seed(cfg.seed, step, epoch, 11, self.dist.rank)).permutation(n)
            for mb in np.array_split(order, cfg.optim.minibatches):
                local_tokens = float(sum(len(responses[i]) for i in mb))
                (n_tokens,) = all_reduce_sum(self.dist, [local_tokens], self.policy.device)
                self.optimizer.zero_grad(set_to_none=True)
                mb_stats = dict.fromkeys(sums, 0.0)
                for sl in self._micro_slices(mb, lengths) if len(mb) else []:
                    batch = self._batch(prompts, responses, sl)
                    R = batch.response_width
                    logp, ent = response_logprobs(model, batch, cfg.rollout.temperature,
                                                  with_entropy=lc.entropy_coef > 0)
                    mask = batch.response_mask
                    adv_rows = torch.as_tensor(advantage[sl], dtype=torch.float32, device=mask.device)
                    adv_tok = mc.broadcast_to_tokens(adv_rows, mask, layout="turn")
                    terms = policy_loss(
                        logp,
                        self._pad_rows(old_logp, sl, R),
                        adv_tok.to(logp.dtype),
                        mask,
                        eps_low=lc.eps_low,
                        eps_high=lc.eps_high,
                        dual_clip=lc.dual_clip,
                        ref_logp=None if ref_logp is None else self._pad_rows(ref_logp, sl, R),
                        kl_coef=lc.kl_coef,
                        entropy=ent,
                        entropy_coef=lc.entropy_coef,
                        n_tokens=max(n_tokens, 1.0),
                    )
                    terms.loss.backward()
                    mb_stats["loss"] += float(terms.loss.detach())
                    for key in ("pg_loss", "clip_frac", "dual_clip_frac", "ppo_kl"):
                        mb_stats[key] += float(getattr(terms, key))
                    if terms.kl is not None:
                        mb_stats["kl"] += float(terms.kl)
                    if terms.entropy is not None:
                        mb_stats["entropy"] += float(terms.entropy)
                all_reduce_grads(self.dist, self.params)
                for p in self.params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                if cfg.optim.max_grad_norm > 0:
                    gn = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.max_grad_norm)
                else:
                    gn = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self.params))
                self.optimizer.step()
                self.scheduler.step()
                keys = list(mb_stats)
                reduced = all_reduce_sum(self.dist, [mb_stats[k] for k in keys], self.policy.device)
                for k, v in zip(keys, reduced):
                    sums[k] += v
                grad_norm += float(gn)
                n_updates += 1
        model.eval()
        self._check_finite(step, sums["loss"], grad_norm)
        stats = {k: v / max(n_updates, 1) for k, v in sums.items()}
        stats["grad_norm"] = grad_norm / max(n_updates, 1)
        if ref_logp is None:
            stats.pop("kl")
        if lc.entropy_coef <= 0:
            # Entropy of the sampling policy, measured on the old log-prob pass.
            tok_ent = torch.cat(old_ent) if old_ent else torch.zeros(0)
            ent_sum, ent_n = all_reduce_sum(self.dist, [float(tok_ent.sum()), float(tok_ent.numel())],
                                            self.policy.device)
            stats["entropy"] = ent_sum / max(ent_n, 1.0)
        stats["lr"] = float(self.scheduler.get_last_lr()[0])
        stats["time_logprob"] = t_score
        return stats

    def _check_finite(self, step: int, loss: float, grad_norm: float) -> None:
        """Stop with :class:`TrainingDiverged` when the step's loss, gradient norm or the
        trained weights are no longer finite: saving or logging them would record a broken
        run (the last checkpoint stays the last good state)."""
        import torch

        bad = [f"{name} {value}" for name, value in (("loss", loss), ("gradient norm", grad_norm))
               if not math.isfinite(value)]
        with torch.no_grad():
            if not all(bool(torch.isfinite(p).all()) for p in self.params):
                bad.append("the trained weights")
        if bad:
            from .checkpoint import latest_checkpoint

            last = latest_checkpoint(self.run_dir)
            kept = f"the last checkpoint is {last.name}" if last is not None else "no checkpoint was saved"
            raise TrainingDiverged(f"step {step}: training diverged ({', '.join(bad)} not finite); stopped "
                                   f"before saving or logging it, {kept} (lower optim.lr, or check "
                                   f"lora.alpha and model.dtype)")

    # ---------------------------------------------------------------- one step
    def train_step(self, step: int) -> dict[str, Any]:
        import torch

        from .distributed import all_gather_objects
        from .rollout import trajectory_table

        cfg = self.cfg
        torch.manual_seed(derive_seed(cfg.seed, step, 3, self.dist.rank))
        times = StepTimes()

        t0 = time.perf_counter()
        records = self.rollout(step)
        table = trajectory_table(records)
        times.rollout = time.perf_counter() - t0
        from .env import aggregate_metrics

        ep_metrics = [m for part in all_gather_objects(self.dist, [r.metrics for r in records]) for m in part]
        agg = aggregate_metrics(ep_metrics)
        self._check_judge_failures(step, agg)

        if 0 < self._kill_after_steps <= self._steps_this_process:
            # Test hook: die abruptly in the middle of a step, as an external kill would.
            os.kill(os.getpid(), signal.SIGKILL)

        t0 = time.perf_counter()
        adv, batch_table = self.advantages(table)
        times.advantage = time.perf_counter() - t0

        t0 = time.perf_counter()
        stats = self.update(table, adv, step)
        times.update = time.perf_counter() - t0

        if self.dist.is_main and cfg.transcripts_every > 0 and step % cfg.transcripts_every == 0:
            # This process's rows lead the gathered batch (see advantages()) on process 0.
            self.save_transcripts(step, records, batch_table.slice(0, table.num_rows))

        all_adv = batch_table.column("advantage").to_numpy()
        reward = batch_table.column("reward").to_numpy()
        resp_len = np.array([len(r) for r in table.column("response_ids").to_pylist()], dtype=float)
        rec = {
            "step": step,
            "pass_rate": float(agg["pass_rate"]),
            "mean_final_distance": float(agg["mean_final_distance"]),
            "mean_turns": float(agg.get("mean_turns", float("nan"))),
            "episodes": int(agg.get("n", len(ep_metrics))),
            "turns": len(all_adv),
            "reward_mean": float(np.mean(reward)) if len(reward) else float("nan"),
            "advantage_mean": float(np.mean(all_adv)) if len(all_adv) else float("nan"),
            "advantage_std": float(np.std(all_adv)) if len(all_adv) else float("nan"),
            "advantage_min": float(np.min(all_adv)) if len(all_adv) else float("nan"),
            "advantage_max": float(np.max(all_adv)) if len(all_adv) else float("nan"),
            "response_tokens_mean": float(resp_len.mean()) if len(resp_len) else float("nan"),
            **stats,
            "time_rollout": times.rollout,
            "time_advantage": times.advantage,
            "time_update": times.update,
            "time_step": times.total,
        }
        rec["judge_failures"] = int(agg["judge_failures"])
        rec["judge_failure_rate"] = float(agg["judge_failure_rate"])
        rec["user_failures"] = int(agg["user_failures"])
        rec.update({k: v for k, v in agg.items() if k.startswith("llm_")})
        return rec

    def _check_judge_failures(self, step: int, agg: dict[str, Any]) -> None:
        """Raise :class:`JudgeFailureStop` when more of this step's judged turns failed than
        ``env.max_judge_failure_share`` allows (every process sees the same gathered counts)."""
        limit = self.cfg.env.max_judge_failure_share
        share = float(agg["judge_failure_rate"])
        if share <= limit:
            return
        counters = ", ".join(f"{k}={v}" for k, v in agg.items() if k.startswith("llm_") and v)
        raise JudgeFailureStop(
            f"step {step}: the judge failed on {agg['judge_failures']} turns ({share:.0%} of the "
            f"step's turns), more than env.max_judge_failure_share={limit}; stopped before "
            f"training on fallback rewards (check the LLM endpoint{': ' + counters if counters else ''})")

    # --------------------------------------------------------------------- loop
    def save(self) -> None:
        from .checkpoint import capture_rng_state, save_checkpoint
        from .distributed import all_gather_objects, barrier

        rng_states = all_gather_objects(self.dist, capture_rng_state())
        if self.dist.is_main:
            state = {
                "config": config_to_dict(self.cfg),
                "world_size": self.dist.world_size,
                "elapsed_seconds": self.elapsed,
                "sampler": {"scheme": "permutation per pass, seeded by (seed, pass)", "next_step": self.step + 1},
            }
            save_checkpoint(
                self.run_dir, self.step, self.policy, self.optimizer, self.scheduler, state, rng_states,
                keep=self.cfg.keep_checkpoints,
            )
        barrier(self.dist)

    def train(self, on_step=None) -> dict[str, Any]:
        """Run steps ``self.step + 1 .. cfg.steps``; returns the last metrics record (or {}).

        ``on_step(step, record)``, when given, is called after each step's update and
        evaluation, before the record is logged (entries it adds are logged too): ``mica
        study`` evaluates its checkpoints there."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self._lock is not None:
            self._lock.acquire()  # again, after a close()
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc="mica train",
            disable=not (cfg.progress and self.dist.is_main),
            dynamic_ncols=True,
        )
        last: dict[str, Any] = {}
        try:
            while self.step < cfg.steps:
                step = self.step + 1
                t_start = time.perf_counter()
                rec = self.train_step(step)
                evaluated = cfg.eval.every > 0 and step % cfg.eval.every == 0
                if evaluated:
                    ev = evaluate(self.policy, cfg, dist=self.dist)
                    rec["eval_pass_rate"] = float(ev["pass_rate"])
                    rec["eval_mean_final_distance"] = float(ev["mean_final_distance"])
                if on_step is not None:
                    on_step(step, rec)
                self.step = step
                self.elapsed += time.perf_counter() - t_start
                rec["elapsed_seconds"] = self.elapsed
                if self.logger is not None:
                    self.logger.log(rec)
                saved = step == cfg.steps or (cfg.save_every > 0 and step % cfg.save_every == 0)
                if saved:
                    self.save()
                if evaluated or saved:
                    self.plot_curves()  # a killed run keeps curves up to its last checkpoint
                self._steps_this_process += 1
                last = rec
                bar.update(1)
                bar.set_postfix(pass_rate=f"{rec['pass_rate']:.2f}", dist=f"{rec['mean_final_distance']:.2f}")
            if not last:
                self.plot_curves()  # nothing left to run: the curves of the finished run
        finally:
            bar.close()
            self.close()
        return last

