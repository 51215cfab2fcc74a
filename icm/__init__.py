"""icm-ray: Image Coding for Machines on Ray.

The library (`icm`) knows nothing of Ray except `icm.data.ray_io`; the drivers in `pipelines/`
compose it into Ray Data / Ray Train jobs.
"""

__version__ = "0.1.0"
