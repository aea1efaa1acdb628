"""A tiny offline causal LM and tokenizer, built in-process and deterministic by seed.

No model ships with the library and nothing is downloaded: the tokenizer is a byte-level BPE
trained on the warm-start corpus (supportive replies of every kind plus simulated user
messages), the model a freshly initialised Llama-architecture decoder (about 0.4M parameters at
the defaults). Both are saved with ``save_pretrained`` and load back with
``from_pretrained(local_dir)`` without any network access.

    mica tiny-model --out runs/tiny/base --seed 0
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TinyModelConfig",
    "build_tiny_model",
    "train_tokenizer",
    "write_tiny_model",
]

PAD, EOT, IM_START, IM_END = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, EOT, IM_START, IM_END)

# ChatML. Assistant content and its closing token sit inside {% generation %} so that
# apply_chat_template(..., return_assistant_tokens_mask=True) marks exactly the tokens the
# policy produces (the reply and the end-of-turn token), never the role header.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class TinyModelConfig:
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    max_position_embeddings: int = 512
    seed: int = 0


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Byte-level BPE trained on ``texts``, wrapped as a ``PreTrainedTokenizerFast``.

    Left padding (for batched generation) is passed to the constructor so that it is saved.
    The end-of-turn token ``<|im_end|>`` doubles as EOS: generation stops at the end of a reply.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Role names appear in every prompt; seeding them keeps the chat header short.
    seed_text = ["user\n", "assistant\n", "system\n"] * 8
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([*seed_text, *texts], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD,
        eos_token=IM_END,
        additional_special_tokens=[EOT, IM_START],
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def build_tiny_model(tokenizer, cfg: TinyModelConfig | None = None):
    """A randomly initialised Llama decoder sized for ``tokenizer``; same seed, same weights."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    cfg = cfg or TinyModelConfig()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model


def write_tiny_model(out_dir: str | Path, texts: Iterable[str], cfg: TinyModelConfig | None = None) -> Path:
    """Train the tokenizer on ``texts``, build the model and save both to ``out_dir`` atomically."""
    from mica_core.atomic import atomic_dir

    from .policy import quiet_transformers

    quiet_transformers()
    cfg = cfg or TinyModelConfig()
    tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size)
    model = build_tiny_model(tokenizer, cfg)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
    return out_dir
