"""The policy: a local causal-LM checkpoint with a LoRA adapter (or fully trainable), its
tokenizer, prompt construction, sampling and per-token log-probabilities.

Layout of a batch of turns (one row per assistant turn)::

    input_ids  [B, P + R]   prompt left-padded to width P, reply right-padded to width R
    position_ids            attention_mask.cumsum(-1) - 1, clamped at 0 (as generate does)
    response_mask [B, R]    1 on the reply tokens (including the end-of-turn token)

The log-probability of reply token ``j`` comes from the logits at position ``P - 1 + j``,
divided by the sampling temperature, so old log-probs match the distribution that generated
the reply.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Policy",
    "TokenBatch",
    "check_target_modules",
    "collate_turns",
    "encode_prompts",
    "generate_replies",
    "load_policy",
    "load_policy_weights",
    "load_tokenizer",
    "prompt_messages",
    "quiet_transformers",
    "resolve_device",
    "resolve_dtype",
    "response_logprobs",
    "save_policy_weights",
]

WEIGHTS_NAME = "model.safetensors"


def quiet_transformers() -> None:
    """No progress bars or download attempts: every checkpoint here is local."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    import transformers

    # peft asks for a renamed transformers property; nothing for a user to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def resolve_device(name: str = "auto"):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    return torch.device(name)


def resolve_dtype(name: str, device) -> Any:
    """``auto``: bfloat16 on CUDA when supported, float32 otherwise."""
    import torch

    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"model.dtype must be auto, float32, bfloat16 or float16, got {name!r}") from None


@dataclass
class Policy:
    model: Any
    tokenizer: Any
    device: Any
    dtype: Any
    lora: bool
    reference: Any = field(default=None, repr=False)  # frozen copy, only for full fine-tuning with KL

    @property
    def has_reference(self) -> bool:
        return self.lora or self.reference is not None

    def trainable_parameters(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    def named_trainable_state(self) -> dict:
        """Trainable tensors by name (the adapter under LoRA, every weight otherwise)."""
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    @contextlib.contextmanager
    def merged_adapter(self) -> Iterator[Any]:
        """The model with its LoRA adapter merged into the base weights, for generation.

        A merged forward is one matmul per projection instead of peft's three (and its
        per-module Python), so rollouts and evaluations run faster. On exit the base weights
        are restored from a copy taken on entry, bit for bit: an ``unmerge`` (``W + BA - BA``)
        rounds differently from ``W`` and would drift the frozen base over a run (and break
        exact resume). Holds one extra copy of the adapted layers' weights while merged. Under
        full fine-tuning it yields the model unchanged. Do not train inside it.
        """
        if not self.lora:
            yield self.model
            return
        import torch
        from peft.tuners.lora import LoraLayer

        saved = [
            (p, p.detach().clone())
            for module in self.model.modules()
            if isinstance(module, LoraLayer)
            for p in module.get_base_layer().parameters(recurse=False)
        ]
        self.model.merge_adapter()
        try:
            yield self.model
        finally:
            self.model.unmerge_adapter()  # peft's merged flags; the values come from the copy
            with torch.no_grad():
                for p, value in saved:
                    p.data.copy_(value)

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[Any]:
        """The frozen base policy: the adapter switched off, or the stored copy."""
        if self.lora:
            with self.model.disable_adapter():
                yield self.model
        elif self.reference is not None:
            yield self.reference
        else:
            raise RuntimeError("no reference policy: full fine-tuning keeps one only when loss.kl_coef > 0")


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise ValueError(f"{path}: the tokenizer has no chat template")
    return tok


def load_policy(model_cfg, lora_cfg, weights_dir: str | Path | None = None, need_reference: bool = False) -> Policy:
    """Load ``model_cfg.path`` and attach a trainable LoRA adapter (fresh, or from ``weights_dir``).

    With ``lora_cfg.enabled`` false every weight trains (meant for tiny models); ``weights_dir``
    then holds full weights. ``need_reference`` keeps a frozen copy of the base for the KL term
    in that case (under LoRA the base is the model with its adapter disabled).
    """
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    device = resolve_device(model_cfg.device)
    dtype = resolve_dtype(model_cfg.dtype, device)
    tokenizer = load_tokenizer(model_cfg.path)
    model = AutoModelForCausalLM.from_pretrained(model_cfg.path, dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    reference = None
    if lora_cfg.enabled:
        from peft import LoraConfig, PeftModel, get_peft_model

        if weights_dir is not None:
            model = PeftModel.from_pretrained(model, str(weights_dir), is_trainable=True)
        else:
            check_target_modules(model, lora_cfg.target_modules)
            peft_cfg = LoraConfig(
                r=lora_cfg.r,
                lora_alpha=lora_cfg.alpha,
                lora_dropout=lora_cfg.dropout,
                target_modules=list(lora_cfg.target_modules),
                bias="none",
                task_type="CAUSAL_LM",
            )
            try:
                model = get_peft_model(model, peft_cfg)
            except ValueError as exc:  # e.g. a target that is not a layer peft can adapt
                from .config import ConfigError

                raise ConfigError(f"lora.target_modules {list(lora_cfg.target_modules)}: "
                                  f"{str(exc).splitlines()[0][:300]}") from None
    else:
        if need_reference:
            reference = AutoModelForCausalLM.from_pretrained(model_cfg.path, dtype=dtype).to(device).eval()
            reference.requires_grad_(False)
        if weights_dir is not None:
            load_policy_weights(model, weights_dir)
        model.requires_grad_(True)
    if model_cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the newer name; older releases lack it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if lora_cfg.enabled:
            model.enable_input_require_grads()
    model.to(device)
    # Dropout stays off: rollouts, old log-probs and updates see the same function.
    model.eval()
    torch.set_grad_enabled(True)
    return Policy(model=model, tokenizer=tokenizer, device=device, dtype=dtype, lora=lora_cfg.enabled,
                  reference=reference)


def check_target_modules(model, targets: Sequence[str]) -> None:
    """Every name in ``lora.target_modules`` must name modules of ``model`` (a module whose
    dotted name is it or ends with ``.name``, as peft matches). Raises ``ConfigError``."""
    from .config import ConfigError

    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if n and not any(True for _ in m.children()) and not n.rsplit(".", 1)[-1].isdigit()})
        raise ConfigError(f"lora.target_modules: {', '.join(map(str, missing))} not in the model "
                          f"(its layers: {', '.join(leaves[:20])})")


