"""Optional alignment metric for real priors: CLIP score with open_clip, from local weights only.

Set ``LODS_CLIP_WEIGHTS`` to a local open_clip checkpoint file and, if it is not a ViT-B-32 one,
``LODS_CLIP_MODEL`` to its architecture name (``open_clip.list_models()``), e.g.::

    pip install open_clip_torch
    export LODS_CLIP_MODEL=ViT-B-32 LODS_CLIP_WEIGHTS=/models/open_clip_vit_b_32.bin

Runs on a non-toy prior then report ``clip_score`` (100 x the cosine of image and text embeddings,
floored at 0, averaged over the views). Without open_clip or without the weights nothing is
downloaded and the metric is skipped (:func:`clip_scorer` returns None and says why).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_MODEL = "ViT-B-32"


def unavailable_reason() -> str | None:
    """Why the CLIP score cannot run here, or None when it can."""
    weights = os.environ.get("LODS_CLIP_WEIGHTS")
    if not weights:
        return "LODS_CLIP_WEIGHTS is not set"
    if not Path(weights).is_file():
        return f"LODS_CLIP_WEIGHTS={weights} is not a file"
    try:
        import open_clip  # noqa: F401
    except ImportError:
        return "open_clip is not installed (pip install open_clip_torch)"
    return None


@functools.lru_cache(maxsize=1)
def _load(model_name: str, weights: str):
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=weights)
    return model.eval(), open_clip.get_tokenizer(model_name)


def clip_scorer():
    """A function ``(images (B, 3, H, W) in [0, 1], prompt) -> float``, or None when unavailable."""
    if unavailable_reason() is not None:
        return None
    model, tokenizer = _load(os.environ.get("LODS_CLIP_MODEL", DEFAULT_MODEL), os.environ["LODS_CLIP_WEIGHTS"])
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

    @torch.no_grad()
    def score(images: torch.Tensor, prompt: str) -> float:
        x = F.interpolate(images.float().cpu().clamp(0, 1), size=(size, size), mode="bicubic", align_corners=False)
        img = F.normalize(model.encode_image((x - mean) / std), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer([prompt])), dim=-1)
        return float((100 * (img @ txt.T)).clamp_min(0).mean())

    return score
