"""UG-ICM's training loss (AAAI 2025; METHODS.md §2), as the authors' scripts compute it
(YinKangSheng/UG-ICM ``utils/training.py``, run by ``playground/train.sh``).

Stages 1–2 (``train_condi.py``; one β ∈ {0, 1} drawn per sample, a term is 0 when the batch has
none of its β):

``L = bpp + 0.5·(λ·255²·MSE(x̂_β=0, x) + λ₁·255²·MSE(x̂_β=1, target) + λ_clip·CLIP(x̂_β=1, x))``

Stage 3 (``train_mask.py``; every sample decoded both ways from its one latent, ``x_hat`` then
holding n human then n machine decodes; only the decoder side trains, so the rate is constant
and, as in the authors' loss, left out):

``L = λ·255²·MSE(x̂_β=0, x) + λ_inst·CLIP_inst(x̂_β=1, x) + λ_clip·CLIP(x̂_β=1, x)
      [+ λ₁·255²·MSE(x̂_β=1, target)]``

``target`` is the original or its MAA image; each MSE/CLIP term averages over the decodes made
with its β. The authors' weights (``STAGE_DEFAULTS``): stage 1 λ = 0.0022, λ₁ = 0.0011,
λ_clip = 11; stage 2 λ₁ = 0 (their stage-2 command passes ``--lambda_beta1 0``), λ_clip = 22;
stage 3 λ = 0.001, λ_inst = 1 (the value their ``--lambda_beta1`` carries into the instance
term), λ_clip = 1 and no machine MSE (λ₁ = 0; a positive λ₁ keeps an MAA target in stage 3 —
this project's option, off by default). Departure: CLIP runs on CompressAI-sized crops, not
MLIC++'s, and instance crops come from boxes (the authors mask each object first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from icm.losses.clip import ClipDistance
from icm.losses.rd import bpp_of

STAGE_DEFAULTS = {1: {"lmbda": 0.0022, "lmbda_machine": 0.0011, "lmbda_clip": 11.0},
                  2: {"lmbda": 0.0022, "lmbda_machine": 0.0, "lmbda_clip": 22.0},
                  3: {"lmbda": 0.001, "lmbda_machine": 0.0, "lmbda_instance": 1.0, "lmbda_clip": 1.0}}


class UGICMLoss(nn.Module):
    def __init__(self, lmbda: float = 0.0022, lmbda_machine: float = 0.0011, lmbda_clip: float = 11.0,
                 clip: ClipDistance | None = None, stage: int = 1, lmbda_instance: float = 0.0):
        super().__init__()
        if (lmbda_clip > 0 or (stage >= 3 and lmbda_instance > 0)) and clip is None:
            raise ValueError("lmbda_clip > 0 (or, in stage 3, lmbda_instance > 0) needs a CLIP model "
                             "(loss.clip.weights in the config)")
        self.lmbda, self.lmbda_machine, self.lmbda_clip = lmbda, lmbda_machine, lmbda_clip
        self.lmbda_instance, self.clip, self.stage = lmbda_instance, clip, stage

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
        clip = instance = zero
        if self.lmbda_clip > 0 and machine.any():
            clip = self.clip(x_hat[machine], x[machine])
        if self.stage >= 3 and self.lmbda_instance > 0 and boxes is not None and machine.any():
            instance = self.clip.instances(x_hat[machine], x[machine], [b for b, m in zip(boxes, machine.tolist()) if m])
        if self.stage >= 3:
            loss = (self.lmbda * 255 ** 2 * mse_h + self.lmbda_machine * 255 ** 2 * mse_m
                    + self.lmbda_instance * instance + self.lmbda_clip * clip)
        else:
            loss = bpp + 0.5 * (self.lmbda * 255 ** 2 * mse_h + self.lmbda_machine * 255 ** 2 * mse_m
                                + self.lmbda_clip * clip)
        return {"loss": loss, "bpp_loss": bpp, "mse_human": mse_h, "mse_machine": mse_m, "clip": clip,
                "clip_instance": instance}
