"""MAA — Meta Adversarial Adaptation (IJCV 2026, "Towards Generalized Image Coding for Machine
Through Meta Adversarial Adaptation"): AAFG, model-wise and domain-wise Meta-AAFG.

All three are sign-gradient *descent* on detectors' own training losses against the ground
truth (they make images easier for the detectors), on letterboxed canvases:

* AAFG (one detector, or one set): ``adv ← clamp(adv − α·sign(∇L(adv)))`` then projection onto
  the bound, ``steps`` times (authors: 10 steps, α = 2/255, no random start).
* Meta-AAFG over groups (model-wise: each group is one detector; domain-wise: each group is the
  detector set of one domain): ``outer`` iterations, each one leave-one-out round per group h:
  ``inner`` sign-descent steps from ``adv_T`` on the summed losses of the other groups (clamped,
  not projected, then discarded) → ``adv_in``; commit ``adv_T ← project(clamp(adv_T −
  α·sign(∇L_h(adv_in))))`` (a first-order look-ahead; authors: T = 10, 8 inner steps, ε = 8/255).

Every update is multiplied by the canvas mask, so the gray padding never changes. Losses are
per-image sums (detectors in eval mode), so one image's update never depends on its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from icm.detectors.base import Detector, total


@dataclass
class Member:
    """A detector in an MAA set, with its targets (already in its label space) for the batch."""

    name: str
    detector: Detector
    targets: list[dict]
    seeds: list[int] = field(default_factory=list)   # one per image; fixes stochastic sampling

    def loss(self, images: torch.Tensor, step: int) -> torch.Tensor:
        targets = [dict(t, seed=(s * 1_000_003 + step) % (2 ** 31))
                   for t, s in zip(self.targets, self.seeds or [0] * len(self.targets))]
        return total(self.detector.loss(images, targets))


Group = Sequence[Member]
Project = Callable[[torch.Tensor], torch.Tensor]


def group_loss(group: Group, images: torch.Tensor, step: int) -> torch.Tensor:
    return torch.stack([m.loss(images, step) for m in group]).sum()


def gradient(loss_fn: Callable[[torch.Tensor], torch.Tensor], adv: torch.Tensor) -> torch.Tensor:
    x = adv.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(x), x)
    return grad


def sign_step(adv: torch.Tensor, grad: torch.Tensor, alpha: float, mask: torch.Tensor) -> torch.Tensor:
    """One masked sign-descent step, clamped to [0, 1]."""
    return (adv - alpha * grad.sign() * mask).clamp(0, 1).detach()


def aafg(x: torch.Tensor, mask: torch.Tensor, group: Group, project: Project, steps: int = 10,
         alpha: float = 2 / 255) -> torch.Tensor:
    adv = x.clone()
    for step in range(steps):
        adv = project(sign_step(adv, gradient(lambda a: group_loss(group, a, step), adv), alpha, mask))
    return adv


def meta_round(adv_t: torch.Tensor, mask: torch.Tensor, groups: Sequence[Group], held_out: int,
               project: Project, inner_steps: int, alpha: float, step: int) -> torch.Tensor:
    """One leave-one-out round: inner steps on the other groups, commit the held-out step."""
    others = [m for i, g in enumerate(groups) if i != held_out for m in g]
    adv_in = adv_t
    for k in range(inner_steps):
        adv_in = sign_step(adv_in, gradient(lambda a: group_loss(others, a, step + k), adv_in), alpha, mask)
    g_held = gradient(lambda a: group_loss(groups[held_out], a, step + inner_steps), adv_in)
    return project(sign_step(adv_t, g_held, alpha, mask))


def meta_aafg(x: torch.Tensor, mask: torch.Tensor, groups: Sequence[Group], project: Project,
              outer: int = 10, inner_steps: int = 8, alpha: float = 2 / 255) -> torch.Tensor:
    if len(groups) < 2:
        raise ValueError(f"Meta-AAFG needs at least 2 groups (models or domains), got {len(groups)}")
    adv = x.clone()
    for t in range(outer):
        for h in range(len(groups)):
            adv = meta_round(adv, mask, groups, h, project, inner_steps, alpha,
                             step=(t * len(groups) + h) * (inner_steps + 1))
    return adv


METHODS = ("aafg", "meta_model", "meta_domain")


@torch.no_grad()
def per_image_losses(member: Member, images: torch.Tensor) -> list[float]:
    """Each image's own loss (one call per image, fixed sampling seed), for the manifest."""
    out = []
    for i in range(len(images)):
        single = Member(member.name, member.detector, [member.targets[i]],
                        [member.seeds[i]] if member.seeds else [])
        out.append(float(single.loss(images[i:i + 1], step=0)))
    return out
