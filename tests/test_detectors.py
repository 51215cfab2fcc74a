"""Every detector family: finite non-zero input gradients, seeded sampling, per-image losses,
predictions that go through the COCO evaluator."""

import math

import pytest
import torch

from icm.detectors import total
from icm.metrics import coco_map, detections_to_coco
from icm.zoo import build_detector

CLASSES = ["circle", "square", "triangle"]
FAMILIES = ["fasterrcnn_mobilenet_v3_large_fpn", "maskrcnn_resnet50_fpn", "retinanet_resnet50_fpn",
            "fcos_resnet50_fpn", "yolov8n", "centernet_resnet18", "centernet_resnet18_skip"]
SIZE = 96


def _targets():
    return [{"boxes": [[10.0, 12.0, 50.0, 60.0]], "labels": [1], "seed": 11},
            {"boxes": [[30.0, 20.0, 90.0, 80.0], [5.0, 5.0, 30.0, 28.0]], "labels": [0, 2], "seed": 12}]


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", FAMILIES)
def test_input_gradient_finite_and_nonzero(name, images):
    det = build_detector(name, CLASSES, weights="random:1", image_size=SIZE).freeze()
    x = images.clone().requires_grad_(True)
    terms = det.loss(x, _targets())
    assert terms and all(torch.isfinite(v) for v in terms.values())
    total(terms).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[0].abs().sum() > 0) and (x.grad[1].abs().sum() > 0)
    assert all(p.grad is None for p in det.parameters())  # frozen: no weight gradients


@pytest.mark.parametrize("name", FAMILIES)
def test_per_image_losses_are_summed(name, images):
    """Batch loss = sum of single-image losses, so one image never depends on its neighbours."""
    det = build_detector(name, CLASSES, weights="random:1", image_size=SIZE).freeze()
    tg = _targets()
    batch = total(det.loss(images, tg))
    alone = total(det.loss(images[:1], tg[:1])) + total(det.loss(images[1:], tg[1:]))
    torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-4)


