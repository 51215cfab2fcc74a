"""Classifiers (torchvision) and CLIP (open_clip) by name + weights spec (codecs: ``icm.zoo.codecs``)."""

from __future__ import annotations

import torchvision

from icm.zoo.registry import attach_provenance, register
from icm.zoo.weights import WeightsUnavailable, load_state_dict, resolve, seeded


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
