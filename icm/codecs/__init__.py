"""The project's own codec parts, composed with CompressAI models: UG-ICM's β-conditioned decoder,
Adapt-ICMH's SFMA adapters, dynamic adaptation's post-decoder, and the coded-latent forward that
per-image latent refinement works on."""

from icm.codecs.adapt_icmh import SFMA, AdaptICMH
from icm.codecs.base import CodecWrapper
from icm.codecs.dynamic import DynamicCodec, PostDecoder
from icm.codecs.refine import coded_forward, coded_latent, compress_latent, refine_latent
from icm.codecs.ugicm import UGICM, ConditionalSynthesis, ConditionedBlock, fourier_features

__all__ = ["UGICM", "ConditionalSynthesis", "ConditionedBlock", "fourier_features", "SFMA", "AdaptICMH",
           "CodecWrapper", "DynamicCodec", "PostDecoder", "coded_forward", "coded_latent", "compress_latent",
           "refine_latent"]
