"""The OW-JRD predictor: the error-tolerance rule on hand-made sequences, forward shapes at two crop
sizes, the level chooser, and export → Ray Train (loss down, resume) → evaluation end to end on a
tiny synthetic JRD set whose labels depend on how distorted each crop is."""

import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

from icm.jrd.labelling import error_tolerant_jrd
from icm.jrd.predictor import (build_predictor, choose_level, guided_compression, jrd_metrics, object_jrds,
                               pad_center)


@pytest.mark.parametrize("sequence,expected", [
    ([1] * 64, 0),                                   # never recognised: no zero at all
    ([0] * 64, 63),                                  # always recognised
    ([0] * 30 + [1] * 34, 29),                       # one change: the last zero
    ([1] * 10 + [0] * 54, 63),                       # one change the other way: still the last zero
    ([0] * 20 + [1] * 3 + [0] * 10 + [1] * 31, 32),  # several changes: window p[25:33] ends in 0, sums 0
    ([0] * 56 + [1, 0, 1, 0, 1, 0, 1, 0], 63),       # the window at the very end: p[56:64] sums 4, ends in 0
    ([0] * 56 + [1, 1, 1, 1, 1, 1, 0, 1], 55),       # end window ends in 1: the previous ending in 0 wins
    ([1, 0] * 32, 63),                               # alternating: p[56:64] = 1 0 1 0 1 0 1 0 ends in 0, sums 4
    ([0, 1, 1, 1, 1, 1, 1, 1] * 8, 0),               # every window holds 7 misses: none qualifies → 0
])
def test_error_tolerance_rule_table(sequence, expected):
    assert error_tolerant_jrd(sequence) == expected


@pytest.mark.parametrize("canvas", [32, 64])
def test_predictor_forward_shapes(canvas):
    model = build_predictor("random:0", canvas).eval()
    assert model.pool.output_size == canvas // 16
    logits = model(torch.rand(5, 3, canvas, canvas), torch.rand(5, 3, canvas, canvas))
    assert logits.shape == (5, 2)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head"}                      # the backbone is frozen
    crop = np.full((10, 30, 3), 200, np.uint8)
    padded = pad_center(crop, canvas)              # zero-padded, centred; shrunk only when larger
    assert padded.shape == (canvas, canvas, 3)
    assert padded[canvas // 2, canvas // 2].tolist() == [200, 200, 200] and padded[0, 0].tolist() == [0, 0, 0]


def test_fusion_head_as_the_authors():
    head = build_predictor("random:0", 32).head
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (792, 640, (1, 1)), (640, 640, (3, 3)), (640, 640, (3, 3)), (640, 1280, (1, 1))]
    blocks = [m for m in head if isinstance(m, torch.nn.Sequential)]
    assert [type(b[2]) for b in blocks] == [torch.nn.ReLU] * 3 + [torch.nn.SiLU]
    assert all(b[1].eps == 1e-3 for b in blocks)
    # kaiming-normal fan-out: std √(2 / (out · k²)); PyTorch's default would give √(1 / (3 · in · k²))
    for conv in convs:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert float(conv.weight.detach().std()) == pytest.approx((2 / fan_out) ** 0.5, rel=0.03)
    linear = head[-1]
    assert float(linear.weight.detach().std()) == pytest.approx(0.01, rel=0.05) and not linear.bias.any()


def _rows(name, levels, predictions, true_jrd=9):
    return [{"name": name, "source_id": name, "object_index": 0, "class_name": "car", "area": 500.0, "jrd": true_jrd,
             "level": lv, "label": int(lv > true_jrd), "prediction": p} for lv, p in zip(levels, predictions)]


def test_predicted_jrd_is_a_level_value_when_a_level_row_is_missing():
    levels = [lv for lv in range(16) if lv != 5]                 # level 5's row is missing
    monotone = [int(lv > 9) for lv in levels]                    # recognised at levels 0..9
    bumpy = [int(lv > 9 or lv == 2) for lv in levels]            # plus a spurious miss at level 2
    objects = object_jrds(_rows("a", levels, monotone) + _rows("b", levels, bumpy))
    # monotone: the last level predicted 0 is level 9 (its row is the 9th: position 8);
    # bumpy: windows from the top end in a miss until rows 1..8 (levels 1..9), which end in 0
    # and hold one miss → its last row, level 9
    assert [o["jrd_predicted"] for o in objects] == [9, 9]
    assert objects[0]["levels"] == 15
    assert object_jrds(_rows("c", levels, [1] * 15))[0]["jrd_predicted"] == 0   # never predicted recognised


