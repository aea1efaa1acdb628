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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Policy",
    "TokenBatch",
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
            peft_cfg = LoraConfig(
                r=lora_cfg.r,
                lora_alpha=lora_cfg.alpha,
                lora_dropout=lora_cfg.dropout,
                target_modules=list(lora_cfg.target_modules),
                bias="none",
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, peft_cfg)
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
    return Policy(model=model, tokenizer=tokenizer, device=device, dtype=dtype, lora=lora_cfg.enabled, reference=reference)


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
        raise ValueError(f"{weights_dir}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def prompt_messages(messages: Sequence[dict], context_messages: int, system_prompt: str = "") -> list[dict]:
    """The part of a conversation the policy sees: its last ``context_messages`` messages (0: all),
    less a leading assistant message, after an optional system message."""
    keep = list(messages[-context_messages:]) if context_messages > 0 else list(messages)
    if len(keep) > 1 and keep[0]["role"] == "assistant":
        keep = keep[1:]
    out = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return out + [{"role": m["role"], "content": m["content"]} for m in keep]


def encode_prompts(tokenizer, conversations: Sequence[Sequence[dict]], max_prompt_tokens: int) -> list[list[int]]:
    """Chat-template each conversation with the generation prompt; keep the last
    ``max_prompt_tokens`` tokens (left truncation keeps the newest context)."""
    ids = tokenizer.apply_chat_template(
        [list(c) for c in conversations], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    if ids and isinstance(ids[0], int):  # a single conversation comes back flat
        ids = [ids]
    if max_prompt_tokens > 0:
        ids = [list(x[-max_prompt_tokens:]) for x in ids]
    return [list(map(int, x)) for x in ids]


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


def generate_replies(
    policy: Policy,
    prompts: Sequence[Sequence[int]],
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    batch_size: int = 256,
) -> list[list[int]]:
    """Sample one reply per prompt; each ends at (and includes) the end-of-turn token unless it
    hit ``max_new_tokens``. ``temperature == 0`` decodes greedily. Uses the global torch RNG."""
    import torch

    tok = policy.tokenizer
    eos = tok.eos_token_id
    model = policy.model
    out: list[list[int]] = []
    sample = temperature > 0
    gen_kwargs = {
        "max_new_tokens": max_new_tokens,
        "do_sample": sample,
        "eos_token_id": eos,
        "pad_token_id": tok.pad_token_id,
        "return_dict_in_generate": False,
    }
    if sample:
        gen_kwargs.update({"temperature": float(temperature), "top_p": float(top_p), "top_k": 0})
    with torch.no_grad(), _eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            ids, mask = _left_pad(chunk, tok.pad_token_id, policy.device)
            seq = model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
            new = seq[:, ids.shape[1]:].tolist()
            for row in new:
                if eos in row:
                    row = row[: row.index(eos) + 1]
                out.append(row)
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


def collate_turns(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, device) -> TokenBatch:
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
