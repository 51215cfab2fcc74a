"""The project's own codec parts, composed with CompressAI models."""

from icm.codecs.ugicm import UGICM, ConditionalSynthesis, ConditionedBlock, fourier_features

__all__ = ["UGICM", "ConditionalSynthesis", "ConditionedBlock", "fourier_features"]