def save_policy_weights(policy: Policy, out_dir: str | Path) -> None:
    """The trainable weights as safetensors: ``adapter_model.safetensors`` + ``adapter_config.json``
    under LoRA, ``model.safetensors`` otherwise. ``out_dir`` should be a fresh (temporary) directory."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if policy.lora:
        policy.model.save_pretrained(out_dir, safe_serialization=True)
    else:
        state = {k: v.detach().to("cpu").contiguous() for k, v in policy.model.state_dict().items()}
        # Tied embeddings share storage; safetensors stores each tensor once.
        if getattr(policy.model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(out_dir / WEIGHTS_NAME))


def load_policy_weights(model, weights_dir: str | Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(Path(weights_dir) / WEIGHTS_NAME))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{weights_dir}: weights do not match the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")


def prompt_messages(messages: Sequence[dict], context_messages: int, system_prompt: str = "",
                    context_replies: int = 0) -> list[dict]:
    """The part of a conversation the policy sees: its last ``context_messages`` messages (0: all),
    less a leading assistant message, preceded by the assistant's own last ``context_replies``
    replies from before that window (the user messages between them left out), after an
    optional system message.

    With ``context_messages=1, context_replies=2`` the policy at turn ``t`` sees
    ``[reply t-2, reply t-1, user message t]``: what it said last (which acts it used, how
    often) and what the user says now, in about twice the tokens of the message alone.
    """
    keep = list(messages[-context_messages:]) if context_messages > 0 else list(messages)
    if len(keep) > 1 and keep[0]["role"] == "assistant":
        keep = keep[1:]
    if context_replies > 0:
        earlier = messages[: len(messages) - len(keep)]
        keep = [m for m in earlier if m["role"] == "assistant"][-context_replies:] + keep
    out = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return out + [{"role": m["role"], "content": m["content"]} for m in keep]


def encode_prompts(tokenizer, conversations: Sequence[Sequence[dict]], max_prompt_tokens: int) -> list[list[int]]:
    """Chat-template each conversation with the generation prompt; keep the last
    ``max_prompt_tokens`` tokens (left truncation keeps the newest context).

    Message text is data, never markup: a message containing the text of a special token
    (``<|im_start|>``, ``<|im_end|>``, the end-of-text token, ...) is encoded as the plain
    characters, so a user (or a reply fed back as context) cannot open a role or end a turn.
    Conversations without such text take the tokenizer's own path, token for token."""
    convs = [list(c) for c in conversations]
    ids = tokenizer.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=False)
    if ids and isinstance(ids[0], int):  # a single conversation comes back flat
        ids = [ids]
    ids = [list(x) for x in ids]
    specials = _special_pattern(tokenizer)
    if specials is not None:
        for i, conv in enumerate(convs):
            if any(isinstance(m.get("content"), str) and specials.search(m["content"]) for m in conv):
                ids[i] = _encode_as_text(tokenizer, conv, specials)
    if max_prompt_tokens > 0:
        ids = [x[-max_prompt_tokens:] for x in ids]
    return [list(map(int, x)) for x in ids]


_MARK = re.compile("\ue000(\\d+)\ue001")  # stands for special text inside a message


