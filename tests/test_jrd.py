"""OW-JRD: distortion ladders, the labelling rule, JRD and error tolerance, the label stage on a
case with a known answer, and the Ray pipeline with export, resume and bad input."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from icm.data import comparable
from icm.detectors.base import Detector
from icm.jrd.export import export_authors_layout, load_split, read_table
from icm.jrd.labelling import (error_tolerant_jrd, first_unrecognised, is_monotonic, jrd, match_objects,
                               not_recognised_labels)
from icm.jrd.ladders import build_ladder
from icm.jrd.stage import LEVEL_SCHEMA, OBJECT_SCHEMA, LabelStage, LadderStage, label_categories
from icm.metrics import psnr

CLASSES = ["circle", "square", "triangle", "cross"]


@pytest.fixture(scope="module")
def photo():
    return np.ascontiguousarray(skdata.astronaut()[::4, ::4][:127, :125])  # odd sides on purpose


@pytest.mark.parametrize("spec", [{"type": "jpeg"}, {"type": "webp", "levels": 32}])
def test_pillow_ladders_non_increasing_bytes(photo, spec):
    coded = build_ladder(spec).code_all(photo)
    sizes = [c.num_bytes for c in coded]
    assert len(sizes) == spec.get("levels", 64)
    assert all(a >= b for a, b in zip(sizes, sizes[1:])), sizes
    assert sizes[-1] * 8 < sizes[0]
    assert all(c.decoded.shape == photo.shape and c.decoded.dtype == np.uint8 for c in coded)


def test_jpeg_tables_for_any_quality_are_libjpegs(photo):
    from icm.jrd.ladders import jpeg_tables

    # integer qualities whose libjpeg scale (5000 / q below 50, 200 − 2q above) is exact: the
    # tables equal those Pillow's own encoder writes
    for quality in (1, 2, 4, 5, 10, 20, 25, 40, 50, 60, 75, 90, 100):
        buf = __import__("io").BytesIO()
        Image.fromarray(photo).save(buf, format="JPEG", quality=quality)
        written = Image.open(buf).quantization
        assert jpeg_tables(quality) == [list(written[0]), list(written[1])], quality
    # the luma DC entry (16 in Annex K) at q 1.5: 16 × 5000/1.5 % = 533 → baseline-clipped 255;
    # at q 30.5: (16 × 163.93 + 50) // 100 = 26
    assert jpeg_tables(1.5)[0][0] == 255 and jpeg_tables(30.5)[0][0] == 26


def test_jpeg_ladder_spaced_in_libjpegs_scale(photo):
    ladder = build_ladder({"type": "jpeg", "levels": 16, "quality_range": [60, 1], "spacing": "scale"})
    qualities = [lv["quality"] for lv in ladder.levels]
    # from q 60 (scale 80 %) to where every table entry is clipped to 255: the smallest Annex K
    # entry, 10, reaches it at scale (25500 − 50) / 10 % = q 5000 / 2545 ≈ 1.9646
    assert qualities[0] == 60 and qualities[-1] == pytest.approx(1.9646, abs=1e-4)
    scales = [5000 / q if q < 50 else 200 - 2 * q for q in qualities]       # geometric: a constant ratio
    assert np.allclose(np.diff(np.log(scales)), np.log(2545 / 80) / 15, rtol=1e-3)
    coded = ladder.code_all(photo)
    sizes = [c.num_bytes for c in coded]
    assert all(a >= b for a, b in zip(sizes, sizes[1:])), sizes
    assert len({c.decoded.tobytes() for c in coded}) == 16
    plain = build_ladder({"type": "jpeg", "qualities": [60, 1]})              # integer ends: Pillow's quality
    assert [c.num_bytes for c in plain.code_all(photo)] == [sizes[0], sizes[-1]]


def test_hevc_ladder_round_trips_and_falls_in_bytes(photo):
    ladder = build_ladder({"type": "hevc"})
    assert [lv["qp"] for lv in ladder.levels] == list(range(52))
    coded = ladder.code_all(photo)
    sizes = np.array([c.num_bytes for c in coded])
    # x265 spends a few more bytes at QP 1-3 than at QP 0 (its rate control floor); elsewhere the
    # ladder is non-increasing
    assert np.all(np.diff(sizes) <= 0.01 * sizes[:-1]), sizes
    assert sizes[-1] * 5 < sizes[0]
    x = lambda im: torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255  # noqa: E731
    assert all(c.decoded.shape == photo.shape for c in coded)
    assert psnr(x(coded[0].decoded), x(photo)) > 30      # QP 0 in 4:2:0: the chroma subsampling remains
    assert psnr(x(coded[-1].decoded), x(photo)) < psnr(x(coded[26].decoded), x(photo))


class _Bits:
    """An H.265 RBSP bit reader (emulation-prevention bytes removed)."""

    def __init__(self, payload: bytes):
        self.data = payload.replace(b"\x00\x00\x03", b"\x00\x00")
        self.pos = 0

    def u(self, n):
        value = 0
        for _ in range(n):
            value = (value << 1) | ((self.data[self.pos // 8] >> (7 - self.pos % 8)) & 1)
            self.pos += 1
        return value

    def ue(self):
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self):
        k = self.ue()
        return (k + 1) // 2 if k % 2 else -(k // 2)


def _hevc_nals(stream: bytes) -> list[tuple[int, bytes]]:
    """(nal_unit_type, payload after the 2-byte header) of every NAL unit of an Annex-B stream."""
    starts = [i for i in range(len(stream) - 3) if stream[i:i + 3] == b"\x00\x00\x01"]
    nals = []
    for k, i in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(stream)
        nal = stream[i + 3:end].rstrip(b"\x00")
        nals.append(((nal[0] >> 1) & 0x3F, nal[2:]))
    return nals


def _hevc_slice_qp_and_chroma(stream: bytes) -> tuple[int, int]:
    """SliceQpY of the first slice of a one-picture HEVC stream (H.265 §7.3.2.2, §7.3.2.3, §7.3.6)."""
    nals = dict(_hevc_nals(stream)[::-1])          # first NAL of each type wins
    sps = _Bits(nals[33])
    sps.u(4)
    max_sub_layers = sps.u(3)
    sps.u(1)
    assert max_sub_layers == 0
    sps.u(96)                                      # general profile_tier_level
    sps.ue()
    chroma = sps.ue()
    separate_planes = sps.u(1) if chroma == 3 else 0
    sps.ue(), sps.ue()
    if sps.u(1):
        [sps.ue() for _ in range(4)]
    sps.ue(), sps.ue(), sps.ue()
    sps.u(1)
    sps.ue(), sps.ue(), sps.ue()
    [sps.ue() for _ in range(6)]
    assert sps.u(1) == 0                           # no scaling lists
    sps.u(1)
    sao = sps.u(1)
    pps = _Bits(nals[34])
    pps.ue(), pps.ue(), pps.u(1)
    output_flag, extra_bits = pps.u(1), pps.u(3)
    pps.u(1), pps.u(1), pps.ue(), pps.ue()
    init_qp = 26 + pps.se()
    idr = next(t for t in nals if t in (19, 20))
    sl = _Bits(nals[idr])
    assert sl.u(1) == 1                            # first slice segment
    sl.u(1)
    sl.ue()
    sl.u(extra_bits)
    assert sl.ue() == 2                            # I slice
    if output_flag:
        sl.u(1)
    if separate_planes:
        sl.u(2)
    if sao:
        sl.u(1)
        if chroma and not separate_planes:
            sl.u(1)
    return init_qp + sl.se(), chroma


@pytest.mark.parametrize("chroma", ["420", "444"])
def test_hevc_bytes_are_the_picture_and_the_slice_qp_is_the_level(photo, chroma):
    ladder = build_ladder({"type": "hevc", "qps": [0, 1, 2, 3, 22, 51], "chroma": chroma})
    decoded = []
    for level, params in enumerate(ladder.levels):
        stream = ladder.bitstream(photo, level)
        assert params == {"qp": params["qp"], "chroma": chroma}
        types = [t for t, _ in _hevc_nals(stream)]
        assert 39 not in types and 40 not in types, types       # no SEI (x265's info SEI is ~2.3 KB)
        assert _hevc_slice_qp_and_chroma(stream) == (params["qp"], 1 if chroma == "420" else 3)
        coded = ladder.code(photo, level)
        assert coded.num_bytes == len(stream)
        decoded.append(coded.decoded)
    # QP 0..3 are four different pictures now (with x265's I-slice offset they decoded identically)
    assert all(not np.array_equal(decoded[i], decoded[i + 1]) for i in range(3))


def _fake_vvc(bin_dir, rec_bytes):
    """vvencapp/vvdecapp stand-ins: each logs its arguments, the decoder writes ``rec_bytes``."""
    bin_dir.mkdir()
    (bin_dir / "vvencapp").write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\n'
                                      'while [ "$1" != "-o" ]; do shift; done; printf bits > "$2"\n')
    (bin_dir / "vvdecapp").write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/dec_args"\n'
                                      'while [ "$1" != "-o" ]; do shift; done\n'
                                      f'head -c {rec_bytes} /dev/zero > "$2"\n')
    for b in ("vvencapp", "vvdecapp"):
        (bin_dir / b).chmod(0o755)


def test_vvc_fixed_qp_without_adaptation_and_reconstruction_size_checked(tmp_path, monkeypatch):
    image = np.zeros((6, 10, 3), np.uint8)
    _fake_vvc(tmp_path / "ok", 6 * 10 * 3 // 2)
    monkeypatch.setenv("PATH", f"{tmp_path / 'ok'}:/usr/bin:/bin")
    coded = build_ladder({"type": "vvc", "qps": [37]}).code(image, 0)
    args = (tmp_path / "ok" / "args").read_text().split()
    assert args[args.index("-q") + 1] == "37" and args[args.index("--qpa") + 1] == "0"
    assert args[args.index("--additional") + 1] == "IntraQPOffset=0"
    assert args[args.index("--internal-bitdepth") + 1] == "8"
    assert "-d" not in (tmp_path / "ok" / "dec_args").read_text().split()     # vvdecapp has no -d
    assert coded.num_bytes == 4 and coded.decoded.shape == image.shape
    _fake_vvc(tmp_path / "short", 50)
    monkeypatch.setenv("PATH", f"{tmp_path / 'short'}:/usr/bin:/bin")
    with pytest.raises(RuntimeError, match="50 bytes of reconstruction"):
        build_ladder({"type": "vvc", "qps": [37]}).code(image, 0)


VVC_BINARIES = pytest.mark.skipif(shutil.which("vvencapp") is None or shutil.which("vvdecapp") is None,
                                  reason="vvencapp/vvdecapp not on PATH (../shared/tools/vvc has them)")


def _vvc_headers(stream: bytes) -> dict[str, int]:
    """Every syntax element of a VVC stream's parameter sets and headers (first occurrence), as
    FFmpeg's own H.266 syntax parser reads them (the ``trace_headers`` bitstream filter) — a parser
    independent of vvenc and vvdec."""
    import re

    import av
    import av.logging
    from av.bitstream import BitStreamFilterContext

    level = av.logging.get_level()
    av.logging.set_level(av.logging.INFO)
    try:
        with av.logging.Capture(True) as logs:
            bsf = BitStreamFilterContext("trace_headers", av.Codec("vvc", "r"))
            bsf.filter(av.Packet(stream))
            bsf.filter(None)
    finally:
        av.logging.set_level(level)
    values = {}
    for line in "".join(message for _, _, message in logs).splitlines():
        m = re.match(r"^\d+\s+([A-Za-z_0-9\[\]]+)\s+[01]+ = (-?\d+)$", line.strip())
        if m:
            values.setdefault(m.group(1), int(m.group(2)))
    return values


@VVC_BINARIES
def test_vvc_ladder_against_the_real_binaries(photo):
    ladder = build_ladder({"type": "vvc"})
    assert [lv["qp"] for lv in ladder.levels] == list(range(64))
    coded = ladder.code_all(photo)
    sizes = [c.num_bytes for c in coded]
    assert all(a >= b for a, b in zip(sizes, sizes[1:])), sizes         # bytes never rise with QP
    assert sizes[-1] * 20 < sizes[0]
    assert all(c.decoded.shape == photo.shape and c.decoded.dtype == np.uint8 for c in coded)
    distinct = {c.decoded.tobytes() for c in coded}
    assert len(distinct) == 64                                          # 64 QPs, 64 reconstructions
    x = lambda im: torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255  # noqa: E731
    quality = [psnr(x(c.decoded), x(photo)) for c in coded]
    assert quality[0] > 30 and quality[0] > quality[32] > quality[63]     # QP 0 in 4:2:0: chroma subsampled
    for level in (0, 1, 37, 63):
        stream = ladder.bitstream(photo, level)
        assert len(stream) == sizes[level]
        headers = _vvc_headers(stream)
        slice_qp = 26 + headers["pps_init_qp_minus26"] + headers.get("sh_qp_delta", headers.get("ph_qp_delta", 0))
        assert slice_qp == level and headers["sps_bitdepth_minus8"] == 0, headers


@VVC_BINARIES
def test_vvc_ladder_at_10_bits_reads_16_bit_reconstructions(photo):
    eight, ten = (build_ladder({"type": "vvc", "qps": [22], "internal_bitdepth": d}) for d in (8, 10))
    assert _vvc_headers(ten.bitstream(photo, 0))["sps_bitdepth_minus8"] == 2
    x = lambda im: torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255  # noqa: E731
    a, b = eight.code(photo, 0), ten.code(photo, 0)
    assert b.decoded.shape == photo.shape
    assert abs(psnr(x(a.decoded), x(photo)) - psnr(x(b.decoded), x(photo))) < 1.5   # the same QP scale


def _compressai_reference(model, image, **kwargs):
    """CompressAI's own procedure, written out: pad to a multiple of 64 (symmetric, zeros),
    compress, decompress, crop, clamp, round to 8 bits."""
    import torch.nn.functional as F

    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    h, w = image.shape[:2]
    side = 64 * -(-max(h, w) // 64)
    left, top = (side - w) // 2, (side - h) // 2
    padded = F.pad(x, (left, side - w - left, top, side - h - top))
    with torch.no_grad():
        out = model.compress(padded, **kwargs)
        x_hat = model.decompress(out["strings"], out["shape"], **kwargs)["x_hat"][..., top:top + h, left:left + w]
    size = sum(len(s) for group in out["strings"] for s in group)
    return size, np.clip(np.rint(x_hat[0].permute(1, 2, 0).double().numpy() * 255), 0, 255).astype(np.uint8)


def test_learned_ladders_round_trip(photo):
    """Each level's decode is the bitstream's, as CompressAI itself decodes it with that level's
    model (or gain), and the levels differ. (Random weights: no trained CompressAI weights can be
    had here, so a reconstruction close to the input cannot be asked of these ladders; the
    reference decode is the strongest check random weights allow.)"""
    from icm.zoo import build_codec

    photo = np.ascontiguousarray(photo[:61, :57])   # odd sides, padded to 64 × 64
    fixed = build_ladder({"type": "compressai", "arch": "bmshj2018-factorized", "qualities": [6, 1],
                          "weights": "random"})
    assert [lv["quality"] for lv in fixed.levels] == [6, 1]     # two architectures (random weights: one seed)
    coded = fixed.code_all(photo)
    for level, quality in enumerate((6, 1)):
        model = build_codec("bmshj2018-factorized", quality=quality, weights="random").eval()
        model.update(force=True)
        size, decoded = _compressai_reference(model, photo)
        assert coded[level].num_bytes == size and np.array_equal(coded[level].decoded, decoded)
    assert not np.array_equal(coded[0].decoded, coded[1].decoded)
    vbr = build_ladder({"type": "compressai-vbr", "arch": "bmshj2018-hyperprior-vbr", "levels": 4, "weights": "random"})
    scales = [lv["scale"] for lv in vbr.levels]
    assert len(scales) == 4 and all(a > b for a, b in zip(scales, scales[1:]))
    reference = build_codec("bmshj2018-hyperprior-vbr", weights="random").eval()
    with torch.no_grad():   # a random analysis gives |y| < 0.3, zero at every gain ≤ 1: every level alike
        for model in (vbr.model, reference):
            model.g_a[-1].weight *= 100
    coded = vbr.code_all(photo)
    for level, scale in enumerate(scales):
        scale = torch.tensor(scale)
        with torch.no_grad():
            reference.update(force=True, scale=scale)
        size, decoded = _compressai_reference(reference, photo, inputscale=scale)
        assert coded[level].num_bytes == size and np.array_equal(coded[level].decoded, decoded)
    assert len({c.decoded.tobytes() for c in coded}) == 4
    sizes = [c.num_bytes for c in coded]
    assert all(a >= b for a, b in zip(sizes, sizes[1:])) and sizes[0] > sizes[-1], sizes


def test_vvc_ladder_names_the_missing_binaries(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(FileNotFoundError, match="vvencapp and vvdecapp"):
        build_ladder({"type": "vvc"})
    with pytest.raises(ValueError, match="ladder type 'vp9'"):
        build_ladder({"type": "vp9"})


def test_labelling_rule_edges():
    ref = [[0, 0, 10, 10]]
    # IoU of [0,0,10,10] with [0,0,10,20] is exactly 0.5; with [0,0,10,21] it is below
    m = match_objects(ref, [1], [[0, 0, 10, 20]], [0.5], [1])
    assert m.recognised[0] and m.best_iou[0] == pytest.approx(0.5) and m.score[0] == pytest.approx(0.5)
    assert not match_objects(ref, [1], [[0, 0, 10, 21]], [0.9], [1]).recognised[0]
    assert not match_objects(ref, [1], [[0, 0, 10, 10]], [0.49], [1]).recognised[0]      # score below s
    assert not match_objects(ref, [1], [[0, 0, 10, 10]], [0.99], [2]).recognised[0]      # wrong class
    assert not match_objects(ref, [1], np.zeros((0, 4)), [], []).recognised[0]           # no detections
    # the best *eligible* detection counts: a perfect box of another class does not
    m = match_objects(ref + [[20, 20, 30, 30]], [1, 2], [[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]],
                      [0.9, 0.8, 0.3], [2, 1, 2], iou_threshold=0.5, score_threshold=0.5)
    assert m.recognised.tolist() == [True, False]
    assert m.best_iou[0] == pytest.approx(0.81) and m.score[0] == pytest.approx(0.8)
    m = match_objects(ref, [1], [[0, 0, 10, 10]], [0.3], [1], score_threshold=0.25, iou_threshold=0.9)
    assert m.recognised[0]
    # one to one, as COCO matches: one detection over two overlapping objects recognises one of them
    two = [[0, 0, 10, 10], [0, 0, 10, 12]]
    m = match_objects(two, [1, 1], [[0, 0, 10, 11]], [0.9], [1])
    assert m.recognised.tolist() == [False, True]            # the better overlap (IoU 11/12) claims it
    # a second, weaker detection then recognises the other object; higher scores claim first
    m = match_objects(two, [1, 1], [[0, 0, 10, 11], [0, 0, 10, 10]], [0.6, 0.9], [1, 1])
    assert m.recognised.tolist() == [True, True] and m.score.tolist() == pytest.approx([0.9, 0.6])
    # a claimed object is not claimed again: the second of two identical detections takes the other
    m = match_objects(two, [1, 1], [[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.6], [1, 1])
    assert m.recognised.tolist() == [True, True] and m.best_iou.tolist() == pytest.approx([1.0, 10 / 12])
    # the higher score claims, though a lower-scored detection overlaps more; the object's IoU and
    # score are those of the detection that recognised it
    m = match_objects(ref, [1], [[0, 0, 10, 16], [0, 0, 10, 11]], [0.9, 0.5], [1, 1])
    assert m.recognised.tolist() == [True]
    assert m.best_iou.tolist() == pytest.approx([10 / 16]) and m.score.tolist() == pytest.approx([0.9])
    # not recognised: the best eligible detection's IoU and score (0 and 0 when none is eligible)
    m = match_objects(ref + [[20, 20, 30, 30]], [1, 2], [[20, 20, 30, 40], [24, 20, 34, 30]], [0.8, 0.7], [2, 2])
    assert m.recognised.tolist() == [False, True]
    m = match_objects([[20, 20, 30, 30], [50, 50, 60, 60]], [2, 1], [[20, 20, 30, 60], [0, 0, 5, 5]], [0.8, 0.95],
                      [2, 2])
    assert m.recognised.tolist() == [False, False]
    assert m.best_iou.tolist() == pytest.approx([0.25, 0.0]) and m.score.tolist() == pytest.approx([0.8, 0.0])
    m = match_objects([[20, 20, 30, 30]], [2], [[0, 0, 5, 5]], [0.95], [2])   # eligible, no overlap at all
    assert m.best_iou.tolist() == [0.0] and m.score.tolist() == pytest.approx([0.95])
    assert m.best_iou.dtype == m.score.dtype == np.float32 and m.recognised.dtype == bool
    # equal scores: the earlier detection claims first (a stable order; numpy's default sort
    # reorders ties in an array this long)
    far = [50, 50, 60, 60]
    dets = [far, [0, 0, 10, 6], [0, 0, 10, 10]] + [far] * 23
    m = match_objects(ref, [1], dets, [0.5] * 20 + [0.9] + [0.5] * 5, [1] * 26)
    assert m.best_iou.tolist() == pytest.approx([0.6])
    # labels and scores in any array shape, boxes in any numeric type
    m = match_objects(np.array([[0, 0, 10, 10]]), [[1]], np.array([[0, 0, 10, 10]], np.int64), [[0.9]], [[1]])
    assert m.recognised.tolist() == [True] and m.best_iou.tolist() == pytest.approx([1.0])


def test_both_jrd_conventions():
    mono = not_recognised_labels([True] * 20 + [False] * 44)
    assert jrd(mono) == 19 and first_unrecognised(mono) == 20
    bumpy = np.array([0] * 10 + [1] + [0] * 9 + [1] * 44)
    assert jrd(bumpy) == 19 and first_unrecognised(bumpy) == 10
    assert first_unrecognised([0] * 64) == 64 and jrd([1] * 64) == -1 and first_unrecognised([1] * 64) == 0
    labels = not_recognised_labels(np.array([1, 1, 0]))              # recognised given as 0/1
    assert labels.tolist() == [0, 0, 1] and labels.dtype == np.int64
    assert is_monotonic([0, 0, 1, 1]) and is_monotonic([0, 0]) and not is_monotonic([1, 0])


def test_jrd_and_error_tolerance_64_levels():
    labels = not_recognised_labels([True] * 20 + [False] * 44)
    assert jrd(labels) == 19 and is_monotonic(labels) and error_tolerant_jrd(labels) == 19
    assert jrd([1] * 64) == -1 and error_tolerant_jrd([1] * 64) == 0
    assert error_tolerant_jrd([0] * 64) == 63
    p = np.array([0] * 40 + [1] * 24)
    p[10] = 1                      # one spurious miss early: the first window from the top that
    assert not is_monotonic(p)     # ends in 0 with ≤ 5 misses is s = 32 → JRD 39
    assert jrd(p) == 39 and error_tolerant_jrd(p) == 39
    q = np.array([0] * 40 + [1] * 24)
    q[45] = 0                      # a spurious hit at 45: window p[38:46] = 0 0 1 1 1 1 1 0 (sum 5)
    assert jrd(q) == 45 and error_tolerant_jrd(q) == 45
    q[44] = 0
    q[45] = 1
    q[46] = 0                      # hits at 44 and 46 → window p[39:47] sums 5 and ends in 0
    assert error_tolerant_jrd(q) == 46
    r = np.array([0] * 30 + [1] * 34)
    r[[50, 52]] = 0                # windows ending at 50/52 hold ≥ 6 misses → back to p[22:30] → 29
    assert error_tolerant_jrd(r) == 29
    assert error_tolerant_jrd([0, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]) == 7   # L = 16
    assert error_tolerant_jrd([0] * 8 + [1] * 7 + [0]) == 7       # two changes: a late spurious hit is ignored
    assert error_tolerant_jrd([1] * 14 + [0] * 2) == 15           # one change: the last level recognised
    assert error_tolerant_jrd([1] * 7 + [0] + [1] * 7 + [0]) == 0  # no window qualifies
    assert error_tolerant_jrd([0, 0, 0, 1, 0, 1, 1, 0]) == 7       # exactly one window (L = 8)
    assert error_tolerant_jrd(np.array([False] * 3 + [True] + [False] * 4 + [True] * 8)) == 7   # boolean labels
    with pytest.raises(ValueError, match="at least 8 levels, got 5"):
        error_tolerant_jrd([0] * 5)


class OracleDetector(Detector):
    """Recognises the object in exactly the images it is told to: it finds which of ``images``
    (the pristine image and each of its decodes, letterboxed as the stage letterboxes them) it is
    shown, and returns ``box`` (canvas pixels) of class 1 with score 0.9 where ``recognised`` says
    so, 0.1 elsewhere."""

    family = "oracle"

    def __init__(self, images, recognised, box, canvas):
        super().__init__(CLASSES)
        from icm.maa.canvas import letterbox, to_tensor

        self.references = torch.stack([letterbox(to_tensor(im), canvas)[0] for im in images])
        assert len({r.numpy().tobytes() for r in self.references}) == len(images)   # each one told apart
        self.recognised = list(recognised)
        self.box = torch.tensor([box], dtype=torch.float32)

    def predict(self, images, score_threshold=0.05):
        out = []
        for im in images:
            distance = ((self.references - im) ** 2).flatten(1).amax(1)
            k = int(distance.argmin())
            assert float(distance[k]) == 0.0
            score = torch.tensor([0.9 if self.recognised[k] else 0.1])
            keep = score >= score_threshold
            out.append({"boxes": self.box[keep], "scores": score[keep], "labels": torch.tensor([1])[keep]})
        return out


# A 120x90 image on a 64 px canvas: scaled by 64/120 to 64x48, pasted at left 8. Its object
# [20, 30, 50, 60] sits on the canvas at x·48/90 + 8, y·64/120.
TALL_BOX = [20.0, 30.0, 50.0, 60.0]
TALL_BOX_ON_CANVAS = [20 * 48 / 90 + 8, 30 * 64 / 120, 50 * 48 / 90 + 8, 60 * 64 / 120]


def test_label_stage_known_jrd(photo, tmp_path):
    image = np.ascontiguousarray(photo[:120, :90])
    ladders = [{"type": "jpeg", "levels": 16}, {"type": "webp", "levels": 12}]
    params = {"ladders": ladders, "detector": {"name": "yolov8n", "weights": "random"}, "canvas": 64,
              "reference": "gt", "score_threshold": 0.5, "iou_threshold": 0.5, "detect_batch": 5}
    stage = LabelStage(str(tmp_path), params, CLASSES, [11, 12, 13, 14])
    record = {"source_id": "t/img", "image_id": "img", "image": image, "boxes": np.array([TALL_BOX]),
              "class_ids": np.array([1]), "class_names": ["square"], "width": 90, "height": 120, "notes": [],
              "status": "ok"}
    entry = LadderStage(ladders).code_record(record)
    # labels (1 = not recognised) per level, and what each convention makes of them, by hand
    labels = {"jpeg": [0] * 8 + [1] * 7 + [0],            # a spurious hit at the last level
              "webp": [0, 0, 1] + [0] * 6 + [1] * 3}      # a spurious miss at level 2
    expected = {"jpeg": {"jrd": 15, "first_unrecognised": 8, "jrd_tolerant": 7, "monotonic": False},
                "webp": {"jrd": 8, "first_unrecognised": 2, "jrd_tolerant": 8, "monotonic": False}}
    decodes = [image] + [d for name in ("jpeg", "webp") for _, d, _ in entry["coded"][name]]
    recognised = [True] + [not v for name in ("jpeg", "webp") for v in labels[name]]
    stage.det = OracleDetector(decodes, recognised, TALL_BOX_ON_CANVAS, 64)
    levels, objects, notes = stage.label_image(record, entry["coded"])
    assert notes == [] and len(objects) == 2 and len(levels) == 16 + 12
    for obj in objects:
        assert {k: obj[k] for k in expected[obj["ladder"]]} == expected[obj["ladder"]], obj["ladder"]
        assert obj["levels"] == len(labels[obj["ladder"]]) and obj["reference"] == "gt"
        assert obj["category_id"] == 12 and obj["CategoryId"] == 1 and obj["class_name"] == "square"
        assert obj["recognised_pristine"] and obj["area"] == 900 and obj["box"] == TALL_BOX
    for name in ("jpeg", "webp"):
        rows = [r for r in levels if r["ladder"] == name]
        assert [r["level"] for r in rows] == list(range(len(labels[name])))
        assert [r["label"] for r in rows] == labels[name]
        assert [r["recognised"] for r in rows] == [not v for v in labels[name]]
        # the detection, mapped back off the canvas, is the object's own box
        assert all(r["best_iou"] == pytest.approx(1.0, abs=1e-4) for r in rows if r["recognised"])
        assert [r["score"] for r in rows] == pytest.approx([0.9 if not v else 0.0 for v in labels[name]])
        assert [r["bytes"] for r in rows] == [c[0] for c in entry["coded"][name]]
        assert all(r["bpp"] == pytest.approx(8 * r["bytes"] / (120 * 90)) for r in rows)
    rows = [r for r in levels if r["ladder"] == "jpeg"]
    assert json.loads(rows[3]["codec_params"]) == {"type": "jpeg", "quality": 80}
    crop = np.asarray(Image.open(__import__("io").BytesIO(rows[0]["crop_png"])))
    assert np.array_equal(crop, entry["coded"]["jpeg"][0][1][30:60, 20:50])


def test_jrd_statistics_by_ladder_class_and_area():
    from icm.jrd.report import jrd_figure, jrd_stats

    def obj(ladder, cls, area, jrd_, monotonic=True, pristine=True, levels=8):
        return {"source_id": "s", "object_index": 0, "ladder": ladder, "class_name": cls, "area": area,
                "levels": levels, "jrd": jrd_, "jrd_tolerant": max(jrd_, 0), "monotonic": monotonic,
                "recognised_pristine": pristine}
    objects = [obj("jpeg", "car", 100, 3), obj("jpeg", "car", 2000, 5, monotonic=False),
               obj("jpeg", "person", 10000, -1, pristine=False), obj("jpeg", "person", 50, 0),
               obj("jpeg", "car", 32 ** 2, 1),                                   # COCO's medium from 32²
               obj("webp", "car", 100, 2, levels=4), obj("hevc", "car", 100, -1, pristine=False, levels=52)]
    stats = jrd_stats(objects)
    assert stats == {
        "hevc": {"levels": 52, "objects": 1, "recognised_at_some_level": 0, "recognised_pristine": 0,
                 "mean_jrd": None, "mean_jrd_by_class": {}, "mean_jrd_by_area": {}, "monotonic_share": None},
        "jpeg": {"levels": 8, "objects": 5, "recognised_at_some_level": 4, "recognised_pristine": 4,
                 "mean_jrd": 2.25, "mean_jrd_by_class": {"car": 3.0, "person": 0.0},
                 "mean_jrd_by_area": {"small": 1.5, "medium": 3.0}, "monotonic_share": 0.75},
        "webp": {"levels": 4, "objects": 1, "recognised_at_some_level": 1, "recognised_pristine": 1,
                 "mean_jrd": 2.0, "mean_jrd_by_class": {"car": 2.0}, "mean_jrd_by_area": {"small": 2.0},
                 "monotonic_share": 1.0}}
    assert list(stats) == ["hevc", "jpeg", "webp"]
    figure = jrd_figure(objects)
    assert figure.startswith(b"\x89PNG") and Image.open(__import__("io").BytesIO(figure)).size[1] > 500


def test_jrd_shapes_variant_leaves_v2_alone(tmp_path):
    import hashlib

    from icm.data.samples import shapes, shapes_reader

    v2 = shapes(tmp_path, n_train=4, n_val=4, seed=0)
    # shapes v2's annotations as its generator wrote them before the variant existed: the same
    # random draws in the same order, so every figure made on v2 stands
    recorded = {"photo/annotations/instances_train.json": "79a817a8a63485a57e3476d8863297e2892e8c41484c80feef8a5a1611c62259",
                "photo/annotations/instances_val.json": "54c6452428e40ef724625a3aa90f334ced1635b13b56a656903fb9fe9134f336",
                "sketch/annotations/instances_train.json": "22b422b9bd73d5531db78c33ef045b7f858124c141f863f11999e3ef61b73bdd",
                "sketch/annotations/instances_val.json": "d9445bcfb8c7bf810e87a46d3c11bfe2f69b1e43612a43a3c03c287e9a1049f6"}
    assert {rel: hashlib.sha256((v2 / rel).read_bytes()).hexdigest() for rel in recorded} == recorded
    variant = shapes(tmp_path, n_train=4, n_val=4, seed=0, variant="jrd")
    assert variant.name == "shapes-jrd-4-4-0" and not (variant / "sketch").exists()
    assert json.loads((variant / "STAMP.json").read_text())["variant"]["name"] == "jrd"
    with pytest.raises(ValueError, match="variant 'jrd'"):
        shapes_reader("sketch", "val", root=tmp_path, n_train=4, n_val=4, seed=0, variant="jrd")
    reader = shapes_reader("photo", "val", root=tmp_path, n_train=4, n_val=4, seed=0, variant="jrd")
    assert reader.name == "shapes-jrd-photo-val"
    contrasts, sides = [], []
    for rec in reader.records():
        img = rec["image"].astype(float)
        for x1, y1, x2, y2 in np.asarray(rec["boxes"]).reshape(-1, 4).astype(int):
            cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
            ring = np.concatenate([img[max(0, y1 - 3):y1, x1:x2].reshape(-1, 3), img[y2:y2 + 3, x1:x2].reshape(-1, 3)])
            contrasts.append(np.linalg.norm(img[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0) - ring.mean(0)))
            sides.append(min(x2 - x1, y2 - y1))
    # v2 keeps every object > 40 from its surroundings and ≥ 24 px across; the variant does not
    assert min(contrasts) < 40 and min(sides) < 24, (contrasts, sides)


def _list_dataset(root, shapes_root, n=5):
    """A list-txt dataset of shapes images plus a missing and a corrupt file."""
    src = root / "src"
    src.mkdir(parents=True)
    ann = json.loads((shapes_root / "photo" / "annotations" / "instances_val.json").read_text())
    cats = {c["id"]: i for i, c in enumerate(ann["categories"])}
    lines = []
    for img in sorted(ann["images"], key=lambda i: i["file_name"])[:n]:
        name = img["file_name"].rsplit("/", 1)[-1]
        shutil.copy(shapes_root / "photo" / img["file_name"], src / name)
        boxes = [a for a in ann["annotations"] if a["image_id"] == img["id"]]
        objs = " ".join(f"{b['bbox'][0]:.1f},{b['bbox'][1]:.1f},{b['bbox'][0] + b['bbox'][2]:.1f},"
                        f"{b['bbox'][1] + b['bbox'][3]:.1f},{cats[b['category_id']]}" for b in boxes)
        lines.append(f"{name} {objs}")
    (src / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    lines += ["zz_broken.png 1,1,20,20,0", "missing.png 1,1,20,20,0"]
    (src / "list.txt").write_text("\n".join(lines) + "\n")
    return src / "list.txt"


def _jrd_cfg(list_file, out):
    return {"dataset": {"type": "listtxt", "list_file": str(list_file), "name": "shp", "classes": CLASSES},
            "out_dir": str(out), "ladders": [{"type": "jpeg", "levels": 8}, {"type": "hevc", "levels": 8}],
            "detector": {"label": "y", "name": "yolov8n", "weights": "random:3"}, "reference": "gt",
            "iou_threshold": 0.5, "score_threshold": 0.0, "canvas": 128, "detect_batch": 8, "batch_size": 2,
            "seed": 0, "device": "cpu", "coders": {"actors": 1, "num_cpus": 0.5},
            "workers": {"actors": 1, "num_cpus": 0.5},
            "export": {"fractions": {"train": 0.6, "val": 0.2, "test": 0.2}, "include_unrecognised": True}}


def _page_shows_the_record(out_dir):
    """The job's results page (python -m icm.report OUT_DIR) against its summary.json."""
    from page_checks import check_page

    from icm.report import write_report

    record = json.loads((out_dir / "summary.json").read_text())
    shown = check_page(write_report([str(out_dir)]))[str((out_dir / "summary.json").resolve())]
    for ladder in record["per_ladder"]:
        assert {f"/per_ladder/{ladder}/{k}" for k in ("objects", "recognised_pristine", "mean_jrd")} <= shown