def _loss_and_grad(det, x, targets, batched):
    det.batched = batched
    x = x.clone().requires_grad_(True)
    loss = total(det.loss(x, targets))
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_loss_is_each_images_own_loss(name, images):
    """One forward over the batch, each image's loss from its own slice: image by image it is
    the per-image reference to float rounding (the batched torchvision losses weight masked
    elements where torchvision gathers them, and CPU vector kernels round a transcendental's last
    bit by the element's lane); over a batch of 4 it differs only by the backbone's float
    reductions at another batch size (TRAPS.md), far below anything a sign step sees."""
    det = build_detector(name, CLASSES, weights="random:1", image_size=SIZE).freeze()
    x = torch.cat([images, images.flip(-1)])
    tg = [dict(t, seed=100 + i) for i, t in enumerate(_targets() * 2)]
    if det.prepare_targets(tg, (SIZE, SIZE)) is not tg:
        tg = det.prepare_targets(tg, (SIZE, SIZE))      # targets built once, as the MAA stage does
    ref_loss, ref_grad = _loss_and_grad(det, x, tg, batched=False)
    for i in range(4):
        loss, grad = _loss_and_grad(det, x[i:i + 1], tg[i:i + 1], batched=True)
        alone_loss, alone = _loss_and_grad(det, x[i:i + 1], tg[i:i + 1], batched=False)
        torch.testing.assert_close(loss, alone_loss, rtol=1e-6, atol=1e-6)
        assert (grad - alone).abs().max() <= 1e-5 * alone.abs().max()
    loss, grad = _loss_and_grad(det, x, tg, batched=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert (grad - ref_grad).norm() <= 1e-2 * ref_grad.norm()
    assert (grad.sign() == ref_grad.sign()).float().mean() >= 0.995


@pytest.mark.parametrize("name", ["yolov8n", "centernet_resnet18"])
def test_loss_step_is_sync_free_and_its_ops_do_not_grow_with_the_batch(name):
    """One MAA step (loss + input gradient, targets prepared once per unit) makes no host sync,
    and dispatches at batch 16 at most 1.2× the ops of batch 1 (issue 22: one criterion call per
    batch). Object counts differ per image, one image has none."""
    from icm.dispatch import DispatchCounter
    from icm.maa.methods import Member, gradient

    det = build_detector(name, CLASSES, weights="random:1", image_size=64).freeze()
    counts = {}
    for batch in (1, 16):
        targets = [{"boxes": torch.tensor([[4.0 + i, 6.0, 30.0 + i, 40.0], [20.0, 10.0, 60.0, 50.0 - i]][:i % 3]),
                    "labels": torch.tensor([1, 2][:i % 3])} for i in range(1, batch + 1)]
        member = Member("d", det, det.prepare_targets(targets, (64, 64)), list(range(batch)))
        x = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        gradient(lambda a: member.loss(a, 0), x)
        with DispatchCounter() as counts[batch]:
            grad = gradient(lambda a: member.loss(a, 1), x)
        assert torch.isfinite(grad).all() and (grad.flatten(1).abs().sum(1) > 0).all()
    assert counts[1].syncs == counts[16].syncs == 0, (counts[1].sync_ops, counts[16].sync_ops)
    assert counts[16].ops <= 1.2 * counts[1].ops, (counts[1].ops, counts[16].ops)


def test_faster_rcnn_sampling_is_seeded(images):
    det = build_detector("fasterrcnn_mobilenet_v3_large_fpn", CLASSES, weights="random:1",
                         image_size=SIZE).freeze()
    gen = torch.Generator().manual_seed(0)
    for p in det.model.parameters():  # a fresh init predicts constants: make the heads care
        p.data += 0.05 * torch.randn(p.shape, generator=gen)
    a = det.loss(images, _targets())
    torch.manual_seed(123)  # the global RNG must not matter
    b = det.loss(images, _targets())
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = [dict(t, seed=t["seed"] + 100) for t in _targets()]
    c = det.loss(images, other)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", FAMILIES)
def test_predictions_round_trip_through_coco(name, images):
    """Each family's predictions are xyxy pixel boxes of the input with contiguous labels: taken
    as the ground truth (written in COCO's xywh by hand), they score mAP 1 through
    ``detections_to_coco`` and pycocotools; without the higher-scored half of them, the rest
    are false positives ranked first, and the AP falls."""
    det = build_detector(name, CLASSES, weights="random:1", image_size=SIZE).freeze()
    for part in (getattr(det, "model", None), getattr(getattr(det, "model", None), "roi_heads", None)):
        if hasattr(part, "score_thresh"):  # torchvision's own floor (0.05) drops every box of a fresh init
            part.score_thresh = 0.0
    if name.startswith("centernet"):        # a fresh size head predicts sizes ≤ 0: boxes with no area
        torch.nn.init.constant_(det.size[-1].bias, 3.0)
    preds = det.predict(images, score_threshold=0.0)
    assert len(preds) == 2
    annotations = []
    for i, p in enumerate(preds):
        boxes, scores, labels = p["boxes"], p["scores"], p["labels"]
        assert boxes.dtype == torch.float32 and boxes.shape[-1] == 4 and len(boxes) == len(scores) == len(labels)
        assert len(boxes) > 0 and labels.dtype == torch.int64
        assert ((labels >= 0) & (labels < len(CLASSES))).all() and ((scores >= 0) & (scores <= 1)).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        keep = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)   # IoU needs an area
        keep &= torch.arange(len(boxes)) < 50                                         # within maxDets
        p.update(boxes=boxes[keep], scores=scores[keep], labels=labels[keep])
        for (x1, y1, x2, y2), lab in zip(p["boxes"].tolist(), p["labels"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": lab + 1, "iscrowd": 0,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
    assert len(annotations) >= 10
    gt = {"images": [{"id": i + 1, "width": SIZE, "height": SIZE} for i in range(2)], "annotations": annotations,
          "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    assert coco_map(gt, detections_to_coco(preds))["map"] == pytest.approx(1.0)
    half = {**gt, "annotations": [a for a in annotations if a["id"] % 2 == 0]}
    assert coco_map(half, detections_to_coco(preds))["map50"] < 1.0
    as_predictions = [{"boxes": torch.tensor(t["boxes"]), "scores": torch.ones(len(t["labels"])),
                       "labels": torch.tensor(t["labels"])} for t in _targets()]
    targets = [(i, b, lab) for i, t in enumerate(_targets()) for b, lab in zip(t["boxes"], t["labels"])]
    targets_gt = {**gt, "annotations": [
        {"id": k + 1, "image_id": i + 1, "category_id": lab + 1, "iscrowd": 0,
         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])}
        for k, (i, b, lab) in enumerate(targets)]}
    assert coco_map(targets_gt, detections_to_coco(as_predictions))["map"] == pytest.approx(1.0)


def test_training_mode_updates_norm_statistics(images):
    det = build_detector("centernet_resnet18", CLASSES, weights="random:1")
    det.train()
    bn = next(m for m in det.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    total(det.loss(images, _targets())).backward()
    assert not torch.equal(before, bn.running_mean)
    assert any(p.grad is not None for p in det.parameters())


def test_centernet_skip_variant_uses_the_shallow_stages_and_plain_keeps_its_layout(images):
    plain = build_detector("centernet_resnet18", CLASSES, weights="random:1", image_size=SIZE)
    assert not any(k.startswith("laterals.") for k in plain.state_dict())
    assert {"upsample.0.weight", "upsample.3.weight", "upsample.6.weight"} <= set(plain.state_dict())
    skip = build_detector("centernet_resnet18_skip", CLASSES, weights="random:1", image_size=SIZE).eval()
    # Scaling the layer1 lateral (its BatchNorm) changes the stride-4 features: the skip path,
    # not only the stride-32 one, reaches the heads.
    feats = skip.features(images)[0]
    with torch.no_grad():
        skip.laterals[2][1].weight.mul_(3.0)  # the layer1 lateral's BatchNorm scale
    assert not torch.allclose(feats, skip.features(images)[0])
    assert feats.shape[-1] == SIZE // 4


def test_detectron2_absent_gives_build_advice():
    from icm.detectors.detectron2_backend import detectron2_available

    if detectron2_available():
        pytest.skip("detectron2 is installed here")
    with pytest.raises(ImportError, match="build it from source"):
        build_detector("detectron2:COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml", CLASSES)


# -- torchvision families: batched sync-free losses, device-side seeded sampling, deterministic RoIAlign

# ops at batch 16 at most this many times the ops at batch 1 (issue 22), and the host syncs of a step
TV_STEP_BOUNDS = {"fasterrcnn_mobilenet_v3_large_fpn": (1.5, {"bincount": 1}),
                  "maskrcnn_resnet50_fpn": (1.5, {"bincount": 2, "nonzero": 1}),
                  "retinanet_resnet50_fpn": (1.2, {}), "fcos_resnet50_fpn": (1.2, {})}


@pytest.mark.parametrize("name", sorted(TV_STEP_BOUNDS))
def test_torchvision_step_ops_and_syncs_do_not_grow_with_the_batch(name):
    """One loss + input-gradient step (canvas 128, random weights, two boxes per image): batch 16
    dispatches about as many ops as batch 1 and the same few host syncs — Faster R-CNN one (the
    ROI levels), Mask R-CNN one more for its positive ROIs and one for their levels; NMS syncs
    inside torchvision's op, unseen here."""
    from icm.dispatch import DispatchCounter

    ratio, syncs = TV_STEP_BOUNDS[name]
    det = build_detector(name, CLASSES, weights="random:1", image_size=128).freeze()

    def step(b):
        x = torch.rand(b, 3, 128, 128, generator=torch.Generator().manual_seed(b), requires_grad=True)
        tg = det.prepare_targets([{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 40.0, 120.0, 110.0]]),
                                   "labels": torch.tensor([0, 2]), "seed": i} for i in range(b)], (128, 128))
        with DispatchCounter() as count:
            total(det.loss(x, tg)).backward()
        return count
    step(1)   # first call: the ROI pooler works out its scales once
    one, sixteen = step(1), step(16)
    assert dict(one.sync_ops) == dict(sixteen.sync_ops) == syncs
    assert sixteen.ops <= ratio * one.ops, (one.ops, sixteen.ops)