def _special_pattern(tokenizer) -> re.Pattern | None:
    """A regex matching the text of every special token of ``tokenizer`` (longest first)."""
    texts = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            texts.add(str(getattr(added, "content", added)))
    texts.discard("")
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


def _encode_as_text(tokenizer, conv: list[dict], specials: re.Pattern) -> list[int]:
    """``conv`` chat-templated with the special-token text inside its messages encoded as
    plain text: each such text is swapped for a private-use mark, the template is rendered,
    the rendering is cut at the special tokens (now only the template's own), and each piece
    between them is encoded with the marks turned back into their text and
    ``split_special_tokens`` (the tokenizer's own segmentation, special text kept literal)."""
    found: list[str] = []

    def mark(m):
        found.append(m.group(0))
        return f"\ue000{len(found) - 1}\ue001"

    safe = [dict(m, content=specials.sub(mark, m["content"])) if isinstance(m.get("content"), str) else m
            for m in conv]
    text = tokenizer.apply_chat_template(safe, add_generation_prompt=True, tokenize=False)

    def plain(piece: str) -> list[int]:
        piece = _MARK.sub(lambda m: found[int(m.group(1))] if int(m.group(1)) < len(found) else m.group(0), piece)
        if not piece:
            return []
        return list(tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    out: list[int] = []
    start = 0
    for m in specials.finditer(text):
        out += plain(text[start:m.start()])
        out.append(int(tokenizer.convert_tokens_to_ids(m.group(0))))
        start = m.end()
    return out + plain(text[start:])


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device):
    import torch

    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _cache_kwarg(model) -> str:
    """The keyword under which ``model.forward`` takes a KV cache (transformers 5.24 renamed
    ``past_key_values`` to ``cache``)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


def _nucleus(probs, top_p: float):
    """``probs`` restricted to the smallest set of most likely tokens whose mass reaches
    ``top_p`` (at least one token), renormalised: transformers' ``TopPLogitsWarper``."""
    import torch

    sorted_p, order = torch.sort(probs, dim=-1, descending=False)
    remove = sorted_p.cumsum(-1) <= (1.0 - top_p)
    remove[..., -1] = False
    kept = probs.scatter(-1, order, sorted_p.masked_fill(remove, 0.0))
    return kept / kept.sum(-1, keepdim=True)


def _sample_batch(model, ids, mask, *, temperature, top_p, max_new_tokens, eos, pad, with_logprobs):
    """KV-cache decoding of one left-padded batch; returns ``(new_ids [B, T], logp [B, T],
    entropy [B, T])`` (the last two ``None`` without ``with_logprobs``).

    Per step: ``logp = log_softmax(logits / temperature)``; the next token is drawn by
    inverse-CDF sampling (one ``torch.rand`` per row against the cumulative probabilities,
    of the nucleus when ``top_p < 1``), or the argmax at ``temperature == 0``. Rows that
    emitted ``eos`` get ``pad`` afterwards, as in ``generate``. Positions follow the
    attention mask (``cumsum - 1``), as in :func:`collate_turns`.
    """
    import torch

    key = _cache_kwarg(model)
    sample = temperature > 0
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1)
    cache = _returned_cache(out)
    position = position[:, -1:]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    tokens, logps, ents = [], [], []
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1, :].float()
        if sample and temperature != 1.0:
            logits = logits / temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        if sample:
            probs = logp_all.exp()
            if top_p < 1.0:
                probs = _nucleus(probs, top_p)
            u = torch.rand((ids.shape[0], 1), device=ids.device)
            nxt = torch.searchsorted(probs.cumsum(-1), u).squeeze(-1)
            # the cumulative sum may end a rounding error below 1
            nxt = nxt.clamp_(max=probs.shape[-1] - 1)
        else:
            nxt = logits.argmax(-1)
        nxt = nxt.masked_fill(done, pad)
        tokens.append(nxt)
        if with_logprobs:
            logps.append(logp_all.gather(-1, nxt.unsqueeze(-1)).squeeze(-1))
            ents.append(-(logp_all.exp() * logp_all).sum(-1))
        done = done | (nxt == eos)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        out = model(input_ids=nxt.unsqueeze(-1), attention_mask=mask, position_ids=position, use_cache=True,
                    **{key: cache})
        cache = _returned_cache(out)
    new_ids = torch.stack(tokens, dim=1)
    if not with_logprobs:
        return new_ids, None, None
    return new_ids, torch.stack(logps, dim=1), torch.stack(ents, dim=1)


