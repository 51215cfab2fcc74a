"""RoIAlign (He et al., "Mask R-CNN", ICCV 2017) with a deterministic backward of our own, and the
FPN level routing of torchvision's ``MultiScaleRoIAlign`` with one host sync for all levels.

torchvision's CUDA ``roi_align`` backward scatters with ``atomicAdd`` (non-deterministic); with
deterministic algorithms on, ``torchvision.ops.roi_align`` swaps in a pure-PyTorch version under
``torch.compile`` whose backward is a sort-based ``index_put`` over every sample of every channel
of every ROI — the slow path TRAPS.md names. Here the forward stays torchvision's kernel (no
atomics) and the backward uses the fact that on an axis-aligned sampling grid the bilinear
sampling is separable: for ROI ``r`` and channel ``c``,

    output[r, c] = W_y[r] · input[n_r, c] · W_x[r]ᵀ      (W_y: PH×H, W_x: PW×W)

where each row of ``W_y`` / ``W_x`` holds the bilinear weights of that bin's sample points (with
torchvision's boundary rules: samples outside [-1, H] × [-1, W] are dropped, coordinates ≤ 0 clamp
to 0, the last row/column absorbs the weight past it) divided by the grid size. The gradient is

    grad_input[n, c] = Σ_{r in image n} W_y[r]ᵀ · grad_output[r, c] · W_x[r]

computed as two batched matmuls (ROIs grouped per image): no atomics, no sort, deterministic in
cuBLAS and on the CPU. Hand-written because neither torchvision nor PyTorch ships a deterministic
RoIAlign backward that runs at kernel speed.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

# Memory for the backward's largest intermediates, per channel chunk (channels are independent).
BACKWARD_CHUNK_BYTES = 512 * 2 ** 20


def separable_backward_wanted(input: Tensor) -> bool:
    """Where torchvision would fall back to its compiled pure-PyTorch RoIAlign: deterministic
    algorithms on, tensors on an accelerator. (torchvision's CPU backward is a sequential loop, already
    deterministic.)"""
    return torch.are_deterministic_algorithms_enabled() and input.device.type != "cpu"


def roi_align(input: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False, rois_per_image: int | None = None,
              separable: bool | None = None) -> Tensor:
    """``torchvision.ops.roi_align`` on ``rois`` (K×5: image index, x1, y1, x2, y2), with the
    separable deterministic backward where :func:`separable_backward_wanted` (or ``separable``)
    says so. ``rois_per_image``: the most ROIs any one image has, if the caller knows it (saves the
    backward a host sync)."""
    ph, pw = output_size
    if separable if separable is not None else separable_backward_wanted(input):
        return SeparableRoIAlign.apply(input, rois, float(spatial_scale), int(ph), int(pw), int(sampling_ratio),
                                       bool(aligned), rois_per_image)
    return tv_roi_align(input, rois, (ph, pw), spatial_scale, sampling_ratio, aligned)


def axis_weights(start: Tensor, end: Tensor, size: int, bins: int, spatial_scale: float, sampling_ratio: int,
                 aligned: bool) -> Tensor:
    """Per ROI (any leading shape), the bins×size matrix of one axis's bilinear sampling weights,
    already divided by the axis's grid size, with torchvision's kernel arithmetic
    (``roi_align_kernel.cpp``: the sample positions, then ``bilinear_interpolate_gradient``: samples
    outside [-1, size] dropped, positions clamped to [0, size - 1], weights 1 - |cell - position|)."""
    offset = 0.5 if aligned else 0.0
    roi_start = start * spatial_scale - offset
    length = end * spatial_scale - offset - roi_start
    if not aligned:
        length = length.clamp(min=1.0)
    bin_size = (length / bins)[..., None, None]
    if sampling_ratio > 0:
        grid, most = sampling_ratio, sampling_ratio
    else:
        grid = torch.ceil(length / bins)[..., None, None]
        most = max(int(grid.max()), 1) if grid.numel() else 1   # adaptive sampling: a host sync
    samples = torch.arange(most, device=start.device, dtype=start.dtype)
    bins_at = torch.arange(bins, device=start.device, dtype=start.dtype)[:, None]
    # y = roi_start + p·bin + (i + 0.5)·bin / grid, in the kernel's order of operations: ...×bins×most
    pos = roi_start[..., None, None] + bins_at * bin_size + (samples + 0.5) * bin_size / grid
    used = (pos >= -1.0) & (pos <= size)
    if sampling_ratio <= 0:
        used &= samples < grid
    cells = torch.arange(size, device=start.device, dtype=start.dtype)
    weight = (1.0 - (cells - pos.clamp(0, size - 1)[..., None]).abs()).clamp(min=0)
    weight = torch.where(used[..., None], weight, 0.0).sum(-2)
    return weight / (grid.clamp(min=1) if isinstance(grid, Tensor) else grid)


class SeparableRoIAlign(torch.autograd.Function):
    """torchvision's RoIAlign forward; the backward as two batched matmuls per image (module doc)."""

    @staticmethod
    def forward(ctx, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                rois_per_image):
        ctx.save_for_backward(rois)
        ctx.args = (input.shape, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, rois_per_image)
        return torch.ops.torchvision.roi_align(input, rois, spatial_scale, pooled_height, pooled_width,
                                               sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        shape, scale, ph, pw, sampling_ratio, aligned, rois_per_image = ctx.args
        grad_input = separable_roi_align_backward(grad_output, rois, shape, scale, ph, pw, sampling_ratio, aligned,
                                                  rois_per_image)
        return grad_input, None, None, None, None, None, None, None


def separable_roi_align_backward(grad_output: Tensor, rois: Tensor, input_shape, spatial_scale: float,
                                 pooled_height: int, pooled_width: int, sampling_ratio: int, aligned: bool,
                                 rois_per_image: int | None = None) -> Tensor:
    """Σ_r W_y[r]ᵀ · grad_output[r, c] · W_x[r] per image, for all channels (module doc)."""
    n_images, channels, height, width = input_shape
    grad_input = grad_output.new_zeros(input_shape)
    k = rois.shape[0]
    if k == 0:
        return grad_input
    rois = rois.to(grad_output.dtype)
    if (height, pooled_height) == (width, pooled_width):   # both axes in one pass
        wy, wx = axis_weights(rois[:, [2, 1]].T, rois[:, [4, 3]].T, height, pooled_height, spatial_scale,
                              sampling_ratio, aligned)
    else:
        wy = axis_weights(rois[:, 2], rois[:, 4], height, pooled_height, spatial_scale, sampling_ratio, aligned)
        wx = axis_weights(rois[:, 1], rois[:, 3], width, pooled_width, spatial_scale, sampling_ratio, aligned)
    # Group the ROIs by image: slot s of image n holds its s-th ROI (table value k: an all-zero row).
    image = rois[:, 0].long()
    order = torch.argsort(image, stable=True)
    ranked = image[order]
    slot = torch.arange(k, device=rois.device) - torch.searchsorted(ranked, ranked)
    per_image = rois_per_image if rois_per_image is not None else int(slot.max()) + 1   # else a host sync
    table = torch.full((n_images * per_image,), k, dtype=torch.long, device=rois.device)
    table = table.index_copy(0, ranked * per_image + slot, order).view(n_images, per_image)
    wy = torch.cat([wy, wy.new_zeros(1, pooled_height, height)])[table]          # N×R×PH×H
    wy_t = wy.reshape(n_images, per_image * pooled_height, height).transpose(1, 2)
    grad_output = grad_output.contiguous()
    itemsize = grad_output.element_size()
    chunk = max(1, BACKWARD_CHUNK_BYTES // max(1, 2 * (k + n_images * per_image) * pooled_height * width * itemsize))
    for c0 in range(0, channels, chunk):
        cc = min(chunk, channels - c0)
        g = grad_output[:, c0:c0 + cc].reshape(k, cc * pooled_height, pooled_width)
        t = torch.bmm(g, wx)                                      # K×(Cc·PH)×W
        t = t.view(k, cc, pooled_height, width).transpose(1, 2).reshape(k, pooled_height, cc * width)
        t = torch.cat([t, t.new_zeros(1, pooled_height, cc * width)])[table]       # N×R×PH×(Cc·W)
        out = torch.bmm(wy_t, t.view(n_images, per_image * pooled_height, cc * width))   # N×H×(Cc·W)
        grad_input[:, c0:c0 + cc] = out.view(n_images, height, cc, width).transpose(1, 2)
    return grad_input


class RoutedRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (same arguments, levels, outputs) with two changes: the
    ROIs go to their FPN levels with one host sync for all levels (torchvision: a ``nonzero`` per
    level and an ``index_put`` per level), and each level is pooled by :func:`roi_align` above, so
    its backward is deterministic on accelerators. ``forward`` takes torchvision's per-image box
    lists or one K×5 ROI tensor."""

    @classmethod
    def replacing(cls, pool: MultiScaleRoIAlign) -> "RoutedRoIAlign":
        return cls(pool.featmap_names, pool.output_size, pool.sampling_ratio,
                   canonical_scale=pool.canonical_scale, canonical_level=pool.canonical_level)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor] | Tensor, image_shapes: list[tuple[int, int]]) -> Tensor:
        feats = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(feats, image_shapes, self.canonical_scale, self.canonical_level)
        rois = boxes if isinstance(boxes, Tensor) else _convert_to_roi_format(boxes)
        return self.pool(feats, rois)

    def pool(self, feats: list[Tensor], rois: Tensor) -> Tensor:
        n_images = feats[0].shape[0]
        if len(feats) == 1:
            return roi_align(feats[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        levels = self.map_levels([rois[:, 1:]])
        order = torch.argsort(levels, stable=True)   # ascending ROI index within a level, as torchvision
        counts = torch.bincount(levels * n_images + rois[:, 0].long(), minlength=len(feats) * n_images)
        counts = counts.view(len(feats), n_images).tolist()   # the one host sync: ROIs per level and image
        pooled = []
        for feat, scale, idx, per_image in zip(feats, self.scales, order.split([sum(c) for c in counts]),
                                               (max(c) for c in counts)):
            if len(idx):
                pooled.append(roi_align(feat, rois[idx], self.output_size, scale, self.sampling_ratio,
                                        rois_per_image=per_image).to(feats[0].dtype))
        pooled = torch.cat(pooled) if pooled else feats[0].new_zeros((0, feats[0].shape[1], *self.output_size))
        return pooled.new_empty(pooled.shape).index_copy(0, order, pooled)