def test_hashed_sampler_follows_torchvisions_rule_and_each_images_seed_alone():
    from icm.detectors.tv import HashedSampler

    sampler = HashedSampler(batch_size_per_image=8, positive_fraction=0.25, salt=1)
    labels = torch.randint(-1, 2, (3, 60), generator=torch.Generator().manual_seed(0))   # 1 pos, 0 neg, -1 ignored
    labels[2, 2:] = -1
    labels[2, :2] = torch.tensor([1, 0])          # an image with one candidate of each kind
    seeds = torch.tensor([5, 6, 7])
    pos, neg = sampler.masks(labels, seeds)
    for i in range(3):
        n_pos, n_neg = int((labels[i] == 1).sum()), int((labels[i] == 0).sum())
        assert int(pos[i].sum()) == min(2, n_pos) and int(neg[i].sum()) == min(8 - int(pos[i].sum()), n_neg)
        assert (labels[i][pos[i]] == 1).all() and (labels[i][neg[i]] == 0).all()
    # an image's draw is its seed's alone: reordered, alone, beside other images
    order = [2, 0, 1]
    assert all(torch.equal(a, b[order]) for a, b in zip(sampler.masks(labels[order], seeds[order]), (pos, neg)))
    assert all(torch.equal(a, b[1:2]) for a, b in zip(sampler.masks(labels[1:2], seeds[1:2]), (pos, neg)))
    # consecutive seeds (as MAA's steps give) draw every positive about equally often
    draws = torch.stack([sampler.masks(labels[:1], torch.tensor([s]))[0][0] for s in range(400)]).float()
    candidates = labels[0] == 1
    assert ((draws.mean(0)[candidates] - 2 / candidates.sum()).abs() < 0.07).all()
    assert not draws[:, ~candidates].any()
    pairs = math.comb(int(candidates.sum()), 2)        # distinct draws as many as uniform pairs would give
    assert len({tuple(d.nonzero().flatten().tolist()) for d in draws}) >= 0.9 * pairs * (1 - (1 - 1 / pairs) ** 400)
    # torchvision's interface (per-image label vectors → uint8 masks) gives the same draws
    sampler.seeds = [5, 6, 7]
    listed = sampler([labels[0], labels[1, :50], labels[2]])
    assert torch.equal(listed[0][0].bool(), pos[0]) and torch.equal(listed[1][2].bool(), neg[2])


