"""Dataset export: any reader → lossless PNGs + a manifest carrying the annotations.

The manifest it writes is read back by ``ManifestReader``, so an exported set (or any job's
outputs) can feed the next job with provenance intact.
"""

from __future__ import annotations

import time

import pyarrow as pa

from icm.data.records import load_record
from icm.data.units import UnitStage, output_relpath
from icm.data.writers import png_bytes

EXPORT_COLUMNS = pa.schema([
    ("width", pa.int64()), ("height", pa.int64()),
    ("boxes", pa.list_(pa.list_(pa.float64()))), ("class_ids", pa.list_(pa.int64())),
    ("class_names", pa.list_(pa.string())), ("notes", pa.list_(pa.string())),
])


class ExportStage(UnitStage):
    extra_schema = EXPORT_COLUMNS

    def __init__(self, out_dir: str, params: dict, min_side: int = 1, seed: int = 0):
        super().__init__(out_dir, params, models=[], seed=seed)
        self.min_side = min_side

    def error_row(self, ref, reason, started_at):
        return self.row(ref, status="error", error=reason, started_at=started_at, width=0, height=0,
                        boxes=[], class_ids=[], class_names=[], notes=list(ref.get("notes") or []))

    def process_unit(self, refs):
        rows = []
        for ref in refs:
            started = time.time()
            record = load_record(ref, min_side=self.min_side)
            if record["status"] != "ok":
                rows.append(self.error_row(ref, record["error"], started))
                continue
            rel = output_relpath(ref["source_id"])
            self.storage.write_bytes(rel, png_bytes(record["image"]))
            rows.append(self.row(ref, status="ok", output_path=rel, started_at=started,
                                 width=record["width"], height=record["height"],
                                 boxes=record["boxes"].tolist(), class_ids=record["class_ids"].tolist(),
                                 class_names=record["class_names"], notes=record["notes"]))
        return rows
