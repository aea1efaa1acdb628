"""Supervised warm start: teach a policy to produce each kind of supportive reply before RL.

The corpus is generated: episodes of the embedded environment in which every reply is a
``sample_reply`` of a uniformly random act (``validate``, ``reframe`` or ``plan``), so each
example pairs what the policy will see (the last messages, as in a rollout) with a reply whose
kind is independent of the conversation. After the warm start the policy speaks every kind of
reply and has no preference between them: choosing when to use which is left to RL.

    mica warm-start --model runs/tiny/base --out runs/tiny/warm --steps 400
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SFTExample", "WarmStartConfig", "corpus_texts", "generate_corpus", "tokenize_examples", "warm_start"]


@dataclass
class SFTExample:
    context: list[dict]  # the messages the policy sees (ends with a user message)
    reply: str
    act: str


def generate_corpus(n_episodes: int = 200, seed: int = 0, context_messages: int = 1, system_prompt: str = "",
                    max_turns: int = 15, context_replies: int = 2) -> list[SFTExample]:
    """Examples from ``n_episodes`` random-act episodes on generated scenarios (deterministic)."""
    from .env import SUPPORT_ACTS, EnvConfig, generate_scenarios, make_env, sample_reply
    from .policy import prompt_messages

    rng = random.Random(f"mica-warm-start|{seed}")
    env = make_env(EnvConfig(max_turns=max_turns, min_turns=min(12, max_turns)))
    out: list[SFTExample] = []
    for i, sc in enumerate(generate_scenarios(n_episodes, seed=seed, prefix="warm")):
        ep = env.reset(sc, seed=i)
        while not ep.done:
            act = rng.choice(SUPPORT_ACTS)
            reply = sample_reply(act, rng, sc)
            out.append(SFTExample(prompt_messages(ep.messages, context_messages, system_prompt, context_replies),
                                  reply, act))
            ep.step(reply)
    return out


def corpus_texts(examples: list[SFTExample]) -> list[str]:
    """Every distinct message of the corpus: the tokenizer's training text."""
    seen: dict[str, None] = {}
    for ex in examples:
        for m in ex.context:
            seen.setdefault(m["content"], None)
        seen.setdefault(ex.reply, None)
    return list(seen)


@dataclass
class WarmStartConfig:
    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_tokens: int = 160
    seed: int = 0
    n_episodes: int = 200
    context_messages: int = 1
    context_replies: int = 2
    system_prompt: str = ""


def tokenize_examples(tokenizer, examples: list[SFTExample], max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, assistant_mask)`` per example, through the chat template's generation mask
    (only the reply and its end-of-turn token are trained on: the policy's earlier replies in
    the context, ``context_replies``, are not); long prompts are cut on the left."""
    convs = [ex.context + [{"role": "assistant", "content": ex.reply}] for ex in examples]
    enc = tokenizer.apply_chat_template(
        convs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    out = []
    for ids, mask in zip(enc["input_ids"], enc["assistant_masks"]):
        # The template ends with a newline after <|im_end|>; it is never trained on.
        ids, mask = list(ids)[-max_tokens:], list(mask)[-max_tokens:]
        # the last run of ones is the reply; earlier runs are replies in the context
        end = max((i for i, m in enumerate(mask) if m), default=-1)
        start = end
        while start > 0 and mask[start - 1]:
            start -= 1
        mask = [1 if start <= i <= end else 0 for i in range(len(mask))]
        if any(mask):
            out.append((ids, mask))
    return out


def warm_start(model_dir: str | Path, out_dir: str | Path, cfg: WarmStartConfig | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Fine-tune every weight of ``model_dir`` on the corpus; save model and tokenizer to ``out_dir``.

    The loss is the token mean of the cross-entropy on assistant tokens. Returns a summary
    (final loss, seconds, the act mix of the corpus).
    """
    import numpy as np
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from mica_core.atomic import atomic_dir, atomic_write_json

    from .policy import load_tokenizer, quiet_transformers
    from .trainer import warmup_cosine

    quiet_transformers()
    cfg = cfg or WarmStartConfig()
    t_start = time.perf_counter()
    tokenizer = load_tokenizer(model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.eval()  # no dropout: the warm start must be reproducible
        examples = generate_corpus(cfg.n_episodes, cfg.seed, cfg.context_messages, cfg.system_prompt,
                                   context_replies=cfg.context_replies)
        data = tokenize_examples(tokenizer, examples, cfg.max_tokens)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps, cfg.warmup, 0.1))
        rng = np.random.default_rng(cfg.seed)
        pad = tokenizer.pad_token_id
        losses = []
        order = rng.permutation(len(data))
        pos = 0
        for _ in tqdm(range(cfg.steps), desc="warm start", disable=not progress, dynamic_ncols=True):
            if pos + cfg.batch_size > len(order):
                order, pos = rng.permutation(len(data)), 0
            idx = order[pos:pos + cfg.batch_size]
            pos += cfg.batch_size
            width = max(len(data[i][0]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            att = torch.zeros((len(idx), width), dtype=torch.long)
            lab = torch.full((len(idx), width), -100, dtype=torch.long)
            for j, i in enumerate(idx):
                seq, mask = data[i]
                n = len(seq)
                ids[j, width - n:] = torch.tensor(seq)
                att[j, width - n:] = 1
                lab[j, width - n:] = torch.tensor([t if m else -100 for t, m in zip(seq, mask)])
            pos_ids = (att.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=att, position_ids=pos_ids, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), lab[:, 1:].reshape(-1), ignore_index=-100
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    acts: dict[str, int] = {}
    for ex in examples:
        acts[ex.act] = acts.get(ex.act, 0) + 1
    summary = {
        "model": str(model_dir),
        "steps": cfg.steps,
        "examples": len(data),
        "act_counts": acts,
        "loss_first": losses[0] if losses else None,
        "loss_last": float(np.mean(losses[-20:])) if losses else None,
        "seconds": time.perf_counter() - t_start,
    }
    with atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        atomic_write_json(tmp / "warm_start.json", summary)
    return summary
