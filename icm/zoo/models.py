"""Codecs (CompressAI), classifiers (torchvision) and CLIP (open_clip) by name + weights spec."""

from __future__ import annotations

import torchvision

from icm.zoo.registry import attach_provenance, register
from icm.zoo.weights import WeightsUnavailable, load_state_dict, resolve, seeded


def _compressai_hub(arch: str, quality: int):
    def url(spec: str) -> str:
        from compressai.zoo.image import model_urls as fixed_rate
        from compressai.zoo.image_vbr import model_urls as variable_rate

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
    from compressai.zoo import image_models
    from compressai.zoo.image import model_architectures

    if channels is None:
        return image_models[name](quality=quality, metric=metric, pretrained=False, **kwargs)
    arch = model_architectures.get(name) or model_architectures.get(name.replace("-", "_"))
    if arch is None:
        raise ValueError(f"channels= is supported for {sorted(model_architectures)}, not {name!r}")
    return arch(*channels, **kwargs)


def _register_codecs():
    from compressai.zoo import image_models

    def build_codec(name: str, quality: int = 3, weights: str = "random", metric: str = "mse",
                    channels: list[int] | None = None, **kwargs):
        """Any CompressAI image codec by architecture and quality (weights ``compressai:mse``
        resolve to CompressAI's published checkpoints). ``channels`` ([N, M], or [N] for
        cheng2020) builds the architecture at another width — small models for tests and demos."""
        from compressai.zoo.pretrained import load_pretrained

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

    register("codec", *image_models)(build_codec)

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

_register_codecs()


@register("classifier", *torchvision.models.list_models(module=torchvision.models))
def build_classifier(name: str, weights: str = "random", num_classes: int | None = None, **kwargs):
    """A torchvision classifier; ``torchvision:DEFAULT`` (or another enum tag) names its weights."""
    def hub(spec: str) -> str:
        return torchvision.models.get_model_weights(name)[spec.partition(":")[2] or "DEFAULT"].url

    resolved = resolve(weights, hub=hub, family=name)
    extra = {"num_classes": num_classes} if num_classes else {}
    with seeded(resolved.seed):
        model = torchvision.models.get_model(name, weights=None, **extra, **kwargs)
    if resolved.path is not None:
        model.load_state_dict(load_state_dict(resolved.path))
    attach_provenance(model, name, "torchvision-classifier", resolved)
    return model


@register("clip", "ViT-B-32", "ViT-B-16", "ViT-L-14", "RN50")
def build_clip(name: str = "ViT-B-32", weights: str = "random", **_):
    """An open_clip model. ``open_clip:<tag>`` (e.g. ``open_clip:openai``) names published weights,
    fetched by open_clip itself where a network exists; a local file is loaded with
    ``weights_only=True``; ``random`` gives an untrained model (only for tests)."""
    import open_clip

    resolved_spec = "random" if weights is None else str(weights)
    if resolved_spec.startswith("open_clip:"):
        tag = resolved_spec.partition(":")[2]
        try:
            model = open_clip.create_model(name, pretrained=tag)
        except Exception as exc:  # noqa: BLE001 - any hub failure is reported the same way
            raise WeightsUnavailable(
                f"cannot fetch CLIP weights {resolved_spec!r} for {name}: {exc}. Without a network, "
                "download the checkpoint elsewhere and pass its local path as the weights spec.") from exc
        from icm.zoo.weights import ResolvedWeights
        resolved = ResolvedWeights(resolved_spec, None, None, f"open_clip:{name}:{tag}")
    else:
        resolved = resolve(resolved_spec, family=name)
        with seeded(resolved.seed):
            model = open_clip.create_model(name, pretrained=None)
        if resolved.path is not None:
            model.load_state_dict(load_state_dict(resolved.path))
    model.eval()
    attach_provenance(model, name, "open_clip", resolved)
    return model
