"""Stage weights on shared storage once, for every worker of a cluster to read.

    python -m icm.zoo.stage trained:photo-yolov8n https://host/w.pth /local/ckpt.pth --to s3://bucket/weights

``trained:<label>`` goes to ``<to>/trained/<label>.<ext>`` (with its ``.json`` record when there is
one), a URL or a local file to ``<to>/<file name>`` — where ``icm.zoo.weights`` looks when
``$ICM_WEIGHTS_DIR=<to>``, each with its ``<file>.sha256`` (nodes compare their cached copy with it,
so staging a file again under its name reaches every node). Job configs then name it ``trained:<label>``, ``staged:<file name>`` or
by its URI (``s3://…/<file name>``); every manifest records its sha256. Hub names (``compressai:mse``, ``torchvision:DEFAULT``, …) resolve per
model: fetch them once on a machine with a network (they land in ``~/.cache/icm-ray/weights``) and
stage that file's URL or path.
"""

from __future__ import annotations

import argparse

from icm.data.storage import Storage
from icm.zoo.weights import resolve, stage_digest


def stage(spec: str, to: str) -> tuple[str, str]:
    """Upload the file ``spec`` resolves to; returns where it went and its sha256."""
    resolved = resolve(spec)
    if resolved.path is None:
        raise ValueError(f"{spec!r} names random weights: nothing to stage")
    store = Storage(to)
    rel = f"trained/{resolved.path.name}" if spec.startswith("trained:") else resolved.path.name
    stage_digest(store, rel, resolved.path.read_bytes())   # <rel>.sha256: nodes revalidate their copy
    record = resolved.path.with_suffix(".json")
    if spec.startswith("trained:") and record.is_file():
        store.write_bytes(f"trained/{record.name}", record.read_bytes())
    return store.display(rel), resolved.sha256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="+", help="trained:<label>, a URL, or a local file")
    parser.add_argument("--to", required=True, help="shared weights dir: s3://…, gs://… or a shared path")
    args = parser.parse_args()
    for spec in args.specs:
        where, sha256 = stage(spec, args.to)
        ref = spec if spec.startswith("trained:") else f"staged:{where.rsplit('/', 1)[-1]}"
        print(f"{spec} -> {where} (sha256 {sha256[:16]}…); in job configs: weights: {ref} or {where}")
    print(f"workers: export ICM_WEIGHTS_DIR={args.to}")


if __name__ == "__main__":
    main()
