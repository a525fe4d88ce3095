"""What a training step minimises, beyond plain cross-entropy: augmentation and deviation-aware distillation.

`fit` (train.py) draws a batch and hands it here. Two ideas, both about making a small student g
track a fixed teacher f *everywhere near the data*, not only on the training points themselves:

- `augment_batch`: random pixel shifts (and horizontal flips for data without a handedness, e.g.
  clothing). With a teacher, the teacher is evaluated on the *same* augmented view ("consistent
  teaching", Beyer et al. 2022), so the student matches f's function, not just 4,000 labels.
- `adversarial_points`: PGD on ||f(x') - g(x')||^2 inside the L-inf box of radius eps around each
  training point (clipped to the data range), then the student is distilled on those points too and
  pays for its worst logit deviation there. This targets exactly what `certify` bounds
  (max |Delta logit| over boxes around data), so certificates can hold at higher compression.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prunecert.errors import ConfigError

AUGMENTATIONS = ("shift", "shift1", "shift-flip")


@dataclass(frozen=True)
class Adversarial:
    """Adversarial distillation settings: box radius, PGD steps, weight of the worst-deviation term."""

    eps: float = 0.01
    steps: int = 5
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not (self.eps > 0 and self.eps < 1):
            raise ConfigError(f"adversarial distillation: eps must lie in (0, 1), got {self.eps}")
        if int(self.steps) < 1:
            raise ConfigError(f"adversarial distillation: steps must be >= 1, got {self.steps}")
        if not self.weight >= 0:
            raise ConfigError(f"adversarial distillation: weight must be >= 0, got {self.weight}")


def check_augment(augment: str | None) -> None:
    if augment is not None and augment not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")


def augment_batch(x: torch.Tensor, augment: str, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by a random integer offset in [-2, 2]^2 ('shift1': [-1, 1]^2; zero fill); 'shift-flip'
    also mirrors half of them left-right. Inputs that are not (B, C, H, W) images are returned unchanged."""
    if x.ndim != 4:
        return x
    b, _, h, w = x.shape
    s = 1 if augment == "shift1" else 2
    dy = torch.randint(-s, s + 1, (b,), generator=gen)
    dx = torch.randint(-s, s + 1, (b,), generator=gen)
    padded = F.pad(x, (s, s, s, s))
    rows = (torch.arange(h)[None, :] + s - dy[:, None])[:, :, None]       # (B, H, 1)
    cols = (torch.arange(w)[None, :] + s - dx[:, None])[:, None, :]       # (B, 1, W)
    out = padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if augment == "shift-flip":
        flip = torch.rand(b, generator=gen) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out.contiguous()


def adversarial_points(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor, settings: Adversarial,
                       lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    """PGD (random start, signed steps of 2.5 eps / steps) maximising ||f(x') - g(x')||^2 per point over
    the box |x' - x| <= eps intersected with [lo, hi]. Gradients flow to x' only (the models' parameter
    gradients are untouched)."""
    eps = float(settings.eps)
    step = 2.5 * eps / int(settings.steps)
    box_lo, box_hi = (x - eps).clamp(min=lo), (x + eps).clamp(max=hi)
    noise = (torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1) * eps
    xa = torch.max(torch.min(x + noise, box_hi), box_lo)
    for _ in range(int(settings.steps)):
        xa = xa.detach().requires_grad_(True)
        dev = (teacher(xa) - student(xa)).square().sum()
        (grad,) = torch.autograd.grad(dev, xa)
        xa = torch.max(torch.min(xa + step * grad.sign(), box_hi), box_lo)
    return xa.detach()


def worst_logit_deviation(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """mean over the batch of max_k |f_k - g_k|: the quantity `certify --tolerance` bounds."""
    return (teacher_logits - student_logits).abs().amax(dim=1).mean()
