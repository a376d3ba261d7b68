"""Text side of the toy prior: a word-level tokenizer and a small CLIP text encoder.

The tokenizer wraps the toy grammar's words in Stable Diffusion's conventions: a start token, an
end token, padding to a fixed length. The empty prompt therefore encodes to ``[BOS, EOS, PAD...]``
and its text-encoder output is the null embedding, exactly as for Stable Diffusion, so the
learnable null embedding of LODS means the same thing on both priors.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from lods.priors.toy.world import COLOR_NAMES, GROUNDS, SHAPES

MAX_LENGTH = 16
SPECIAL = ("<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>")
EXTRA_WORDS = ("a", "an", "and", "on", "front", "side", "back", "overhead", "view", ",")


def vocabulary() -> list[str]:
    words = list(SPECIAL) + list(EXTRA_WORDS) + list(COLOR_NAMES) + list(SHAPES)
    for g in GROUNDS:
        words += [w for w in g.split() if w not in words]
    return words


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the toy grammar, padded to ``MAX_LENGTH`` like SD's CLIP tokenizer."""
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token="<|unk|>",
        pad_token="<|pad|>",
        model_max_length=MAX_LENGTH,
    )


def build_text_encoder(vocab_size: int, hidden: int = 128, layers: int = 2) -> CLIPTextModel:
    """A small randomly initialised CLIP text transformer (causal mask and final layer norm as in CLIP)."""
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        projection_dim=hidden,
    )
    return CLIPTextModel(cfg)
