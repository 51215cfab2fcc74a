"""Runtime settings: strict determinism that fails a job at start on an op without a
deterministic kernel, and precision settings (TF32, bf16 autocast, channels-last, conv-BN folding)
that keep each family's loss what it is."""

import copy

import pytest
import torch
from torch import nn

from icm.detectors.base import Detector, total
from icm.maa.stage import MAAStage
from icm.runtime import NondeterministicOpError, Precision, configure
from icm.zoo import build_detector
from icm.zoo.registry import register

CLASSES = ["circle", "square", "triangle"]
SIZE = 64


def _targets():
    return [{"boxes": torch.tensor([[8.0, 10.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
            {"boxes": torch.tensor([[20.0, 12.0, 60.0, 56.0], [4.0, 4.0, 24.0, 22.0]]), "labels": torch.tensor([0, 2])}]


def _loss_and_grad(det, x):
    x = x.clone().requires_grad_(True)
    terms = det.loss(x, det.prepare_targets(_targets(), (SIZE, SIZE)))
    total(terms).backward()
    return terms, x.grad


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


def test_configure_is_strict_and_full_float32_by_default():
    try:
        configure(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.utils.deterministic.fill_uninitialized_memory
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        configure(True, Precision(tf32=True))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        configure(True)


def test_precision_config_is_checked():
    assert Precision.from_config(None) == Precision()
    assert Precision.from_config({"autocast": False}) == Precision()        # YAML's `off`
    assert Precision.from_config({"autocast": "bfloat16", "fold_bn": True}).autocast_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown key.*'tf16'"):
        Precision.from_config({"tf16": True})
    with pytest.raises(ValueError, match="float16.*not one of"):
        Precision.from_config({"autocast": "float16"})
    with pytest.raises(ValueError, match="channels_last.*not true or false"):
        Precision.from_config({"channels_last": "yes"})


@pytest.mark.parametrize("name", ["yolov8n", "centernet_resnet18_skip", "fasterrcnn_mobilenet_v3_large_fpn"])
def test_conv_bn_folding_and_channels_last_keep_loss_and_gradient(name, images):
    det = build_detector(name, CLASSES, weights="random:1", image_size=SIZE).freeze()
    gen = torch.Generator().manual_seed(0)
    for m in det.modules():   # fresh BatchNorms are identities: give them statistics to fold
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
    ref_terms, ref_grad = _loss_and_grad(det, images)
    folded = copy.deepcopy(det).apply_precision(Precision(fold_bn=True, channels_last=True))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert next(m for m in folded.modules() if isinstance(m, nn.Conv2d)).weight.is_contiguous(
        memory_format=torch.channels_last)
    terms, grad = _loss_and_grad(folded, images)
    torch.testing.assert_close(total(terms), total(ref_terms), rtol=1e-4, atol=1e-5)
    assert (grad - ref_grad).norm() <= 1e-3 * ref_grad.norm()


@pytest.mark.parametrize("name", ["yolov8n", "centernet_resnet18"])
def test_bf16_autocast_runs_the_network_in_bf16_and_returns_float32_losses(name, images):
    det = build_detector(name, CLASSES, weights="random:1", image_size=SIZE).freeze()
    ref_terms, ref_grad = _loss_and_grad(det, images)
    det.apply_precision(Precision(autocast="bfloat16"))
    conv_dtypes = []
    first_conv = next(m for m in det.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_hook(lambda _m, _a, out: conv_dtypes.append(out.dtype))
    terms, grad = _loss_and_grad(det, images)
    assert conv_dtypes == [torch.bfloat16]                   # the network did run in bf16
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
    torch.testing.assert_close(total(terms), total(ref_terms), rtol=0.05, atol=0.0)
    assert (grad.sign() == ref_grad.sign()).float().mean() >= 0.8


def test_autocast_is_refused_where_a_family_cannot_keep_its_loss_in_float32():
    det = build_detector("fasterrcnn_mobilenet_v3_large_fpn", CLASSES, weights="random:1", image_size=SIZE).freeze()
    if det.supports_autocast:
        pytest.skip("this family runs its network under autocast")
    with pytest.raises(ValueError, match="precision.autocast.*does not run its network under autocast"):
        det.apply_precision(Precision(autocast="bfloat16"))


class _NondeterministicBackward(torch.autograd.Function):
    """A stand-in for an op whose backward has no deterministic kernel (as
    ``upsample_bilinear2d_backward`` on CUDA): it raises torch's own alert."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        from torch._prims_common import alert_not_deterministic

        alert_not_deterministic("stand_in_backward")
        return grad


class _StandInDetector(Detector):
    family = "stand-in"

    def __init__(self, classes):
        super().__init__(classes)
        self.conv = nn.Conv2d(3, 1, 3)
        self.icm_provenance = {"name": "stand-in-nondeterministic", "family": self.family}

    def loss(self, images, targets):
        return {"l": self.conv(_NondeterministicBackward.apply(images)).square().mean() * len(targets)}


register("detector", "stand-in-nondeterministic")(lambda name, classes, **_: _StandInDetector(classes))


def test_an_op_without_a_deterministic_kernel_fails_the_stage_at_start(tmp_path):
    params = {"method": "aafg", "canvas": 32, "steps": 1, "device": "cpu", "seed": 0,
              "detectors": [{"label": "odd", "name": "stand-in-nondeterministic"}]}
    with pytest.raises(NondeterministicOpError) as caught:
        MAAStage(str(tmp_path / "a"), params, CLASSES)
    message = str(caught.value)
    assert "\n" not in message
    assert "detector 'odd': stand_in_backward has no deterministic kernel" in message
    assert "deterministic: false" in message
    stage = MAAStage(str(tmp_path / "b"), {**params, "deterministic": False}, CLASSES)   # the fix named works
    assert stage.runtime["deterministic"] is False