@pytest.mark.slow
def test_jrd_pipeline_export_resume_bad_input(ray_cluster, small_shapes, tmp_path):
    import jrd_dataset

    list_file = _list_dataset(tmp_path, small_shapes)
    full = tmp_path / "full"
    summary = jrd_dataset.run(_jrd_cfg(list_file, full))
    assert summary["images"] == {"done": 5, "failed": 2, "skipped": 0, "not_run": 0}
    manifest = pq.read_table(full / "manifest.parquet").to_pylist()
    errors = {r["source_id"]: r["error"] for r in manifest if r["status"] == "error"}
    assert "cannot decode" in errors["shp/zz_broken.png"] and "not found" in errors["shp/missing.png"]
    objects = read_table(full, "objects")
    levels = read_table(full, "levels")
    n_obj = sum(r["objects"] for r in manifest)
    assert n_obj > 0 and objects.num_rows == 2 * n_obj and levels.num_rows == 2 * 8 * n_obj
    assert (full / "jrd.png").is_file()
    for ladder in ("jpeg", "hevc"):
        rows = [r for r in levels.to_pylist() if r["ladder"] == ladder and r["object_index"] == 0]
        first = [r["bytes"] for r in rows if r["source_id"] == rows[0]["source_id"]]
        assert len(first) == 8 and first[0] > first[-1]

    export = full / "export" / "jpeg"
    splits = {s: load_split(export, s) for s in ("train", "val", "test")}
    assert sum(len(v) for v in splits.values()) == 8 * n_obj
    by_split = {s: {e["name"] for e in v} for s, v in splits.items()}
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["val"])
    sample = splits["train"][0]
    assert Image.open(sample["original"]).size == Image.open(sample["distorted"]).size
    infos = json.loads((export / "objects_infos.json").read_text())
    assert set(infos) == set(json.loads((export / "JRD_info.json").read_text()))
    assert all(0 <= v["CategoryId"] < 4 for v in infos.values())
    _page_shows_the_record(full)

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    unit = sorted((resumed / "manifest").glob("unit-*.parquet"))[1].name
    lost = pq.read_table(resumed / "manifest" / unit).num_rows
    for kind in ("manifest", "levels", "objects"):
        (resumed / kind / unit).unlink()
    # the resumed unit coded in its label actors (coders.actors: auto, several, no GPU); the first run's by a coder pool
    again = jrd_dataset.run({**_jrd_cfg(list_file, resumed), "coders": {"actors": "auto"},
                             "workers": {"actors": 2, "num_cpus": 0.5}})
    assert again["images"]["skipped"] == 7 - lost and again["images"]["done"] + again["images"]["failed"] == lost
    assert comparable(full / "manifest.parquet").equals(comparable(resumed / "manifest.parquet"))
    assert read_table(full, "levels").equals(read_table(resumed, "levels"))
    assert read_table(full, "objects").equals(read_table(resumed, "objects"))
    other = export_authors_layout(resumed, "hevc", tmp_path / "again", fractions={"train": 1}, seed=1,
                                  include_unrecognised=True)
    assert other["crops"] == {"train": 8 * n_obj, "val": 0, "test": 0}