def test_guided_compression_counts_the_objects_the_level_was_chosen_for():
    # image A: a0 (true JRD 2, predicted 3), a1 (1, 1) and a2, missed in the pristine image (not a
    # test object, never recognised: counting it would change every share); image B: b0 (3, 2)
    objects = [{"source_id": "A", "object_index": 0, "jrd": 2, "jrd_predicted": 3},
               {"source_id": "A", "object_index": 1, "jrd": 1, "jrd_predicted": 1},
               {"source_id": "B", "object_index": 0, "jrd": 3, "jrd_predicted": 2}]
    truth = {("A", 0): 2, ("A", 1): 1, ("A", 2): -1, ("B", 0): 3}     # recognised at levels ≤ this
    level_rows = [{"source_id": sid, "object_index": k, "level": lv, "recognised": lv <= last}
                  for (sid, k), last in truth.items() for lv in range(4)]
    bytes_at = {"A": [400, 300, 200, 100], "B": [40, 30, 20, 10]}
    calls = []

    def measure(sid, level, rows):
        calls.append((sid, level, [r["object_index"] for r in rows]))
        return bytes_at[sid][level], [level <= truth[sid, r["object_index"]] for r in rows]

    report = guided_compression(objects, level_rows, measure, share=1.0, levels=4)
    assert ("A", 1, [0, 1]) in calls and all(2 not in ks for _, _, ks in calls)
    # predicted: A at min(3, 1) = 1 (300 B), B at 2 (20 B): 3 of 3 recognised. Uniform levels with
    # all three recognised in the job's labels: 0 and 1 → level 1 (300 + 30 B)
    assert report["predicted"] == {"adaptive_bytes": 320, "adaptive_recognised_share": 1.0, "uniform_level": 1,
                                   "uniform_bytes": 330, "uniform_recognised_share": 1.0,
                                   "bits_saved_percent": 3.03, "mean_level": 1.5}
    # true: A at 1 (300 B), B at 3 (10 B)
    assert report["true"] == {"adaptive_bytes": 310, "adaptive_recognised_share": 1.0, "uniform_level": 1,
                              "uniform_bytes": 330, "uniform_recognised_share": 1.0,
                              "bits_saved_percent": 6.06, "mean_level": 2.0}
    assert report["objects"] == 3 and report["images"] == 2


def test_level_chooser_on_a_synthetic_table():
    assert choose_level([10, 20, 30, 40], share=0.75, levels=64) == 20     # 3 of 4 recognised up to 20
    assert choose_level([10, 20, 30, 40], share=1.0, levels=64) == 10
    assert choose_level([10, 20, 30, 40], share=0.25, levels=64) == 40
    assert choose_level([], share=0.9, levels=64) == 63                    # nothing to keep: coarsest
    assert choose_level([0, 0], share=1.0, levels=8) == 0


def test_objects_and_metrics_from_per_level_predictions():
    rows = []
    for name, true_jrd, predicted in (("a_0", 5, [0] * 6 + [1] * 10), ("b_0", 9, [0] * 8 + [1] * 8)):
        for level, p in enumerate(predicted):
            rows.append({"name": name, "source_id": name[0], "class_name": "car", "area": 500.0 if name == "a_0" else 5000.0,
                         "jrd": true_jrd, "level": level, "label": int(level > true_jrd), "prediction": p})
    objects = object_jrds(rows)
    assert [o["jrd_predicted"] for o in objects] == [5, 7]
    metrics = jrd_metrics(objects, rows)
    assert metrics["mae"] == 1.0 and metrics["mae_by_area"]["small"] == 0.0 and metrics["mae_by_area"]["medium"] == 2.0
    assert metrics["label_accuracy"] == pytest.approx(30 / 32)


