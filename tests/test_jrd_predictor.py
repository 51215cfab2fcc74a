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
from icm.jrd.predictor import build_predictor, choose_level, jrd_metrics, object_jrds, pad_center


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


def test_training_lowers_the_loss(tmp_path):
    from icm.jrd.predictor import count_pairs, decode_pair, run_splits, split_pairs
    from icm.train.jrd import train_jrd_loop
    from icm.train.session import LocalSession

    _informative_run(tmp_path / "run")
    src = {"run_dir": str(tmp_path / "run"), "ladder": "jpeg"}
    split_of = run_splits(src["run_dir"], "jpeg", {"train": 1.0}, 0)
    rows = [{**r, **decode_pair(r, 32)} for r in split_pairs(src, "train", split_of)]
    assert len(rows) == count_pairs(src, "train", split_of) == 12 * 8
    session = LocalSession({"train": rows}, tmp_path / "ckpt")
    train_jrd_loop({"canvas": 32, "backbone_weights": "random:0", "steps": 30, "batch_size": 16, "lr": 0.05,
                    "log_every": 1, "checkpoint_every": 100, "seed": 0}, session)
    losses = [r["loss"] for r in session.reports]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


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
    evaluation = again["evaluation"]
    assert evaluation["objects"] > 0 and evaluation["mae"] is not None and 0 <= evaluation["label_accuracy"] <= 1
    assert (tmp_path / "out" / "jrd_scatter.png").is_file()
    objects = json.loads((tmp_path / "out" / "objects.json").read_text())
    assert all(0 <= o["jrd_predicted"] < 8 for o in objects)