def test_label_actors_that_code_their_own_units_write_what_a_coder_pool_feeds_them(small_shapes, tmp_path):
    """On CPUs the label actors code their own units (``code_units``): the unit's rows and tables
    are those of a label actor fed by a separate coder (a storage fault is still the unit's)."""
    from icm.data.ray_io import work_units
    from icm.data.readers import build_reader
    from icm.data.storage import StorageUnavailable

    cfg = _jrd_cfg(_list_dataset(tmp_path, small_shapes, n=2), tmp_path / "unused")
    reader = build_reader(cfg["dataset"])
    unit = work_units(reader, 4)[0]
    params = {k: cfg[k] for k in ("ladders", "detector", "reference", "iou_threshold", "score_threshold", "canvas",
                                  "detect_batch", "device", "seed")}
    params["ladders"] = [{"type": "jpeg", "levels": 4}, {"type": "webp", "levels": 3}]
    coder = LadderStage(params["ladders"], crop_gt=True)
    fed = LabelStage(str(tmp_path / "fed"), params, CLASSES, [0, 1, 2, 3])
    fed_rows = fed.run_unit({**unit, "coded": coder.code_unit(unit["refs"])})
    own = LabelStage(str(tmp_path / "own"), params, CLASSES, [0, 1, 2, 3], code_units=True)
    own_rows = own.run_unit(unit)
    assert [r["status"] for r in own_rows] == [r["status"] for r in fed_rows]
    assert sorted(r["status"] for r in own_rows) == ["error", "error", "ok", "ok"]
    assert comparable(pa.Table.from_pylist(own_rows)).equals(comparable(pa.Table.from_pylist(fed_rows)))
    for kind in ("levels", "objects"):
        assert read_table(tmp_path / "own", kind).equals(read_table(tmp_path / "fed", kind))
    assert read_table(tmp_path / "own", "levels").num_rows == 7 * sum(r["objects"] for r in own_rows) > 0

    own.coder.code_image = lambda ref: {"storage_fault": f"{ref['source_id']}: bucket unreachable"}
    assert own.run_unit(unit) is None and own.failure.startswith(StorageUnavailable.__name__)