def _informative_run(run_dir, images=12, levels=8, seed=0, units=3):
    """A JRD run whose distorted crops get noisier with the level; label 1 once past the object's JRD."""
    from icm.data.storage import Storage
    from icm.data.writers import png_bytes
    from icm.jrd.stage import LEVEL_SCHEMA, OBJECT_SCHEMA

    rng = np.random.default_rng(seed)
    store = Storage(run_dir)
    for unit in range(units):
        objects, level_rows = [], []
        for i in range(unit * images // units, (unit + 1) * images // units):
            original = rng.integers(60, 200, (24, 24, 3)).astype(np.uint8)
            true_jrd = int(rng.integers(1, levels - 1))
            key = {"source_id": f"syn/{i}", "image_id": str(i), "object_index": 0, "category_id": 1, "CategoryId": 0,
                   "class_name": "thing", "box": [0.0, 0.0, 24.0, 24.0], "area": 576.0, "ladder": "jpeg"}
            labels = [int(lv > true_jrd) for lv in range(levels)]
            objects.append({**key, "reference": "gt", "levels": levels, "recognised_pristine": True, "jrd": true_jrd,
                            "first_unrecognised": true_jrd + 1, "jrd_tolerant": true_jrd, "monotonic": True,
                            "original_png": png_bytes(original)})
            for lv, lab in enumerate(labels):
                noise = rng.normal(0, 90 if lab else 4, original.shape)
                crop = np.clip(original + noise, 0, 255).astype(np.uint8)
                level_rows.append({**key, "level": lv, "codec_params": "{}", "bytes": 100 - lv, "bpp": 1.0,
                                   "recognised": not lab, "label": lab, "best_iou": 0.9, "score": 0.9,
                                   "crop_png": png_bytes(crop)})
        store.write_table(f"objects/unit-{unit}.parquet", pa.Table.from_pylist(objects, schema=OBJECT_SCHEMA))
        store.write_table(f"levels/unit-{unit}.parquet", pa.Table.from_pylist(level_rows, schema=LEVEL_SCHEMA))


@pytest.mark.parametrize("source", ["export", "parquet"])
def test_training_pairs_are_shuffled(tmp_path, source):
    """Stored pairs come object by object, level by level (64 levels: a batch of 32 is half of one
    object's levels, its labels all 0 or all 1); the predictor's stream mixes images, objects and
    levels, so each batch's label mean is near the split's."""
    from icm.jrd.export import export_authors_layout
    from icm.jrd.predictor import run_splits
    from icm.train.jrd import pair_stream
    from icm.train.session import LocalSession

    _informative_run(tmp_path / "run", images=12, levels=64, units=6)
    if source == "export":
        export_authors_layout(tmp_path / "run", "jpeg", tmp_path / "export", fractions={"train": 1.0})
        src, split_of = {"export_dir": str(tmp_path / "export")}, None
    else:
        src = {"run_dir": str(tmp_path / "run"), "ladder": "jpeg"}
        split_of = run_splits(src["run_dir"], "jpeg", {"train": 1.0}, 0)
    stream = pair_stream(src, "train", 32, split_of, {"shuffle_window": 3}, seed=0)

    def label_means(stream):
        batches = list(LocalSession({"train": stream}, tmp_path / "ckpt").batches("train", 0, 32))
        assert sum(len(b) for b in batches) == 12 * 64
        return [np.mean([r["label"] for r in b]) for b in batches], [len({r["name"] for r in b}) for b in batches]

    shuffled, images = label_means(stream)
    stored, _ = label_means(replace(stream, shuffle=False))
    overall = np.mean(stored)
    sd = np.sqrt(overall * (1 - overall) / 32)      # of the label mean of a batch drawn at random from the split
    assert np.mean([abs(m - overall) for m in stored]) > 0.3       # the stored order: batches of one label, mostly
    assert max(abs(m - overall) for m in shuffled) < 4 * sd
    assert np.mean([abs(m - overall) for m in shuffled]) < 1.5 * sd * np.sqrt(2 / np.pi)   # E|dev| of random batches
    assert min(images) >= 6                                         # every batch mixes at least half the images
    if source == "parquet":     # 6 unit shards over 4 workers: equal shares of the pairs all the same
        from icm.train.stream import local_rows

        shares = [[(r["name"], r["level"]) for *_, r in local_rows(stream, 0, rank, 4)] for rank in range(4)]
        assert [len(s) for s in shares] == [192] * 4 and len(set(sum(shares, []))) == 12 * 64


def test_training_lowers_the_loss_and_beats_the_trivial_answers(tmp_path):
    from icm.jrd.predictor import (baseline_comparison, count_pairs, decode_pair, run_splits, split_objects,
                                   split_pairs)
    from icm.train.jrd import predict_pairs, train_jrd_loop
    from icm.train.session import LocalSession

    _informative_run(tmp_path / "run", images=18)
    src = {"run_dir": str(tmp_path / "run"), "ladder": "jpeg"}
    split_of = run_splits(src["run_dir"], "jpeg", {"train": 2 / 3, "test": 1 / 3}, 0)
    rows = [{**r, **decode_pair(r, 32)} for r in split_pairs(src, "train", split_of)]
    assert len(rows) == count_pairs(src, "train", split_of) == 12 * 8
    session = LocalSession({"train": rows}, tmp_path / "ckpt")
    model = train_jrd_loop({"canvas": 32, "backbone_weights": "random:0", "steps": 30, "batch_size": 16, "lr": 0.05,
                            "log_every": 1, "checkpoint_every": 100, "seed": 0}, session)
    losses = [r["loss"] for r in session.reports]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    # on the 6 held-out images, in eval mode, against the answers that need no crop
    test = [{**r, **decode_pair(r, 32)} for r in split_pairs(src, "test", split_of)]
    predicted = [{**r, "prediction": p} for r, p in zip(test, predict_pairs(model, test))]
    objects = object_jrds(predicted)
    against = baseline_comparison(objects, predicted, *split_objects(src, "train", split_of), draws=200)
    assert against["objects"] == 6 and against["majority_label"] == 0
    assert against["label_accuracy"] >= against["majority_label_accuracy"] + 0.25, against
    assert against["mae"] < against["class_mean_mae"] and against["delta_mae_ci"][1] < 0, against


def test_baselines_by_hand():
    from icm.jrd.predictor import baseline_comparison

    train = [{"class_name": "car", "jrd": 10}, {"class_name": "car", "jrd": 20}, {"class_name": "cat", "jrd": 4}]
    objects = [{"source_id": "A", "class_name": "car", "jrd": 12, "jrd_predicted": 12},   # baseline 15: |3|
               {"source_id": "A", "class_name": "cat", "jrd": 7, "jrd_predicted": 5},     # baseline 4: |3|
               {"source_id": "B", "class_name": "dog", "jrd": 1, "jrd_predicted": 3}]     # unseen class: 34/3
    rows = [{"label": 0, "prediction": 0}, {"label": 1, "prediction": 1}, {"label": 1, "prediction": 0}]
    out = baseline_comparison(objects, rows, train, [0, 0, 1], draws=50)
    assert out["class_means"] == {"car": 15.0, "cat": 4.0} and out["majority_label"] == 0
    assert out["mae"] == pytest.approx(4 / 3, abs=1e-3)
    assert out["class_mean_mae"] == pytest.approx((3 + 3 + (34 / 3 - 1)) / 3, abs=1e-3)
    assert out["label_accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert out["majority_label_accuracy"] == pytest.approx(1 / 3, abs=1e-4)
    lo, hi = out["mae_ci"]
    assert 1 <= lo <= out["mae"] <= hi <= 2    # a resample of A (errors 0, 2) and B (error 2) averages 1 … 2


@pytest.mark.slow
@pytest.mark.parametrize("source", ["export", "parquet"])
def test_export_train_resume_evaluate(ray_cluster, tmp_path, source, preempted):
    """Both sources train on 2 DDP workers and evaluate; the parquet run is also preempted after a
    checkpoint (9 train images × 8 levels: 4 batches of 8 per worker and epoch, checkpoints every 3
    steps, mostly inside epochs) and
    resumed by the same command, to the uninterrupted run's weights."""
    import hashlib

    import train_jrd_predictor

    from icm.jrd.export import export_authors_layout

    _informative_run(tmp_path / "run")
    if source == "export":
        export_authors_layout(tmp_path / "run", "jpeg", tmp_path / "export", fractions={"train": 0.7, "test": 0.3})
        src = {"export_dir": str(tmp_path / "export")}
    else:
        src = {"run_dir": str(tmp_path / "run"), "ladder": "jpeg", "fractions": {"train": 0.7, "test": 0.3}}
    cfg = {"name": "p", "out_dir": str(tmp_path / "out"), "source": src, "canvas": 32, "backbone_weights": "random:0",
           "steps": 24, "batch_size": 8, "lr": 0.05, "checkpoint_every": 3, "log_every": 3, "seed": 0, "threads": 1,
           "guided": {"enabled": False}, "workers": {"num_workers": 2, "cpus_per_worker": 0.5},
           "data": {"num_cpus": 0.5}}
    if source == "parquet":
        straight = train_jrd_predictor.run({**cfg, "out_dir": str(tmp_path / "straight")})
        assert straight["steps"] == 24 and straight["resumed_at"] == []
        killed_at = preempted("pipelines/train_jrd_predictor.py", cfg, tmp_path / "out" / "ray-train" / "p")
    again = train_jrd_predictor.run(cfg)
    assert again["steps"] == 24 and again["final_metrics"]["step"] == 24
    if source == "parquet":     # the same run, resumed: only the steps after the checkpoint ran again
        assert again["resumed_at"] == [killed_at["step"]] and killed_at["step"] < 24

        def digest(out):
            return hashlib.sha256((out / "predictor.pth").read_bytes()).hexdigest()
        assert digest(tmp_path / "out") == digest(tmp_path / "straight")
    # the head's classifier starts at logits ≈ 0 (N(0, 0.01) weights): loss ln 2 ≈ 0.69; the easy
    # set's labels are learnt within these steps
    assert again["final_metrics"]["loss"] < 0.35, again["final_metrics"]
    evaluation = again["evaluation"]
    against = evaluation["against_baselines"]
    assert evaluation["objects"] == against["objects"] > 0 and against["mae"] == evaluation["mae"]
    assert (tmp_path / "out" / "jrd_scatter.png").is_file()
    objects = json.loads((tmp_path / "out" / "objects.json").read_text())
    assert all(0 <= o["jrd_predicted"] < 8 for o in objects)
