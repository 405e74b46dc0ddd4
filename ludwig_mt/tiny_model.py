"""Build a tiny Llama-architecture causal LM plus tokenizer on disk, in seconds, with no network.

Tests, the offline demo and CI need a real ``base_model:`` directory that Ludwig loads exactly like a hub model,
without reaching the Hugging Face Hub. Random weights are enough to exercise every code path; the tokenizer is
a byte-level BPE trained on a small corpus so that SQL, English and punctuation all tokenize sensibly.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

# Text the tokenizer learns merges from: SQL keywords and everyday English cover every task's vocabulary well
# enough for a model that only has to run, not to be good.
_CORPUS = [
    "SELECT name FROM head WHERE age > 56 ORDER BY age DESC LIMIT 1",
    "SELECT COUNT(*) FROM singer GROUP BY country HAVING COUNT(*) > 2",
    "CREATE TABLE head (age INTEGER, name VARCHAR, born_state VARCHAR)",
    "How many heads of the departments are older than 56 ?",
    "### Instruction: rewrite the sentence so that it is polite and keeps its meaning.",
    "### Input: ### Response: The answer is (A) (B) (C) (D) (E).",
    "Summarize the dialogue. Amanda: I baked cookies. Do you want some? Jerry: Sure!",
    "What is the capital of France? Paris is the capital and largest city of France.",
    "card_arrival card_linking exchange_rate lost_or_stolen_card top_up_failed",
]


def build_tokenizer(corpus: Iterable[str] = _CORPUS, vocab_size: int = 512):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with Llama-style special tokens and a pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )


def build_tiny_llama(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> Path:
    """Write a random-weight Llama model and its tokenizer with ``save_pretrained``; return the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args(argv)
    path = build_tiny_llama(args.out_dir, num_layers=args.layers, hidden_size=args.hidden)
    print(path)


if __name__ == "__main__":
    main()
