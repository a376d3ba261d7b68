"""Score-distillation estimators: the direction each one pushes the latents in, and what each one learns.

Every equation of the paper is one short pure function below (Eqs. 2-10); the estimators combine them.
All estimators share one interface, the two lines of Algorithm 1's loop::

    out = est.step(z, text_emb, null_emb, cfg, step, cameras)   # line 5: direction for theta, learned params frozen
    out.loss.backward()                                          # z.grad == out.grad / B (the UNet Jacobian is skipped)
    info = est.update(z.detach(), text_emb, null_emb, cameras)  # line 6: alpha (Eq. 8) or psi (Eq. 10); None if nothing

``z`` is (B, C, h, w) as returned by ``prior.encode_images`` (with its graph to theta); ``text_emb`` and
``null_emb`` are (1 or B, L, D). ``cfg`` is the guidance weight w of Eq. 2, read every step so that it
can be turned live; ``float('inf')`` is allowed for the normalized estimators (Eqs. 7 and 9), whose
direction tends to eps(z_t; y) - eps(z_t; alpha) as w grows. Every ``step``/``update`` reports how many
UNet forward and backward passes it made, in units of one pass over the B latents (a CFG pair is 2).
"""

from __future__ import annotations

import copy
import itertools
import math
import threading
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from lods.cameras import Cameras
from lods.priors.base import DiffusionPrior

# ----------------------------------------------------------------------------- the equations


def cfg_combine(eps_c: torch.Tensor, eps_u: torch.Tensor, w: float) -> torch.Tensor:
    """Eq. 2: classifier-free guidance, w eps(z_t; y) + (1 - w) eps(z_t; null)."""
    return w * eps_c + (1 - w) * eps_u