def _failing_vvc(bin_dir, max_width):
    """vvencapp/vvdecapp stand-ins: the encoder refuses pictures wider than ``max_width`` (as a
    binary rejecting its input would), the decoder writes a gray reconstruction of the right size."""
    bin_dir.mkdir()
    (bin_dir / "vvencapp").write_text(
        '#!/bin/sh\nwhile [ $# -gt 0 ]; do case "$1" in -o) out="$2";; -s) size="$2";; esac; shift; done\n'
        f'w=${{size%x*}}; if [ "$w" -gt {max_width} ]; then echo "vvencapp: width $w not supported" >&2; exit 3; fi\n'
        'printf "%s" "$size" > "$out"\n')
    (bin_dir / "vvdecapp").write_text(
        '#!/bin/sh\nwhile [ $# -gt 0 ]; do case "$1" in -b) bits="$2";; -o) out="$2";; esac; shift; done\n'
        'size=$(cat "$bits"); w=${size%x*}; h=${size#*x}\n'
        'head -c $((w * h * 3 / 2)) /dev/zero | tr "\\000" "\\200" > "$out"\n')
    for b in ("vvencapp", "vvdecapp"):
        (bin_dir / b).chmod(0o755)
    return {"type": "vvc", "levels": 4, "encoder": str(bin_dir / "vvencapp"), "decoder": str(bin_dir / "vvdecapp")}


