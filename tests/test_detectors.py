"""Every detector family: finite non-zero input gradients, seeded sampling, per-image losses,
predictions that go through the COCO evaluator."""

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
    exactly the per-image reference; over a batch of 4 it differs only by the backbone's float
    reductions at another batch size (TRAPS.md), far below anything a sign step sees."""
    det = build_detector(name, CLASSES, weights="random:1", image_size=SIZE).freeze()
    x = torch.cat([images, images.flip(-1)])
    tg = [dict(t, seed=100 + i) for i, t in enumerate(_targets() * 2)]
    if det.prepare_targets(tg, (SIZE, SIZE)) is not tg:
        tg = det.prepare_targets(tg, (SIZE, SIZE))      # targets built once, as the MAA stage does
    ref_loss, ref_grad = _loss_and_grad(det, x, tg, batched=False)
    for i in range(4):
        loss, grad = _loss_and_grad(det, x[i:i + 1], tg[i:i + 1], batched=True)
        _, alone = _loss_and_grad(det, x[i:i + 1], tg[i:i + 1], batched=False)
        assert torch.equal(grad, alone)
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