def test_box_masks_fill_each_rounded_box():
    from icm.detectors.tv import _box_masks

    masks = _box_masks(torch.tensor([[1.2, 0.6, 3.4, 2.4], [-3.0, 2.0, -1.0, 2.2]]), 4, 5)
    expected = torch.zeros(2, 4, 5, dtype=torch.uint8)
    expected[0, 1:2, 1:3] = 1        # x 1..3, y 1..2 after rounding; the second box lies left of the image
    assert torch.equal(masks, expected)


def _roi_case(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 11, dtype=dtype, generator=gen)
    boxes = torch.tensor([[1.0, 1.0, 9.0, 7.0], [-6.0, -4.0, 30.0, 25.0], [4.2, 3.1, 4.4, 3.3],
                          [14.0, 12.0, 40.0, 40.0], [-9.0, 3.0, -1.0, 9.0], [0.0, 0.0, 22.0, 18.0]], dtype=dtype)
    rois = torch.cat([torch.tensor([[0.0], [1.0], [0.0], [1.0], [0.0], [0.0]], dtype=dtype), boxes], 1)
    return x, rois


@pytest.mark.parametrize("aligned,sampling_ratio", [(False, -1), (False, 2), (True, -1), (True, 3)])
def test_separable_roi_align_backward_is_torchvisions_gradient(aligned, sampling_ratio):
    """ROIs inside, across the borders, beyond them and tiny: the separable backward is the exact
    adjoint of torchvision's forward (gradcheck), equals torchvision's own backward, and is bitwise
    repeatable."""
    import torchvision

    from icm.detectors.roi_align import roi_align

    x, rois = _roi_case(torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: roi_align(t, rois, (3, 4), 0.5, sampling_ratio, aligned, separable=True), (x,), fast_mode=True)
    for dtype in (torch.float64, torch.float32):
        x, rois = _roi_case(dtype)
        x.requires_grad_(True)
        g = torch.randn(len(rois), 3, 3, 4, dtype=dtype, generator=torch.Generator().manual_seed(1))
        (theirs,) = torch.autograd.grad((torchvision.ops.roi_align(x, rois, (3, 4), 0.5, sampling_ratio, aligned) * g).sum(), x)
        ours = [torch.autograd.grad((roi_align(x, rois, (3, 4), 0.5, sampling_ratio, aligned, separable=True) * g).sum(), x)[0]
                for _ in range(2)]
        torch.testing.assert_close(ours[0], theirs)
        assert torch.equal(ours[0], ours[1])


