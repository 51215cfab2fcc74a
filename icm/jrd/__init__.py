"""OW-JRD (IEEE TMM 2023, "Learning to Predict Object-Wise Just Recognizable Distortion for Image
and Video Compression"): distortion ladders, object-wise labelling, the Ray-free stages of the
distorted-set job and the export to the authors' layout."""
