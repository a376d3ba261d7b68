"""Shared fixtures: a tiny random Stable-Diffusion-format folder, built offline once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# The test models are tiny: one intra-op thread is faster than several, and it does not collapse when
# the machine's cores are busy with other work (thread barriers spinning against other processes).
torch.set_num_threads(1)

TINY_WORDS = ["a", "red", "blue", "green", "cube", "sphere", "cone", "on", "the", "ground", "photo", "of"]


def clip_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over a handful of whole words (every word is its own merged token)."""
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    chars = sorted({c for w in TINY_WORDS for c in w})
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges = []
    for w in TINY_WORDS:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            merges.append(f"{a} {b}")
            vocab.setdefault(a + b, len(vocab))
            pieces = [a + b] + pieces[2:]
    merges = list(dict.fromkeys(merges))
    for tok in specials:
        vocab.setdefault(tok, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=16)
    return tok


def word_level_tokenizer():
    """A word-level PreTrainedTokenizerFast with BOS/EOS around every prompt and a pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *TINY_WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=16,
    )


def build_tiny_sd(out: Path, vae: bool = True, tokenizer=None) -> Path:
    """Random tiny SD components (8x8x4 latents, 16x16 images), saved with save_pretrained as safetensors."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    channels = 4 if vae else 3
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
        norm_num_groups=4,
    )
    unet.save_pretrained(out / "unet", safe_serialization=True)
    if vae:
        AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, sample_size=16,
        ).save_pretrained(out / "vae", safe_serialization=True)
    tok = tokenizer if tokenizer is not None else clip_tokenizer(out / ".vocab")
    tok.save_pretrained(out / "tokenizer")
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )).save_pretrained(out / "text_encoder", safe_serialization=True)
    DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    ).save_pretrained(out / "scheduler")
    return out


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A tiny random latent Stable-Diffusion folder (UNet sample_size 8, 4 latent channels, CLIP tokenizer)."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))
