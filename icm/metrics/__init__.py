"""Metrics: real-bitstream bpp, PSNR, MS-SSIM, COCO mAP (pycocotools), top-1, BD-rate/BD-PSNR."""

from icm.metrics.bitstream import CodedImage, code_image, pad_to_multiple
from icm.metrics.detection import coco_map, detections_to_coco, records_to_coco_gt
from icm.metrics.image import ms_ssim, psnr, top1
from icm.metrics.rd import bd_metrics

__all__ = ["CodedImage", "code_image", "pad_to_multiple", "coco_map", "detections_to_coco",
           "records_to_coco_gt", "ms_ssim", "psnr", "top1", "bd_metrics"]
