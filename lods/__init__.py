"""LODS Studio: score-distillation text-to-3D with learned denoising scores.

The Python entry points (``lods.api``), with the same config keys as ``python -m lods``::

    from lods import generate, edit, load_prior, estimator, RunConfig, METHODS

- ``generate(prompt, prior="toy", backbone="gs", method="lods-embed", cfg=100, steps=..., out=...)``:
  text to 3D (Gaussian splats or NeRF) or to an image; returns a ``Result`` (folder, files, metrics,
  views, the live trainer).
- ``edit(image, source_prompt, prompt, method="dds", ...)``: text-guided image editing.
- ``generate_from_image(config, image, out)``: image to 3D (Magic123-style, section 4.2); returns the summary.
  ``ViewConditionedPrior.from_pretrained("toy-views" | a Zero-1-to-3 diffusers folder or hub id)``.
- ``load_prior(name)``: the embedded ``toy`` prior, ``sd21``, a Hugging Face id or a folder.
- ``estimator(method, prior, **guidance)``: one of ``METHODS`` (SDS, SDS-ref, SDS-norm, LODS-embed,
  LODS-LoRA, VSD, CFG-anneal, DDS) as a score estimator on a prior.
- ``RunConfig``, ``Trainer``: the run's config and Algorithm 1's loop, for stepping a run yourself.
- ``DiffusionPrior`` (the protocol), ``DiffusersPrior``; ``Estimator`` and its classes ``Sds``,
  ``SdsRef``, ``SdsNorm``, ``LodsEmbed``, ``LodsLora``, ``Vsd``, ``CfgAnneal``, ``Dds``.
"""

import os

# On a busy CPU, OpenMP threads that spin while waiting slow every torch op down by orders of magnitude;
# passive waiting costs nothing when the machine is idle. Must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_API = {
    "generate": "lods.api", "edit": "lods.api", "load_prior": "lods.api", "estimator": "lods.api",
    "run_config": "lods.api", "Result": "lods.api", "make_estimator": "lods.guidance", "METHODS": "lods.guidance",
    "GuidanceConfig": "lods.guidance", "RunConfig": "lods.config", "Knobs": "lods.config",
    "Trainer": "lods.trainer", "BACKBONES": "lods.config", "UserError": "lods.errors",
    # image to 3D (section 4.2): the run, and the view-conditioned (Zero-1-to-3) prior
    "generate_from_image": "lods.runs.image3d", "ViewConditionedPrior": "lods.priors.views",
    # the priors and the estimators as classes
    "DiffusionPrior": "lods.priors.base", "DiffusersPrior": "lods.priors.diffusers_prior",
    **{name: "lods.guidance" for name in (
        "Estimator", "Sds", "SdsRef", "SdsNorm", "LodsEmbed", "LodsLora", "Vsd", "CfgAnneal", "Dds")},
}
__all__ = sorted(_API)


def __getattr__(name: str):
    """The entry points, imported on first use (``import lods`` alone does not import torch)."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'lods' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
