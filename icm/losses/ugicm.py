"""UG-ICM's training loss (AAAI 2025; METHODS.md §2):

``L = bpp + 0.5·(λ·255²·MSE(x̂_β=0, x) + λ₁·255²·MSE(x̂_β=1, target) + λ_clip·CLIP(x̂_β=1, x))``

where each MSE/CLIP term averages over the decodes made with that β, ``target`` is the original
or its MAA image. Stages 1–2 draw one β ∈ {0, 1} per sample (a term is 0 when the batch has
none). Stage 3, as the authors train it, decodes every sample both ways from its one latent
(``x_hat`` then holds 2n decodes: n human, n machine) and adds the instance CLIP term on object
boxes to the global one, with the same λ_clip.

Where this departs from the authors: their training script is unreleased, so the weights are
METHODS.md's (λ = 0.0022, λ₁ = 0.0011, λ_clip = 11, stage 2 λ_clip = 22); stage 3 keeps stage 1's
factor 0.5, which makes its loss the expectation of stage 1's over β, so a stage-3 fine-tune
continues on the scale the model was trained at. CLIP runs on CompressAI-sized crops, not MLIC++'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from icm.losses.clip import ClipDistance
from icm.losses.rd import bpp_of


class UGICMLoss(nn.Module):
    def __init__(self, lmbda: float = 0.0022, lmbda_machine: float = 0.0011, lmbda_clip: float = 11.0,
                 clip: ClipDistance | None = None, instance: bool = False):
        super().__init__()
        if lmbda_clip > 0 and clip is None:
            raise ValueError("lmbda_clip > 0 needs a CLIP model (clip.weights in the config)")
        self.lmbda, self.lmbda_machine, self.lmbda_clip = lmbda, lmbda_machine, lmbda_clip
        self.clip, self.instance = clip, instance

    def forward(self, output: dict, x: torch.Tensor, target: torch.Tensor, beta: torch.Tensor,
                boxes: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        n, _, h, w = x.shape
        bpp = bpp_of(output["likelihoods"], n * h * w)
        x_hat = output["x_hat"]
        if len(x_hat) == 2 * n:  # both decodes of every sample
            x, target = torch.cat([x, x]), torch.cat([target, target])
            boxes = None if boxes is None else list(boxes) + list(boxes)
        human, machine = beta < 0.5, beta >= 0.5
        zero = x_hat.sum() * 0.0
        mse_h = F.mse_loss(x_hat[human], x[human]) if human.any() else zero
        mse_m = F.mse_loss(x_hat[machine], target[machine]) if machine.any() else zero
        clip = zero
        if self.lmbda_clip > 0 and machine.any():
            clip = self.clip(x_hat[machine], x[machine])
            if self.instance and boxes is not None:
                clip = clip + self.clip.instances(x_hat[machine], x[machine],
                                                  [b for b, m in zip(boxes, machine.tolist()) if m])
        distortion = 0.5 * (self.lmbda * 255 ** 2 * mse_h + self.lmbda_machine * 255 ** 2 * mse_m
                            + self.lmbda_clip * clip)
        return {"loss": bpp + distortion, "bpp_loss": bpp, "mse_human": mse_h, "mse_machine": mse_m, "clip": clip}
