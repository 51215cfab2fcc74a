"""Codecs by name + weights spec: CompressAI's image codecs, UG-ICM on them, and the adapted
codecs (Adapt-ICMH, dynamic adaptation). Imported on the first codec lookup
(``icm.zoo.registry.PROVIDERS``): CompressAI brings SciPy and torch_geometric, ~1.3 s of CPU that
a job building only detectors would pay in every actor."""

from __future__ import annotations

from compressai.zoo import image_models
from compressai.zoo.image import model_architectures
from compressai.zoo.image import model_urls as fixed_rate
from compressai.zoo.image_vbr import model_urls as variable_rate
from compressai.zoo.pretrained import load_pretrained

from icm.zoo.registry import attach_provenance, register
from icm.zoo.weights import WeightsUnavailable, load_state_dict, resolve, seeded


def _compressai_hub(arch: str, quality: int):
    def url(spec: str) -> str:
        model_urls = {**fixed_rate, **variable_rate}
        metric = spec.partition(":")[2] or "mse"
        try:
            urls = model_urls[arch][metric]
            return urls if isinstance(urls, str) else urls[quality]  # a *-vbr model has one URL
        except KeyError as exc:
            raise WeightsUnavailable(f"CompressAI publishes no {arch} weights for metric "
                                     f"{metric!r} at quality {quality}") from exc
    return url


VARIABLE_ENTROPY_BOTTLENECK = ("bmshj2018-hyperprior-vbr", "mbt2018-mean-vbr")


def _compressai_model(name: str, quality: int, metric: str, channels, **kwargs):
    if channels is None:
        return image_models[name](quality=quality, metric=metric, pretrained=False, **kwargs)
    arch = model_architectures.get(name) or model_architectures.get(name.replace("-", "_"))
    if arch is None:
        raise ValueError(f"channels= is supported for {sorted(model_architectures)}, not {name!r}")
    return arch(*channels, **kwargs)


@register("codec", *image_models)
def build_codec(name: str, quality: int = 3, weights: str = "random", metric: str = "mse",
                channels: list[int] | None = None, **kwargs):
    """Any CompressAI image codec by architecture and quality (weights ``compressai:mse``
    resolve to CompressAI's published checkpoints). ``channels`` ([N, M], or [N] for
    cheng2020) builds the architecture at another width — small models for tests and demos."""
    if name in VARIABLE_ENTROPY_BOTTLENECK:  # as CompressAI builds its published vbr models
        kwargs.setdefault("vr_entbttlnck", True)
    resolved = resolve(weights, hub=_compressai_hub(name, quality), family=name)
    with seeded(resolved.seed if resolved.path is None else 0):
        model = _compressai_model(name, quality, metric, channels, **kwargs)
    if resolved.path is not None:
        # The model's own load_state_dict resizes the entropy coders' CDF buffers.
        model.load_state_dict(load_pretrained(load_state_dict(resolved.path)))
    attach_provenance(model, f"{name}@q{quality}", "compressai", resolved)
    return model


@register("codec", "ugicm:")
def build_ugicm(name: str, quality: int = 3, weights: str = "random", metric: str = "mse",
                channels: list[int] | None = None, cond_dim: int = 512, base_weights: str | None = None,
                beta: float | None = None, **kwargs):
    """UG-ICM on a CompressAI codec: ``ugicm:<arch>``. ``weights`` is a UG-ICM checkpoint
    (this project's export, e.g. ``trained:<label>``) or ``random``; ``base_weights`` starts a
    new UG-ICM from a trained plain codec (its conditioned blocks start as the identity).
    ``beta``: the codec decoding at that β only, as a plain CompressAI codec
    (``UGICM.at_beta``) — e.g. the base that ``adapt_icmh:ugicm:<arch>`` or
    ``dynamic:ugicm:<arch>`` adapt."""
    from icm.codecs.ugicm import UGICM

    arch = name.partition(":")[2]
    resolved = resolve(weights, family=name)
    base = build_codec(arch, quality, base_weights or f"random:{resolved.seed or 0}", metric, channels, **kwargs)
    with seeded(resolved.seed if resolved.path is None else 0):
        model = UGICM(base, cond_dim=cond_dim)
    if resolved.path is not None:
        model.load_state_dict(load_state_dict(resolved.path))
    if beta is not None:
        model = model.at_beta(beta)
    attach_provenance(model, f"{name}@q{quality}" + ("" if beta is None else f"@beta{beta:g}"), "ugicm", resolved)
    return model


@register("codec", "adapt_icmh:", "dynamic:")
def build_adapted(name: str, quality: int = 3, weights: str = "random", metric: str = "mse",
                  channels: list[int] | None = None, base_weights: str | None = None, mid: int = 64,
                  post_channels: int = 64, **kwargs):
    """A CompressAI codec adapted for machines: ``adapt_icmh:<arch>`` (SFMA adapters, Adapt-ICMH)
    or ``dynamic:<arch>`` (post-decoder g_t, dynamic adaptation); ``<arch>`` may be
    ``ugicm:<arch>`` with ``beta`` (and ``cond_dim``): a UG-ICM codec at one of its decodes.
    ``base_weights``: the codec to adapt (e.g. ``compressai:mse`` or a trained file);
    ``weights``: a whole adapted checkpoint (this project's export) or ``random`` (adapters /
    g_t at their identity init)."""
    from icm.codecs.adapt_icmh import AdaptICMH
    from icm.codecs.dynamic import DynamicCodec

    kind, _, arch = name.partition(":")
    resolved = resolve(weights, family=name)
    builder = build_ugicm if arch.startswith("ugicm:") else build_codec   # a UG-ICM base at one β (its beta=)
    base = builder(arch, quality, base_weights or f"random:{resolved.seed or 0}", metric, channels, **kwargs)
    with seeded(resolved.seed if resolved.path is None else 0):
        model = AdaptICMH(base, mid=mid) if kind == "adapt_icmh" else DynamicCodec(base, post_channels)
    if resolved.path is not None:
        model.load_state_dict(load_state_dict(resolved.path))
    attach_provenance(model, f"{name}@q{quality}", kind, resolved)
    return model