def test_a_ladder_that_cannot_code_stops_the_job_before_it_starts(small_shapes, tmp_path):
    import jrd_dataset

    cfg = {**_jrd_cfg(_list_dataset(tmp_path, small_shapes), tmp_path / "out"),
           "ladders": [{"type": "jpeg", "levels": 8}, _failing_vvc(tmp_path / "bin", max_width=0)]}
    with pytest.raises(SystemExit, match=r"ladder 'vvc' cannot code a 64x64 test image at level 0 .*"
                                         r"vvencapp exited with 3: vvencapp: width 64 not supported; nothing was run"):
        jrd_dataset.run(cfg)
    assert not (tmp_path / "out" / "manifest").exists()


@pytest.mark.slow
def test_a_ladder_failing_on_every_image_ends_the_job_with_one_message(ray_cluster, small_shapes, tmp_path):
    import jrd_dataset

    cfg = {**_jrd_cfg(_list_dataset(tmp_path, small_shapes), tmp_path / "out"),
           "ladders": [_failing_vvc(tmp_path / "bin", max_width=100)]}   # the 64-px probe passes, images ≥ 128 px fail
    with pytest.raises(SystemExit) as stop:
        jrd_dataset.run(cfg)
    message = str(stop.value)
    assert message.startswith("ladder 'vvc' failed on every image (5 of 5); first error — shp/")
    assert "vvencapp exited with 3: vvencapp: width" in message and "new out_dir" in message