def generate_replies(
    policy: Policy,
    prompts: Sequence[Sequence[int]],
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    batch_size: int = 256,
    with_logprobs: bool = False,
    sampler: str = "mica",
):
    """Sample one reply per prompt; each ends at (and includes) the end-of-turn token unless it
    hit ``max_new_tokens``. ``temperature == 0`` decodes greedily. Uses the global torch RNG.

    ``sampler="mica"`` (default) decodes with :func:`_sample_batch`, a KV-cache loop over the
    model's forward with inverse-CDF sampling; ``sampler="hf"`` calls transformers'
    ``generate`` (``torch.multinomial``, about 1 ms per call for 64 x 1024 probabilities on one
    CPU thread against 0.06 ms for the inverse CDF). Both sample the same distribution
    (temperature, then top-p) with different random draws; greedy decoding gives the same
    tokens.

    Returns the replies (token ids). With ``with_logprobs`` returns ``(replies, logprobs,
    entropies)``: per reply token, its log-probability and the entropy of the next-token
    distribution under ``log_softmax(logits / temperature)`` (before top-p), the function
    :func:`response_logprobs` computes, so they can serve as PPO's old log-probs. They agree
    with a fresh forward pass up to float rounding (the KV-cache decode and a padded full
    forward sum in different orders); see docs/training.md.
    """
    import torch

    if sampler not in ("mica", "hf"):
        raise ValueError(f"rollout.sampler must be mica or hf, got {sampler!r}")
    tok = policy.tokenizer
    eos = tok.eos_token_id
    model = policy.model
    out: list[list[int]] = []
    logprobs: list[list[float]] = []
    entropies: list[list[float]] = []
    sample = temperature > 0
    gen_kwargs = {
        "max_new_tokens": max_new_tokens,
        "do_sample": sample,
        "eos_token_id": eos,
        "pad_token_id": tok.pad_token_id,
        "return_dict_in_generate": with_logprobs,
        "output_logits": with_logprobs,
    }
    if sample:
        gen_kwargs.update({"temperature": float(temperature), "top_p": float(top_p), "top_k": 0})
    with torch.no_grad(), _eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            ids, mask = _left_pad(chunk, tok.pad_token_id, policy.device)
            if sampler == "mica":
                new_ids, tok_logp, tok_ent = _sample_batch(
                    model, ids, mask, temperature=float(temperature), top_p=float(top_p),
                    max_new_tokens=max_new_tokens, eos=eos, pad=tok.pad_token_id, with_logprobs=with_logprobs)
            else:
                gen = model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
                seq = gen.sequences if with_logprobs else gen
                new_ids = seq[:, ids.shape[1]:]
                if with_logprobs:
                    # generate's raw logits (output_logits: before top-p), kept for the whole call
                    logits = torch.stack(gen.logits, dim=1).float()   # [B, new tokens, V]
                    if sample and temperature != 1.0:
                        logits = logits / temperature
                    logp_all = torch.log_softmax(logits, dim=-1)
                    tok_logp = logp_all.gather(-1, new_ids.unsqueeze(-1)).squeeze(-1)
                    tok_ent = -(logp_all.exp() * logp_all).sum(-1)
            if with_logprobs:
                tok_logp, tok_ent = tok_logp.tolist(), tok_ent.tolist()
            for j, row in enumerate(new_ids.tolist()):
                n = row.index(eos) + 1 if eos in row else len(row)
                out.append(row[:n])
                if with_logprobs:
                    logprobs.append(tok_logp[j][:n])
                    entropies.append(tok_ent[j][:n])
    if with_logprobs:
        return out, logprobs, entropies
    return out


@dataclass
class TokenBatch:
    input_ids: Any
    attention_mask: Any
    position_ids: Any
    response_mask: Any
    prompt_width: int

    @property
    def response_width(self) -> int:
        return int(self.response_mask.shape[1])


def collate_turns(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                  device) -> TokenBatch:
    """Left-pad prompts and right-pad replies into one ``[B, P + R]`` batch (module docstring)."""
    import torch

    p_ids, p_mask = _left_pad(prompts, pad_id, "cpu")
    width = max((len(r) for r in responses), default=0)
    r_ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    r_mask = torch.zeros((len(responses), width), dtype=torch.long)
    for i, r in enumerate(responses):
        r_ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        r_mask[i, : len(r)] = 1
    input_ids = torch.cat([p_ids, r_ids], dim=1)
    attention_mask = torch.cat([p_mask, r_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return TokenBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        response_mask=r_mask.to(device),
        prompt_width=int(p_ids.shape[1]),
    )


def response_logprobs(model, batch: TokenBatch, temperature: float = 1.0, with_entropy: bool = False):
    """Log-probability ``[B, R]`` of each reply token under ``model`` (float32), and the entropy
    of the next-token distribution at the same positions when ``with_entropy``.

    Only the last ``R + 1`` positions go through the output layer.
    """
    import torch

    R = batch.response_width
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=R + 1,
    )
    logits = out.logits[:, :-1, :].float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    targets = batch.input_ids[:, batch.prompt_width:]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy
