"""icm-ray: Image Coding for Machines on Ray.

The library (`icm`) knows nothing of Ray except `icm.data.ray_io`; the drivers in `pipelines/`
compose it into Ray Data / Ray Train jobs.
"""

import os

# ultralytics pip-installs missing packages at run time (e.g. pi-heif when PIL meets a corrupt
# file) and checks its hub for updates; a data job must do neither. Users may override both.
os.environ.setdefault("YOLO_AUTOINSTALL", "False")
os.environ.setdefault("YOLO_OFFLINE", "1")

__version__ = "0.1.0"