def _synthetic_run(run_dir, image_ids, levels=4, recognised_pristine=lambda i, k: True, shards=2):
    """A JRD run's shards written directly: two objects per image, ``levels`` JPEG levels."""
    from icm.data.storage import Storage
    from icm.data.writers import png_bytes

    store = Storage(run_dir)
    crop = png_bytes(np.zeros((4, 4, 3), np.uint8))
    per_shard = [image_ids[s::shards] for s in range(shards)]
    for s, ids in enumerate(per_shard):
        objects, level_rows = [], []
        for image_id in ids:
            for k in range(2):
                key = {"source_id": f"coco/{image_id}", "image_id": image_id, "object_index": k, "category_id": 3,
                       "CategoryId": 2, "class_name": "car", "box": [0.0, 0.0, 4.0, 4.0], "area": 16.0,
                       "ladder": "jpeg"}
                labels = [0] * (k + 2) + [1] * (levels - k - 2)
                objects.append({**key, "reference": "gt", "levels": levels,
                                "recognised_pristine": recognised_pristine(image_id, k), "jrd": jrd(labels),
                                "first_unrecognised": first_unrecognised(labels), "jrd_tolerant": jrd(labels),
                                "monotonic": True, "original_png": crop})
                level_rows += [{**key, "level": lv, "codec_params": "{}", "bytes": 100 - lv, "bpp": 1.0,
                                "recognised": not lab, "label": lab, "best_iou": 0.9, "score": 0.9, "crop_png": crop}
                               for lv, lab in enumerate(labels)]
        store.write_table(f"objects/unit-{s}.parquet", pa.Table.from_pylist(objects, schema=OBJECT_SCHEMA))
        store.write_table(f"levels/unit-{s}.parquet", pa.Table.from_pylist(level_rows, schema=LEVEL_SCHEMA))


