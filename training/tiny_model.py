"""Tiny-model factory for CPU runs: a BPE tokenizer trained in-process and a small Llama.

No hub, no download. The tokenizer is a byte-level BPE (every byte is in the alphabet, so
any text round-trips) trained on the task's own texts; the model is a `LlamaForCausalLM`
built from a config (Llama by default, or Qwen2-shaped) with tied input/output embeddings,
seeded so a run is reproducible.

    tok = train_tokenizer(texts, vocab_size=2000)
    model = build_tiny_model(tok, hidden_size=128, num_layers=2, num_heads=4,
                             intermediate_size=512, max_position_embeddings=512, seed=0)
    big = build_tiny_model(tok, architecture="qwen2", hidden_size=896, num_layers=24,
                           num_heads=14, num_kv_heads=2, intermediate_size=4864,
                           model_vocab_size=151936)   # Qwen2-0.5B's shape, random weights
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, BOS, EOS]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (deterministic for the same texts in the same order).

    Encoding prepends `<s>`; `</s>` ends a completion (TRL appends it) and `<pad>` pads."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=4096
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 512,
    max_position_embeddings: int = 512,
    seed: int = 0,
    architecture: str = "llama",
    num_kv_heads: int | None = None,
    model_vocab_size: int | None = None,
) -> PreTrainedModel:
    """A randomly initialised causal LM of `architecture` (a transformers model_type: llama,
    qwen2) whose vocabulary covers `tokenizer`; `model_vocab_size` may make the embedding
    larger than the tokenizer (a real model's shape for throughput benchmarks)."""
    config = AutoConfig.for_model(
        architecture,
        vocab_size=max(len(tokenizer), model_vocab_size or 0),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model