def test_faster_rcnn_step_avoids_ops_without_deterministic_cuda_kernels(monkeypatch, images):
    """At the canvas size nothing is resized (no bilinear-upsampling backward), MobileNetV3's
    squeeze-excitation pools are means (no adaptive-average-pool backward), and with the
    separable RoIAlign backward switched on (as on an accelerator with deterministic algorithms)
    torchvision's atomic RoIAlign backward never runs — with the same input gradient."""
    from icm.detectors import roi_align
    from icm.dispatch import DispatchCounter

    det = build_detector("fasterrcnn_mobilenet_v3_large_fpn", CLASSES, weights="random:1", image_size=SIZE).freeze()
    gen = torch.Generator().manual_seed(0)
    for p in det.model.parameters():  # a fresh init predicts constants: make the heads care
        p.data += 0.05 * torch.randn(p.shape, generator=gen)
    tg = det.prepare_targets(_targets(), (SIZE, SIZE))
    expected = _loss_and_grad(det, images, tg, batched=True)[1]
    monkeypatch.setattr(roi_align, "separable_backward_wanted", lambda input: True)
    with DispatchCounter() as count:
        _, grad = _loss_and_grad(det, images, tg, batched=True)
    assert not {"upsample_bilinear2d_backward", "_adaptive_avg_pool2d_backward", "_roi_align_backward"} & set(count.by_op)
    assert count.by_op["roi_align"] > 0
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_torchvision_targets_prepared_apart_give_the_same_loss(images):
    """Targets from two prepare_targets calls (different object counts, so different padding) in
    one batch: the same loss as targets prepared together."""
    det = build_detector("fasterrcnn_mobilenet_v3_large_fpn", CLASSES, weights="random:1", image_size=SIZE).freeze()
    tg = _targets()
    together = det.loss(images, det.prepare_targets(tg, (SIZE, SIZE)))
    apart = det.loss(images, det.prepare_targets(tg[:1], (SIZE, SIZE)) + det.prepare_targets(tg[1:], (SIZE, SIZE)))
    assert together.keys() == apart.keys()
    for key in together:
        torch.testing.assert_close(apart[key], together[key])