def test_export_names_sort_both_ways_and_keeps_objects_recognised_in_the_pristine_image(tmp_path):
    import re

    ids = ["139", "1000", "285", "2"]
    _synthetic_run(tmp_path / "run", ids, recognised_pristine=lambda i, k: not (i == "285" and k == 1))
    info = export_authors_layout(tmp_path / "run", "jpeg", tmp_path / "export", fractions={"train": 1})
    assert info["objects"] == 7 and info["objects_left_out_unrecognised_pristine"] == 1
    assert "64" in info["note"]                      # 4 levels: the authors' predictor assumes 64
    infos = json.loads((tmp_path / "export/objects_infos.json").read_text())
    names = list(infos)
    natural = sorted(names, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
    assert sorted(names) == natural
    assert [infos[n]["image_id"] for n in sorted(names)][::2] == ["2", "139", "285", "1000"]
    first = infos[sorted(names)[1]]                  # object 1 of image 2: labels 0 0 0 1
    assert first["jrd"] == 2 and first["first_unrecognised"] == 3
    train = json.loads((tmp_path / "export/train.json").read_text())
    assert len(train["paths"]) == 7 * 4 and train["paths"] == sorted(train["paths"])
    assert all((tmp_path / "export" / p).is_file() for p in train["paths"])
    assert not any("285" in n and n.endswith("_0001") for n in train["names"])


def test_reference_detector_on_a_dataset_without_classes(tmp_path):
    from icm.data.readers import FolderReader

    (tmp_path / "imgs").mkdir()
    reader = FolderReader(tmp_path / "imgs", name="f")
    with pytest.raises(ValueError, match="no class list.*reference: detector"):
        label_categories({"detector": {"name": "yolov8n"}, "reference": "gt"}, reader)
    with pytest.raises(ValueError, match="detector.classes"):
        label_categories({"detector": {"name": "yolov8n"}, "reference": "detector"}, reader)
    classes, ids = label_categories({"detector": {"name": "yolov8n", "classes": CLASSES}, "reference": "detector"},
                                    reader)
    assert classes == CLASSES and ids == [0, 1, 2, 3]


def test_label_stage_with_detector_reference_labels_its_own_detections(photo, tmp_path):
    image = np.ascontiguousarray(photo[:96, :96])
    box = [10.0, 20.0, 60.0, 70.0]
    ladders = [{"type": "jpeg", "levels": 8}]
    params = {"ladders": ladders, "detector": {"name": "yolov8n", "weights": "random", "classes": CLASSES},
              "canvas": 96, "reference": "detector", "score_threshold": 0.5, "iou_threshold": 0.5}
    stage = LabelStage(str(tmp_path), params, CLASSES, list(range(4)))
    record = {"source_id": "f/img", "image_id": "img", "image": image, "boxes": np.zeros((0, 4)),
              "class_ids": np.zeros(0, int), "class_names": [], "width": 96, "height": 96, "notes": [],
              "status": "ok"}
    coded = LadderStage(ladders).code_record(record)["coded"]
    recognised = [True] * 5 + [False] * 4                   # the pristine image and JPEG levels 0-3
    stage.det = OracleDetector([image] + [d for _, d, _ in coded["jpeg"]], recognised, box, 96)
    levels, objects, _ = stage.label_image(record, coded)
    assert len(objects) == 1 and objects[0]["class_name"] == "square" and objects[0]["box"] == box
    assert objects[0]["recognised_pristine"] and len(levels) == 8
    assert objects[0]["jrd"] == 3 and objects[0]["first_unrecognised"] == 4 and objects[0]["monotonic"]
    assert objects[0]["jrd_tolerant"] == 3 and objects[0]["reference"] == "detector"


def test_crops_encoded_by_the_coders_are_the_label_stage_s_and_labelling_runs_forward_only(photo, tmp_path):
    """The coder actors encode each ground-truth object's crop at every level (so detector actors
    only detect): the rows are those of crops cut and encoded on the label side, also for a box
    whose float64 corner rounds differently in float32. Labelling is forward only: cuDNN's
    deterministic flags, without PyTorch's deterministic-algorithm mode."""
    image = np.ascontiguousarray(photo[:96, :96])
    ladders = [{"type": "jpeg", "levels": 6}, {"type": "webp", "levels": 4}]
    params = {"ladders": ladders, "detector": {"name": "yolov8n", "weights": "random:2"}, "canvas": 96,
              "reference": "gt", "score_threshold": 0.0, "iou_threshold": 0.5, "detect_batch": 4}
    stage = LabelStage(str(tmp_path), params, CLASSES, [11, 12, 13, 14])
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    record = {"source_id": "t/img", "image_id": "img", "image": image,
              "boxes": np.array([[10.0, 20.0, 60.0, 70.0], [30.2, 5.5, 60.00000001, 41.7]]),
              "class_ids": np.array([1, 2]), "class_names": ["square", "triangle"], "width": 96, "height": 96,
              "notes": [], "status": "ok"}
    coder = LadderStage(ladders, crop_gt=True)
    entry = coder.with_crops(coder.code_record(record))
    assert len(entry["crops"]["original"]) == 2 and len(entry["crops"]["jpeg"]) == 6
    levels, objects, _ = stage.label_image(record, entry["coded"], entry["crops"])
    assert len(levels) == 2 * (6 + 4) and len(objects) == 2 * 2
    assert (levels, objects) == stage.label_image(record, entry["coded"])[:2]     # = cut and encoded here
