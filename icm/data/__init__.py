"""Data layer: readers, records, the manifest contract, writers, built-in samples."""

from icm.data.manifest import CONTRACT, VOLATILE, ManifestStore, comparable, manifest_row, model_provenance
from icm.data.paths import PathEscapesRoot, resolve_under
from icm.data.readers import (READERS, CocoReader, FolderReader, ListTxtReader, ManifestReader, Reader,
                              VocReader, build_reader)
from icm.data.records import ImageRef, load_record
from icm.data.writers import to_uint8, write_png

__all__ = ["CONTRACT", "VOLATILE", "ManifestStore", "comparable", "manifest_row", "model_provenance",
           "PathEscapesRoot", "resolve_under", "READERS", "CocoReader", "FolderReader", "ListTxtReader",
           "ManifestReader", "Reader", "VocReader", "build_reader", "ImageRef", "load_record",
           "to_uint8", "write_png"]