def sds_direction(eps_hat: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Eq. 3: the SDS direction, the guided prediction minus the added noise."""
    return eps_hat - noise


def sds_ref_direction(eps_c: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Eq. 6: the reference SDS, the conditional prediction (no CFG) minus the added noise."""
    return eps_c - noise


def sds_norm_direction(eps_c: torch.Tensor, eps_null: torch.Tensor, noise: torch.Tensor, w: float) -> torch.Tensor:
    """Eqs. 7 and 9: eps_c + (1 - w)/w eps_null - eps/w, i.e. Eq. 3 divided by w.

    ``eps_null`` is the prediction with the learnable embedding alpha (Eq. 7) or with the LoRA model psi
    (Eq. 9). For w = inf the limit is eps_c - eps_null.
    """
    if math.isinf(w):
        return eps_c - eps_null
    return eps_c + (1 - w) / w * eps_null - noise / w


def dds_direction(eps_hat_target: torch.Tensor, eps_hat_source: torch.Tensor) -> torch.Tensor:
    """Eq. 4: DDS, the guided prediction on the edited latents/target text minus that on the source pair."""
    return eps_hat_target - eps_hat_source


def vsd_direction(eps_hat_pretrained: torch.Tensor, eps_lora: torch.Tensor) -> torch.Tensor:
    """Eq. 5: VSD, the pretrained (guided) prediction minus the prediction of the LoRA model of the renders."""
    return eps_hat_pretrained - eps_lora


def cfg_rescale(eps_hat: torch.Tensor, eps_c: torch.Tensor, phi: float) -> torch.Tensor:
    """CFG rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Eqs. 15-16;
    MVDream's ``recon_std_rescale``): the guided prediction scaled to the conditional one's standard deviation
    (per view), then mixed back with the guided one, phi rescaled + (1 - phi) guided."""
    dims = list(range(1, eps_hat.dim()))
    factor = (eps_c.std(dim=dims, keepdim=True) + 1e-8) / (eps_hat.std(dim=dims, keepdim=True) + 1e-8)
    return phi * (eps_hat * factor) + (1 - phi) * eps_hat


def x0_from_eps(z_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The clean latents a noise prediction implies: (z_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
    ab = alpha_bar.view(-1, *([1] * (z_t.dim() - 1)))
    return (z_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def eps_from_x0(z_t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The noise prediction that implies ``x0``: (z_t - sqrt(alpha_bar) x0) / sqrt(1 - alpha_bar)."""
    ab = alpha_bar.view(-1, *([1] * (z_t.dim() - 1)))
    return (z_t - ab.sqrt() * x0) / (1 - ab).sqrt()


def ddim_step(x: torch.Tensor, eps: torch.Tensor, ab_from: torch.Tensor, ab_to: torch.Tensor) -> torch.Tensor:
    """A deterministic DDIM step (eta 0) from noise level ``ab_from`` to ``ab_to`` with the prediction ``eps``:
    sqrt(ab_to) x0 + sqrt(1 - ab_to) eps. Towards more noise it is DDIM inversion."""
    ab = ab_to.view(-1, *([1] * (x.dim() - 1)))
    return ab.sqrt() * x0_from_eps(x, eps, ab_from) + (1 - ab).sqrt() * eps


def ism_direction(eps_hat_t: torch.Tensor, eps_null_s: torch.Tensor) -> torch.Tensor:
    """LucidDreamer's interval score (ISM, Liang et al. 2024, Eq. 17): the guided prediction at the
    DDIM-inverted x_t minus the unconditional prediction at x_s, s = t - interval (not the added noise)."""
    return eps_hat_t - eps_null_s


def denoising_loss(eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Eqs. 8 and 10: ||eps(z_t; alpha or psi) - eps||^2, as a mean over elements (the constant factor omitted)."""
    return ((eps_pred.float() - noise.float()) ** 2).mean()


def detached_target_loss(z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 ||z - sg(z - grad)||^2 / B: its gradient with respect to z is grad / B, with no UNet Jacobian."""
    z = z.float()
    return 0.5 * ((z - (z - grad.float()).detach()) ** 2).sum() / z.shape[0]


WEIGHTINGS = ("sds", "uniform", "fantasia3d")


def timestep_weight(alpha_bar: torch.Tensor, kind: str) -> torch.Tensor:
    """w(t): "sds" 1 - alpha_bar (DreamFusion), "uniform" 1, "fantasia3d" sqrt(alpha_bar) (1 - alpha_bar)."""
    if kind == "sds":
        return 1 - alpha_bar
    if kind == "uniform":
        return torch.ones_like(alpha_bar)
    if kind == "fantasia3d":
        return alpha_bar.sqrt() * (1 - alpha_bar)
    raise ValueError(f"unknown weighting '{kind}'; choose one of: {', '.join(WEIGHTINGS)}")


def annealed_cfg(w0: float, w1: float, step: int, steps: int) -> float:
    """Section 3.3's baseline: the CFG weight decreasing linearly from w0 to w1 over ``steps``, then held."""
    frac = min(max(step / max(steps, 1), 0.0), 1.0)
    return w0 + (w1 - w0) * frac


def _flat_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() * b.double()).sum())


EFF_CFG_MAX_INV = 1e-4


def effective_cfg(direction: torch.Tensor, denoising: torch.Tensor, classifier: torch.Tensor) -> tuple[float, float]:
    """The weight w' of plain SDS whose direction is closest to ``direction``, and the share of it explained.

    Plain SDS (Eq. 3) at weight w' points along eps(null) + w'(eps(y) - eps(null)) - eps, which is
    ``denoising`` + w' ``classifier``. The closest such direction, up to scale, is the least-squares fit
    ``direction`` ~ a ``denoising`` + b ``classifier`` (two regressors, closed form); w' = b / a. For SDS
    itself (and SDS-norm, which is Eq. 3 divided by w) the fit is exact and w' = w. Returns (w', R^2);
    w' is NaN where the fit has (next to) no denoising part: a <= 0, where no SDS weight points that way,
    or w' above 1 / ``EFF_CFG_MAX_INV`` (10^4), which float32 rounding cannot tell from the normalized
    estimators at w = inf, whose denoising term vanishes.
    """
    dd, dc, cc = _flat_dot(denoising, denoising), _flat_dot(denoising, classifier), _flat_dot(classifier, classifier)
    rd, rc, rr = _flat_dot(direction, denoising), _flat_dot(direction, classifier), _flat_dot(direction, direction)
    det = dd * cc - dc * dc
    if det <= 1e-12 * max(dd * cc, 1e-30) or rr == 0:
        return math.nan, math.nan
    a = (rd * cc - rc * dc) / det
    b = (rc * dd - rd * dc) / det
    r2 = (a * rd + b * rc) / rr  # explained share: <fit, direction> / ||direction||^2 for a least-squares fit
    if a <= EFF_CFG_MAX_INV * abs(b):
        return math.nan, r2
    return b / a, r2


def _per_view_norm(x: torch.Tensor) -> float:
    return float(x.flatten(1).norm(dim=1).mean())


def _per_view_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-12).mean())


def update_parts(
    direction: torch.Tensor, eps_c: torch.Tensor, eps_null: torch.Tensor, noise: torch.Tensor,
    eps_learned: torch.Tensor | None = None,
) -> dict[str, float]:
    """The parts of one update as numbers: norms (per view, averaged) and cosines of the classifier term
    eps(y) - eps(null), the denoising term eps(null) - eps and, for LODS, the drift eps(alpha or psi) -
    eps(null); and ``effective_cfg`` of the method's (unweighted) ``direction`` against the first two.

    Keys: classifier_norm, denoising_norm, cos_classifier_denoising, eff_cfg, eff_cfg_r2 and, with
    ``eps_learned``, drift_norm, cos_drift_classifier, cos_drift_denoising. NaN values are left out.
    """
    eps_c, eps_null, noise = eps_c.float(), eps_null.float(), noise.float()
    classifier, denoising = eps_c - eps_null, eps_null - noise
    out = {
        "classifier_norm": _per_view_norm(classifier),
        "denoising_norm": _per_view_norm(denoising),
        "cos_classifier_denoising": _per_view_cos(classifier, denoising),
    }
    out["eff_cfg"], out["eff_cfg_r2"] = effective_cfg(direction.float(), denoising, classifier)
    if eps_learned is not None:
        drift = eps_learned.float() - eps_null
        out.update(drift_norm=_per_view_norm(drift), cos_drift_classifier=_per_view_cos(drift, classifier),
                   cos_drift_denoising=_per_view_cos(drift, denoising))
    return {k: v for k, v in out.items() if math.isfinite(v)}


# ----------------------------------------------------------------------------- configuration


@dataclass
class TimestepSchedule:
    """t ~ U{min, max}, as fractions of T, for the theta step; the upper bound may anneal.

    ``anneal``: "none"; "step" (max_frac until ``anneal_step``, then ``anneal_to``, as the official
    runs' 0.98 -> 0.5); "linear" (max_frac moves linearly to ``anneal_to`` at ``anneal_step``, then holds).
    """

    min_frac: float = 0.02
    max_frac: float = 0.98
    anneal: str = "none"
    anneal_to: float = 0.5
    anneal_step: int = 500

    def __post_init__(self):
        if self.anneal not in ("none", "step", "linear"):
            raise ValueError(f"unknown anneal '{self.anneal}'; choose none, step or linear")
        top = [self.max_frac] + ([self.anneal_to] if self.anneal != "none" else [])
        if not 0 <= self.min_frac <= min(top) or max(top) > 1:
            raise ValueError("need 0 <= min_frac <= max_frac (and anneal_to) <= 1")

    def max_at(self, step: int) -> float:
        if self.anneal == "step":
            return self.max_frac if step < self.anneal_step else self.anneal_to
        if self.anneal == "linear":
            frac = min(step / max(self.anneal_step, 1), 1.0)
            return self.max_frac + (self.anneal_to - self.max_frac) * frac
        return self.max_frac

    def bounds(self, step: int, num_train_timesteps: int) -> tuple[int, int]:
        """Inclusive integer bounds of t at ``step``."""
        hi = min(int(self.max_at(step) * num_train_timesteps), num_train_timesteps - 1)
        lo = min(int(self.min_frac * num_train_timesteps), hi)
        return lo, hi

    def sample(self, step: int, n: int, num_train_timesteps: int, device: torch.device) -> torch.Tensor:
        lo, hi = self.bounds(step, num_train_timesteps)
        return torch.randint(lo, hi + 1, (n,), device=device)


DEFAULT_LR = {"lods-embed": 1e-4, "lods-lora": 5e-7, "vsd": 1e-3}
DEFAULT_ANNEAL_STEPS = 1000


@dataclass
class GuidanceConfig:
    """Settings shared by the estimators; each one reads the fields it needs.

    lr: learning rate of the learned parameters (alpha, LoRA); None takes the method's default
    (``DEFAULT_LR``: the paper's 2D embedding rate, its 3D LoRA rate, ProlificDreamer's LoRA rate).
    lora_scale: scale of psi in LODS-LoRA, the same in Eq. 9's null branch and Eq. 10's update (0.5, the
    official release's ``lora_weight``).
    cfg_end, anneal_steps: cfg-anneal's weight goes linearly from the run's CFG to ``cfg_end`` over
    ``anneal_steps`` (None: a run's trainer sets its own step count, so it anneals within the run;
    ``DEFAULT_ANNEAL_STEPS`` for an estimator used alone).
    rescale_phi: cfg-rescale's mix of the rescaled prediction (0.5 as MVDream; Lin et al. suggest 0.7).
    ism_interval, ism_inversion_step: ISM's s = t - ``ism_interval`` and the stride of the DDIM inversion
    from the clean latents to x_s (LucidDreamer's delta_t 50 and xs_delta_t 200, in steps of T = 1000).
    merge_update: section 3.7's variant; the learned branch's forward of the theta step is kept with
    its graph and reused by ``update``, saving one UNet forward (the update then uses the theta step's t).
    parts_every: the parts of the update (:func:`update_parts`, the effective CFG) are logged every step
    where the estimator computes eps(y) and eps(null) anyway (SDS and its variants); the estimators that
    do not (SDS-ref, LODS: their null branch is alpha or the LoRA) add one UNet forward of the null
    embedding every ``parts_every`` steps for them (0: never). That forward touches no random state, so
    the run itself is the same with or without it.
    """

    schedule: TimestepSchedule = field(default_factory=TimestepSchedule)
    weighting: str = "sds"
    grad_clip: float | None = None
    lr: float | None = None
    lora_rank: int = 4
    lora_alpha: float | None = None
    lora_scale: float = 0.5
    camera_dropout: float = 0.1
    cfg_end: float = 7.5
    anneal_steps: int | None = None
    rescale_phi: float = 0.5
    ism_interval: int = 50
    ism_inversion_step: int = 200
    merge_update: bool = False
    parts_every: int = 10

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting '{self.weighting}'; choose one of: {', '.join(WEIGHTINGS)}")
        if not 0 <= self.rescale_phi <= 1:
            raise ValueError(f"rescale_phi must be between 0 and 1, not {self.rescale_phi}")
        if self.ism_interval < 1 or self.ism_inversion_step < 1:
            raise ValueError("ism_interval and ism_inversion_step must be at least 1")
        if isinstance(self.parts_every, bool) or not isinstance(self.parts_every, int) or self.parts_every < 0:
            raise ValueError(f"parts_every must be a whole number >= 0, not {self.parts_every!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuidanceConfig:
        """From plain values (YAML); ``schedule`` may be a dict. Unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown guidance settings: {', '.join(sorted(unknown))}")
        d = dict(d)
        if isinstance(d.get("schedule"), dict):
            d["schedule"] = TimestepSchedule(**d["schedule"])
        return cls(**d)


@dataclass
class GuidanceOutput:
    """``loss`` backpropagates into theta; ``grad`` is the weighted, guarded direction on z (z.grad = grad / B)."""

    loss: torch.Tensor
    grad: torch.Tensor
    stats: dict[str, float]


# ----------------------------------------------------------------------------- estimators


def _per_view(emb: torch.Tensor, n: int) -> torch.Tensor:
    if emb.shape[0] == n:
        return emb
    if emb.shape[0] == 1:
        return emb.expand(n, *emb.shape[1:])
    raise ValueError(f"embedding batch {emb.shape[0]} does not match {n} views")


def _camera_labels(cameras: Cameras | None, n: int, device: torch.device) -> torch.Tensor:
    """Flattened camera-to-world matrices (n, 16); zeros without cameras (the unconditional label)."""
    if cameras is None:
        return torch.zeros(n, 16, device=device)
    if len(cameras) != n:
        raise ValueError(f"{len(cameras)} cameras for {n} views")
    return cameras.c2w.reshape(n, 16).to(device, torch.float32)


_ADAPTER_IDS = itertools.count()

# LaTeX pieces of the formulas (``Estimator.formula``)
_EPS_Y, _EPS_NULL, _EPS = r"\epsilon_\phi(z_t;y)", r"\epsilon_\phi(z_t;\varnothing)", r"\epsilon"
_WEIGHTING_TEX = {"sds": r"1-\bar\alpha_t", "uniform": "1", "fantasia3d": r"\sqrt{\bar\alpha_t}\,(1-\bar\alpha_t)"}


def _num(x: float) -> str:
    """A constant as LaTeX: 3 significant digits, infinity as the symbol."""
    if math.isinf(x):
        return r"\infty" if x > 0 else r"-\infty"
    text = f"{x:.3g}"
    if "e" in text:
        mant, exp = text.split("e")
        return rf"{mant}\cdot 10^{{{int(exp)}}}"
    return text


class _PerThread:
    """An integer attribute with a value per thread (in the instance's ``_tally``, a ``threading.local``)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj._tally, self.name, 0)

    def __set__(self, obj: Any, value: int) -> None:
        setattr(obj._tally, self.name, value)


class Estimator:
    """The theta step shared by every method: draw t and eps, ask ``direction``, weight, guard, clip."""

    # What the trainer, the page, the CLI help, batch and the benchmarks read instead of asking what a method is:
    method = ""  # the name on the command line and in config files
    label = ""  # the name on the page and in tables
    learns: str | None = None  # what it learns alongside the scene (None: nothing, no learned-parameter rate)
    finite_cfg_only = False  # True where an infinite CFG weight makes the direction diverge
    edit_only = False  # True for methods that need a source image and caption (``python -m lods edit``)
    learns_null_condition = False  # True where the learned parameters replace the null condition (LODS): when
    # editing, that condition starts at the source caption (section 3.5)
    update_in_background = False  # True where ``update`` may run beside the next step's render in another thread:
    # it changes no state of the shared prior (no adapter switched on or off), only its own parameters

    @property
    def update_beside_guidance(self) -> bool:
        """Whether this step's ``update`` may start before its ``step`` and run beside the guidance's UNet
        forwards (``hold_learned`` first): true where the update runs in the background and needs nothing
        that the step computes."""
        return False

    def hold_learned(self, null_emb: torch.Tensor) -> None:
        """Before an update that runs beside this step's guidance: the next ``direction`` reads a copy of the
        learned parameters as they are now, whatever the update does to them meanwhile."""

    def __init__(self, prior: DiffusionPrior, config: GuidanceConfig | None = None):
        self.prior = prior
        self.config = config or GuidanceConfig()
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr = self.config.lr if self.config.lr is not None else DEFAULT_LR.get(self.method, 0.0)
        self._tally = threading.local()  # UNet passes counted per thread: the update may run beside the step
        self._parts: dict[str, torch.Tensor] | None = None  # the predictions ``direction`` made (see ``_keep``)
        # The update's own random stream (t, noise, camera dropout): the same draws whichever thread runs it.
        self.generator: torch.Generator | None = None

    _forward = _PerThread()  # UNet forward passes (in latents) since the last ``_counts``, in the calling thread
    _backward = _PerThread()

    def seed(self, seed: int) -> None:
        """Give ``update`` its own random stream, seeded (the trainer does; without it, torch's global one);
        unused by the estimators that learn nothing."""
        self.generator = torch.Generator(self.prior.device).manual_seed(seed)

    def _keep(self, **eps: torch.Tensor) -> None:
        """What ``direction`` computed, for :func:`update_parts`: eps_c, and eps_null and eps_learned where made."""
        self._parts = eps

    def parts_stats(self, raw, z_t, noise, t, null_emb, step: int) -> dict[str, float]:
        """:func:`update_parts` of this step's direction from the predictions ``direction`` kept; eps(null)
        from one more UNet forward (not counted as the method's) every ``config.parts_every`` steps where
        the method does not compute it. Empty for methods whose direction is not built on the added noise
        (VSD, ISM, DDS) and on the steps between measurements."""
        parts, self._parts = self._parts, None
        if parts is None or "eps_c" not in parts:
            return {}
        eps_null = parts.get("eps_null")
        if eps_null is None:
            every = self.config.parts_every
            if not every or step % every:
                return {}
            eps_null = self.prior.predict_noise(z_t, t, null_emb.to(self.prior.dtype))
        return update_parts(raw, parts["eps_c"], eps_null, noise, parts.get("eps_learned"))

    # counting UNet passes (in latents; divided by the batch when reported)
    def _eps(self, z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, class_labels=None) -> torch.Tensor:
        self._forward += z_t.shape[0]
        return self.prior.predict_noise(z_t, t, emb, class_labels)

    def _pair(self, z_t: torch.Tensor, t: torch.Tensor, emb_a: torch.Tensor, emb_b: torch.Tensor):
        """Two predictions on the same z_t in one UNet call (the usual CFG batching). One call, on the CPU too: a
        small UNet's time is mostly Python between its ops, which a second thread cannot share (the GIL)."""
        dtype = self.prior.dtype
        eps = self._eps(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([emb_a.to(dtype), emb_b.to(dtype)]))
        return eps.chunk(2)

    def _counts(self, n: int) -> dict[str, float]:
        counts = {"unet_forward": self._forward / n, "unet_backward": self._backward / n}
        self._forward = self._backward = 0
        return counts

    def noisy(self, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, null_emb: torch.Tensor) -> torch.Tensor:
        """z_t from the clean latents: fresh noise (Eq. 1) for every method but ISM."""
        return self.prior.add_noise(z, noise, t)

    def direction(
        self, z_t: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor,
        null_emb: torch.Tensor, cfg: float, step: int, cameras: Cameras | None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The method's unweighted direction on z (float32) and its own stats (at least the effective ``cfg``)."""
        raise NotImplementedError

    def equation(self, cfg: float, step: int) -> str:
        """The unweighted direction in LaTeX, with this step's constants written in."""
        return ""

    def formula(self, cfg: float, step: int = 0) -> str:
        """The direction on the latents as Markdown with LaTeX, every constant at its live value (weight
        ``cfg`` at ``step``): the timestep range and weighting, and the learned parameters' update."""
        lo, hi = self.config.schedule.bounds(step, self.prior.num_train_timesteps)
        lines = [
            f"**{self.label}** at step {step}:",
            "$$\\nabla_z \\mathcal{L} = w(t)\\,\\Big[" + self.equation(cfg, step) + "\\Big]$$",
            f"with $w(t) = {_WEIGHTING_TEX[self.config.weighting]}$ ({self.config.weighting} weighting), "
            f"$t \\sim \\mathcal{{U}}\\{{{lo}, \\dots, {hi}\\}}$, $\\epsilon \\sim \\mathcal{{N}}(0, I)$"
            + (f", gradients clipped at ${_num(self.config.grad_clip)}$" if self.config.grad_clip is not None else "")
            + ".",
        ]
        learned = self.learned_formula()
        if learned:
            lines.append(learned)
        return "\n\n".join(lines)

    def learned_formula(self) -> str:
        """Algorithm 1, line 6, in LaTeX with its learning rate; empty when nothing is learned."""
        return ""

    def step(
        self, z: torch.Tensor, text_emb: torch.Tensor, null_emb: torch.Tensor, cfg: float, step: int,
        cameras: Cameras | None = None,
    ) -> GuidanceOutput:
        """Algorithm 1, line 5: the direction for theta with the learned parameters frozen."""
        n = z.shape[0]
        self._forward = self._backward = 0
        t = self.config.schedule.sample(step, n, self.prior.num_train_timesteps, z.device)
        noise = torch.randn(z.shape, device=z.device, dtype=torch.float32)
        with torch.no_grad():
            z_t = self.noisy(z.detach().float(), noise, t, _per_view(null_emb, n))
            self._parts = None
            raw, stats = self.direction(
                z_t, noise, t, _per_view(text_emb, n), _per_view(null_emb, n), cfg, step, cameras
            )
            stats.update(self.parts_stats(raw, z_t, noise, t, _per_view(null_emb, n), step))
            w_t = timestep_weight(self.prior.alphas_cumprod[t], self.config.weighting).view(-1, 1, 1, 1)
            grad = w_t * raw
            nonfinite = (~torch.isfinite(grad)).sum()
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            if self.config.grad_clip is not None:
                grad = grad.clamp(-self.config.grad_clip, self.config.grad_clip)
        loss = detached_target_loss(z, grad)
        stats.update(
            t=t.float().mean().item(),
            w_t=w_t.mean().item(),
            grad_norm=grad.flatten(1).norm(dim=1).mean().item(),
            nonfinite=float(nonfinite),
            **self._counts(n),
        )
        return GuidanceOutput(loss, grad, stats)

    def update(
        self, z: torch.Tensor, text_emb: torch.Tensor, null_emb: torch.Tensor, cameras: Cameras | None = None
    ) -> dict[str, float] | None:
        """Algorithm 1, line 6; plain score distillation has nothing to learn."""
        return None

    def set_lr(self, lr: float) -> None:
        """Learning rate of the learned parameters, effective from the next update."""
        self.lr = lr
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def statistics(self) -> dict[str, float]:
        """The estimator's own per-step statistics beyond those of ``step`` and ``update`` (logged as they are)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.method} has no learned state to load")

    def close(self) -> None:
        """Detach whatever the estimator attached to the prior (adapters); plain estimators attach nothing."""


class Sds(Estimator):
    """DreamFusion's SDS (Eq. 3) with CFG as Eq. 2."""

    method = "sds"
    label = "SDS"
    finite_cfg_only = True

    def cfg_at(self, cfg: float, step: int) -> float:
        if math.isinf(cfg):
            raise ValueError(f"{self.method} diverges at cfg = inf; use sds-norm or lods-* for an infinite weight")
        return cfg

    def direction(self, z_t, noise, t, text_emb, null_emb, cfg, step, cameras):
        w = self.cfg_at(cfg, step)
        eps_c, eps_u = self._pair(z_t, t, text_emb, null_emb)
        self._keep(eps_c=eps_c, eps_null=eps_u)
        return sds_direction(cfg_combine(eps_c, eps_u, w), noise), {"cfg": w}

    def equation(self, cfg, step):
        w = cfg if math.isinf(cfg) else self.cfg_at(cfg, step)
        return rf"{_EPS_NULL} + {_num(w)}\,\big({_EPS_Y} - {_EPS_NULL}\big) - {_EPS}"


class CfgAnneal(Sds):
    """SDS whose CFG weight decreases linearly from ``cfg`` to ``config.cfg_end`` (section 3.3's baseline)."""

    method = "cfg-anneal"
    label = "CFG-anneal"

    def cfg_at(self, cfg: float, step: int) -> float:
        steps = self.config.anneal_steps if self.config.anneal_steps is not None else DEFAULT_ANNEAL_STEPS
        return annealed_cfg(super().cfg_at(cfg, step), self.config.cfg_end, step, steps)

    def formula(self, cfg, step=0):
        steps = self.config.anneal_steps if self.config.anneal_steps is not None else DEFAULT_ANNEAL_STEPS
        return (super().formula(cfg, step) + f"\n\nThe weight goes linearly from ${_num(cfg)}$ to "
                f"${_num(self.config.cfg_end)}$ over {steps} steps.")


class CfgRescale(Sds):
    """SDS with CFG rescale (MVDream's ``recon_std_rescale``): the guided prediction's clean-latent estimate is
    rescaled towards the conditional one's standard deviation by ``config.rescale_phi`` (Lin et al. 2024,
    Eqs. 15-16), and the direction is the noise prediction that estimate implies minus the added noise."""

    method = "cfg-rescale"

    def direction(self, z_t, noise, t, text_emb, null_emb, cfg, step, cameras):
        w = self.cfg_at(cfg, step)
        eps_c, eps_u = self._pair(z_t, t, text_emb, null_emb)
        self._keep(eps_c=eps_c, eps_null=eps_u)
        ab = self.prior.alphas_cumprod[t].to(z_t.device, torch.float32)
        x0 = cfg_rescale(x0_from_eps(z_t, cfg_combine(eps_c, eps_u, w).float(), ab),
                         x0_from_eps(z_t, eps_c.float(), ab), self.config.rescale_phi)
        return sds_direction(eps_from_x0(z_t, x0, ab), noise), {"cfg": w}

    def equation(self, cfg, step):
        w = cfg if math.isinf(cfg) else self.cfg_at(cfg, step)
        phi = _num(self.config.rescale_phi)
        return (rf"\epsilon(\hat x_0) - {_EPS},\ \hat x_0 = {phi}\,\tfrac{{\sigma(x_0^y)}}{{\sigma(x_0^{{w}})}}"
                rf"x_0^{{w}} + (1-{phi})\,x_0^{{w}},\ x_0^{{w}} = x_0\big({_EPS_NULL} + {_num(w)}\,({_EPS_Y} - "
                rf"{_EPS_NULL})\big)")


class Ism(Sds):
    """LucidDreamer's interval score matching: x_s is the clean latents DDIM-inverted (unconditional prediction,
    strides of ``config.ism_inversion_step``) to s = t - ``config.ism_interval``, x_t one more inversion step
    from x_s; the direction is the CFG-guided prediction at x_t minus the unconditional one at x_s (instead of
    the fresh noise of SDS). ``noisy`` builds x_t; ``direction`` reads the x_s prediction it kept."""

    method = "ism"

    def __init__(self, prior: DiffusionPrior, config: GuidanceConfig | None = None):
        super().__init__(prior, config)
        self._eps_s: torch.Tensor | None = None

    def noisy(self, z, noise, t, null_emb):
        ab = self.prior.alphas_cumprod.to(z.device, torch.float32)
        s = (t - self.config.ism_interval).clamp_min(0)
        x = self.prior.add_noise(z, noise, torch.zeros_like(t))  # the official code starts at t = 0
        cur = torch.zeros_like(t)
        while bool((cur < s).any()):  # DDIM inversion 0 -> s
            eps = self._eps(x, cur, null_emb).float()
            nxt = torch.minimum(cur + self.config.ism_inversion_step, s)
            x = torch.where((cur < s).view(-1, 1, 1, 1), ddim_step(x, eps, ab[cur], ab[nxt]), x)
            cur = nxt
        self._eps_s = self._eps(x, s, null_emb).float()
        return ddim_step(x, self._eps_s, ab[s], ab[t])  # x_s -> x_t

    def direction(self, z_t, noise, t, text_emb, null_emb, cfg, step, cameras):
        w = self.cfg_at(cfg, step)
        eps_c, eps_u = self._pair(z_t, t, text_emb, null_emb)
        eps_s, self._eps_s = self._eps_s, None
        return ism_direction(cfg_combine(eps_c, eps_u, w).float(), eps_s), {"cfg": w}

    def equation(self, cfg, step):
        w = cfg if math.isinf(cfg) else self.cfg_at(cfg, step)
        null_t = r"\epsilon_\phi(x_t;\varnothing)"
        return (rf"{null_t} + {_num(w)}\,\big(\epsilon_\phi(x_t;y) - {null_t}\big) - \epsilon_\phi(x_s;\varnothing),"
                rf"\ s = t - {self.config.ism_interval}")


class SdsRef(Estimator):
    """The reference SDS (Eq. 6): the conditional prediction only, one UNet pass, ``cfg`` ignored."""

    method = "sds-ref"
    label = "SDS-ref"

    def direction(self, z_t, noise, t, text_emb, null_emb, cfg, step, cameras):
        eps_c = self._eps(z_t, t, text_emb)
        self._keep(eps_c=eps_c)
        return sds_ref_direction(eps_c, noise), {"cfg": 1.0}

    def equation(self, cfg, step):
        return f"{_EPS_Y} - {_EPS}"


class SdsNorm(Estimator):
    """The normalized SDS (Eq. 7) with the null embedding frozen: Eq. 3 divided by w."""

    method = "sds-norm"
    label = "SDS-norm"

    def direction(self, z_t, noise, t, text_emb, null_emb, cfg, step, cameras):
        eps_c, eps_u = self._pair(z_t, t, text_emb, null_emb)
        self._keep(eps_c=eps_c, eps_null=eps_u)
        return sds_norm_direction(eps_c, eps_u, noise, cfg), {"cfg": cfg}

    null_tex = _EPS_NULL

    def equation(self, cfg, step):
        if math.isinf(cfg):
            return rf"{_EPS_Y} - {self.null_tex}\quad(w = \infty)"
        return rf"{_EPS_Y} {_num((1 - cfg) / cfg) if cfg > 1 else '+' + _num((1 - cfg) / cfg)}\,{self.null_tex} - " \
               rf"{_num(1 / cfg)}\,{_EPS}\quad(w = {_num(cfg)})"


class _Learner(Estimator):
    """Shared by the estimators with an optimizer of their own (Algorithm 1, line 6)."""

    def __init__(self, prior: DiffusionPrior, config: GuidanceConfig | None = None):
        super().__init__(prior, config)
        self.params: list[nn.Parameter] = []
        self._pending: torch.Tensor | None = None

    def _attach(self, params: list[nn.Parameter]) -> None:
        self.params = params
        for p in params:
            p.requires_grad_(False)
        self.optimizer = torch.optim.Adam(params, lr=self.lr)

    learned_tex = ""  # the learned prediction in the update's loss (LaTeX)
    learned_symbol = ""

    def learned_formula(self) -> str:
        return (rf"Then $\displaystyle {self.learned_symbol} \leftarrow \mathrm{{Adam}}_{{\eta = {_num(self.lr)}}}"
                rf"\big(\nabla_{{{self.learned_symbol}}}\,\|{self.learned_tex} - {_EPS}\|^2\big)$ on the detached "
                r"latents, $t \sim \mathcal{U}\{0, \dots, T-1\}$, fresh $\epsilon$.")

    def _set_trainable(self, on: bool) -> None:
        for p in self.params:
            p.requires_grad_(on)

    def _merged_forward(self, z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, noise: torch.Tensor):
        """Section 3.7: the learned branch's forward, its graph kept so that ``update`` needs no new forward."""
        self._set_trainable(True)
        with torch.enable_grad():
            eps = self._eps(z_t, t, _per_view(emb, z_t.shape[0]))  # expanded here, inside the graph
            self._pending = denoising_loss(eps, noise)
        self._set_trainable(False)
        return eps.detach()

    def _noisy_uniform(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """t uniform in [0, T), fresh noise, and z_t from detached latents: the diffusion training objective."""
        t = torch.randint(0, self.prior.num_train_timesteps, (z.shape[0],), device=z.device, generator=self.generator)
        noise = torch.randn(z.shape, device=z.device, dtype=torch.float32, generator=self.generator)
        return t, noise, self.prior.add_noise(z.detach().float(), noise, t)

    def _learn(self, loss: torch.Tensor, n_items: int) -> float:
        """One optimizer step on ``loss`` (whose graph runs through ``n_items`` latents of UNet passes)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._backward += n_items
        self.optimizer.step()
        return loss.item()

    def _pending_update(self, n: int) -> float:
        """Section 3.7: backpropagate the loss whose forward was made during the theta step."""
        if self._pending is None:
            raise RuntimeError("with merge_update, call step() before update()")
        loss, self._pending = self._pending, None
        self._set_trainable(True)
        try:
            return self._learn(loss, n)
        finally:
            self._set_trainable(False)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "params": [p.detach().cpu().clone() for p in self.params],
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "lr": self.lr,
        }
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["params"]) != len(self.params):
            raise ValueError(f"{self.method}: {len(state['params'])} saved tensors for {len(self.params)} parameters")
        with torch.no_grad():
            for p, v in zip(self.params, state["params"]):
                p.copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.set_lr(state["lr"])
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])


class LodsEmbed(_Learner):
    """LODS with a learnable unconditional embedding alpha (Algorithm 2).

    Theta step: Eq. 7 with alpha frozen. Update: Eq. 8, the denoising loss of eps(z_t; alpha) on the
    detached latents with t uniform in [0, T); it does not involve w. alpha is one (1, L, D) tensor
    shared by all views, initialized on first use from ``null_emb`` (the null or negative-prompt
    embedding; the source caption's when editing).
    """

    method = "lods-embed"
    label = "LODS-embed"
    learned_tex = null_tex = r"\epsilon_\phi(z_t;\alpha)"
    learned_symbol = r"\alpha"
    equation = SdsNorm.equation
    learns = "the null embedding alpha"
    learns_null_condition = True
    update_in_background = True  # Eq. 8 moves alpha only; the UNet is frozen and shared as it is

    def __init__(self, prior: DiffusionPrior, config: GuidanceConfig | None = None):
        super().__init__(prior, config)
        self.alpha: nn.Parameter | None = None
        self.alpha_init: torch.Tensor | None = None
        self._held: torch.Tensor | None = None  # alpha as the next direction reads it (``hold_learned``)

    def _ensure_alpha(self, null_emb: torch.Tensor) -> nn.Parameter:
        if self.alpha is None:
            self.alpha_init = null_emb[:1].detach().float().clone()
            self.alpha = nn.Parameter(self.alpha_init.clone())
            self._attach([self.alpha])
        return self.alpha

    @property
    def update_beside_guidance(self) -> bool:
        # Eq. 8 draws its own t and noise on the detached latents: it needs nothing from Eq. 7's step (the
        # merged forward of section 3.7 does: its backward is the update)
        return self.update_in_background and not self.config.merge_update

    def hold_learned(self, null_emb: torch.Tensor) -> None:
        self._held = self._ensure_alpha(null_emb).detach().clone()

    def direction(self, z_t, noise, t, text_emb, null_emb, cfg, step, cameras):
        n = z_t.shape[0]
        held, self._held = self._held, None
        alpha = (held if held is not None else self._ensure_alpha(null_emb)).expand(n, -1, -1)
        if not self.config.merge_update:
            eps_c, eps_a = self._pair(z_t, t, text_emb, alpha)
        else:
            eps_c = self._eps(z_t, t, text_emb)
            eps_a = self._merged_forward(z_t, t, self.alpha, noise)
        self._keep(eps_c=eps_c, eps_learned=eps_a)
        return sds_norm_direction(eps_c, eps_a, noise, cfg), {"cfg": cfg}

    def update(self, z, text_emb, null_emb, cameras=None):
        """Eq. 8 on the detached latents; returns the denoising loss and how far alpha moved."""
        n = z.shape[0]
        self._forward = self._backward = 0
        if self.config.merge_update:
            loss = self._pending_update(n)
        else:
            alpha = self._ensure_alpha(null_emb)
            t, noise, z_t = self._noisy_uniform(z)
            self._set_trainable(True)
            try:
                with torch.enable_grad():
                    loss = self._learn(denoising_loss(self._eps(z_t, t, alpha.expand(n, -1, -1)), noise), n)
            finally:
                self._set_trainable(False)
        drift = (self.alpha.detach() - self.alpha_init).norm().item()
        return {"update_loss": loss, "alpha_drift": drift, **self._counts(n)}

    def statistics(self) -> dict[str, float]:
        """``embedding_distance``: ||alpha - alpha_0|| / ||alpha_0||, how far the learned null embedding moved."""
        if self.alpha is None:
            return {}
        return {"embedding_distance": float((self.alpha.detach() - self.alpha_init).norm() / self.alpha_init.norm())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.alpha is None:
            self._ensure_alpha(state["alpha_init"].to(self.prior.device))
        super().load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        if self.alpha is None:
            return {}
        return {**super().state_dict(), "alpha_init": self.alpha_init.cpu().clone()}


class LodsLora(_Learner):
    """LODS with learnable LoRA parameters psi (Algorithm 3).

    Theta step: Eq. 9, the conditional branch on the base model (LoRA scale 0) and the null branch on
    the LoRA model at ``config.lora_scale``. Update: Eq. 10, the denoising loss of eps_psi(z_t; null)
    at the same ``config.lora_scale`` (Eqs. 9 and 10 share one psi; the official release trains and
    applies it at ``lora_weight`` 0.5), t uniform in [0, T). With ``merge_update`` psi is trained
    through the theta step's null-branch forward, at the same scale and at the theta step's t.
    """

    method = "lods-lora"
    label = "LODS-LoRA"
    learned_symbol = r"\psi"
    equation = SdsNorm.equation

    @property
    def null_tex(self) -> str:
        return rf"\epsilon_{{\phi+{_num(self.config.lora_scale)}\psi}}(z_t;\varnothing)"

    learned_tex = null_tex
    learns = "LoRA parameters psi"
    learns_null_condition = True

    def __init__(self, prior: DiffusionPrior, config: GuidanceConfig | None = None):
        super().__init__(prior, config)
        self.adapter = f"lods_lora_{next(_ADAPTER_IDS)}"
        self._attach(prior.add_lora(self.adapter, self.config.lora_rank, self.config.lora_alpha))

    def direction(self, z_t, noise, t, text_emb, null_emb, cfg, step, cameras):
        eps_c = self._eps(z_t, t, text_emb)
        with self.prior.lora_scale(self.adapter, self.config.lora_scale):
            if not self.config.merge_update:
                eps_u = self._eps(z_t, t, null_emb)
            else:
                eps_u = self._merged_forward(z_t, t, null_emb, noise)
        self._keep(eps_c=eps_c, eps_learned=eps_u)
        return sds_norm_direction(eps_c, eps_u, noise, cfg), {"cfg": cfg}

    def update(self, z, text_emb, null_emb, cameras=None):
        """Eq. 10 on the detached latents with the null embedding."""
        n = z.shape[0]
        self._forward = self._backward = 0
        if self.config.merge_update:
            loss = self._pending_update(n)
        else:
            t, noise, z_t = self._noisy_uniform(z)
            self._set_trainable(True)
            try:
                with self.prior.lora_scale(self.adapter, self.config.lora_scale), torch.enable_grad():
                    loss = self._learn(denoising_loss(self._eps(z_t, t, _per_view(null_emb, n)), noise), n)
            finally:
                self._set_trainable(False)
        return {"update_loss": loss, **self._counts(n)}

    def close(self) -> None:
        self.prior.remove_lora(self.adapter)


class Vsd(_Learner):
    """ProlificDreamer's VSD (Eq. 5) with a camera-conditioned LoRA model of the renders.

    Theta step: w(t) (CFG-guided pretrained prediction - LoRA prediction with the views' cameras, CFG 1).
    Update: the LoRA's denoising loss on the renders with the text condition, t uniform in [0, T), and the
    camera label zeroed for ``config.camera_dropout`` of the views.
    """

    method = "vsd"
    label = "VSD"
    learned_symbol = r"\psi"
    learned_tex = r"\epsilon_{\phi+\psi}(z_t;y,c)"

    def equation(self, cfg, step):
        return (rf"{_EPS_NULL} + {_num(cfg)}\,\big({_EPS_Y} - {_EPS_NULL}\big) - "
                r"\epsilon_{\phi+\psi}(z_t;y,c)")
    learns = "a camera-conditioned LoRA"
    finite_cfg_only = True

    def __init__(self, prior: DiffusionPrior, config: GuidanceConfig | None = None):
        super().__init__(prior, config)
        self.adapter = f"vsd_lora_{next(_ADAPTER_IDS)}"
        params = prior.add_lora(self.adapter, self.config.lora_rank, self.config.lora_alpha, camera_conditioning=True)
        self._attach(params)

    def direction(self, z_t, noise, t, text_emb, null_emb, cfg, step, cameras):
        if math.isinf(cfg):
            raise ValueError("vsd diverges at cfg = inf; use a finite guidance weight (ProlificDreamer uses 7.5)")
        eps_c, eps_u = self._pair(z_t, t, text_emb, null_emb)
        with self.prior.lora_scale(self.adapter, 1.0):
            eps_lora = self._eps(z_t, t, text_emb, _camera_labels(cameras, z_t.shape[0], z_t.device))
        return vsd_direction(cfg_combine(eps_c, eps_u, cfg), eps_lora), {"cfg": cfg}

    def update(self, z, text_emb, null_emb, cameras=None):
        n = z.shape[0]
        self._forward = self._backward = 0
        t, noise, z_t = self._noisy_uniform(z)
        labels = _camera_labels(cameras, n, z.device)
        keep = (torch.rand(n, 1, device=z.device, generator=self.generator) >= self.config.camera_dropout).float()
        self._set_trainable(True)
        try:
            with self.prior.lora_scale(self.adapter, 1.0), torch.enable_grad():
                eps = self._eps(z_t, t, _per_view(text_emb, n), labels * keep)
                loss = self._learn(denoising_loss(eps, noise), n)
        finally:
            self._set_trainable(False)
        return {"update_loss": loss, **self._counts(n)}

    def close(self) -> None:
        self.prior.remove_lora(self.adapter)


class Dds(Estimator):
    """Delta Denoising Score (Eq. 4) for editing: call ``set_source(z_source, source_emb)`` first.

    The source latents get the same noise and t as the edited ones; both sides use CFG with weight ``cfg``
    and ``null_emb`` as the unconditional embedding; all four predictions share one UNet call.
    """

    method = "dds"
    label = "DDS"
    finite_cfg_only = True
    edit_only = True

    def __init__(self, prior: DiffusionPrior, config: GuidanceConfig | None = None):
        super().__init__(prior, config)
        self.source: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_source(self, z_source: torch.Tensor, source_emb: torch.Tensor) -> None:
        self.source = (z_source.detach().float(), source_emb.detach())

    def direction(self, z_t, noise, t, text_emb, null_emb, cfg, step, cameras):
        if self.source is None:
            raise ValueError("dds needs set_source(z_source, source_emb) before step()")
        if math.isinf(cfg):
            raise ValueError("dds diverges at cfg = inf; use a finite guidance weight")
        n = z_t.shape[0]
        z_src, src_emb = self.source
        zs_t = self.prior.add_noise(_per_view(z_src, n), noise, t)
        src_emb = _per_view(src_emb, n).to(text_emb.dtype)
        embs = torch.cat([text_emb, null_emb, src_emb, null_emb])
        eps = self._eps(torch.cat([z_t, z_t, zs_t, zs_t]), t.repeat(4), embs)
        eps_c, eps_u, eps_sc, eps_su = eps.chunk(4)
        return dds_direction(cfg_combine(eps_c, eps_u, cfg), cfg_combine(eps_sc, eps_su, cfg)), {"cfg": cfg}

    def equation(self, cfg, step):
        return (rf"\hat\epsilon_{{{_num(cfg)}}}(z_t;y) - \hat\epsilon_{{{_num(cfg)}}}(\tilde z_t;\tilde y),\ "
                r"\hat\epsilon_w = \epsilon_\phi(\cdot;\varnothing) + w\,(\epsilon_\phi(\cdot;y) - "
                r"\epsilon_\phi(\cdot;\varnothing))")


METHODS: dict[str, type[Estimator]] = {
    cls.method: cls for cls in (Sds, SdsRef, SdsNorm, LodsEmbed, LodsLora, Vsd, CfgAnneal, CfgRescale, Ism, Dds)
}


def default_lr(method: str) -> float | None:
    """The learned-parameter rate of ``method`` on a real prior (``DEFAULT_LR``); None when it learns nothing."""
    return DEFAULT_LR.get(method) if METHODS[method].learns else None


def make_estimator(
    method: str, prior: DiffusionPrior, config: GuidanceConfig | dict[str, Any] | None = None
) -> Estimator:
    """The estimator called ``method`` (one of ``METHODS``) on ``prior``."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose one of: {', '.join(METHODS)}")
    if isinstance(config, dict):
        config = GuidanceConfig.from_dict(config)
    return METHODS[method](prior, config)
