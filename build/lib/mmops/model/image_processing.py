"""Image preprocessing as a checkpoint defines it: resize, centre crop, rescale and normalise.

An `ImageSpec` holds what a transformers image processor config says (CLIP, SigLIP, ViT) or, for
the models built from scratch, what mmops always did; one implementation (Pillow resampling and
numpy arithmetic) turns an image into the model's tensor in training, evaluation, export and
serving, and gives the same `pixel_values` as the checkpoint's own image processor. It needs no
torch: the lean serving install preprocesses with it.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, fields
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmops.config import IMAGE_FORMATS, ModelConfig

# The key of the spec in a saved model's meta (mmops.model.storage).
SPEC_KEY = "image_spec"

RESAMPLES = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")

# Reduced-size JPEG decoding keeps at least this many decoded pixels per resized pixel a side.
# libjpeg's scaled decode upsamples chroma more coarsely than its full decode, and the resize
# must average that away. bench/image_decode.py, photo-like JPEGs of 1600 to 4000 pixels, CLIP,
# SigLIP and default specs: at 3x the tensor is 1-6 levels of 255 from the full decode's at
# most, never more than one level above what JPEG (quality 90) itself changes; at 2x, up to
# five times JPEG's own (README, "Export and prediction").
DRAFT_FACTOR = 3

# An image decoded at reduced size carries, in its `info`, the size of the file's image, the box
# that covers in the decoded pixels and the decoded size: libjpeg rounds a partial block up to a
# whole pixel, and the resize must map the file's edges, not the rounded ones. (Pillow copies
# `info` to a resized copy too: the decoded size tells that the box no longer applies.)
DRAFT_INFO = "mmops.draft"

_NOT_ACCEPTED = f"not an image in an accepted format ({' or '.join(IMAGE_FORMATS)})"

_HALF = (0.5, 0.5, 0.5)
_HF_KEYS = ("do_pad", "crop_pct", "do_reduce_labels")


@dataclass(frozen=True)
class ImageSpec:
    """How an image becomes a (3, image_size, image_size) tensor.

    Resize to exactly `size` (height, width), or the shorter side to `shortest_edge` keeping the
    aspect; then an optional centre `crop` (height, width); then `pixel * rescale`, normalised
    by `mean` and `std` per channel.
    """

    size: tuple[int, int] | None = None
    shortest_edge: int | None = None
    crop: tuple[int, int] | None = None
    mean: tuple[float, ...] = _HALF
    std: tuple[float, ...] = _HALF
    rescale: float = 1 / 255
    resample: str = "bilinear"

    def __post_init__(self) -> None:
        if (self.size is None) == (self.shortest_edge is None):
            raise ValueError("image spec: give one of size and shortest_edge")
        if self.shortest_edge is not None and self.crop is None:
            raise ValueError("image spec: a shortest_edge resize needs a crop, for a fixed size")
        sides = [*(self.size or ()), *(self.crop or ()), self.shortest_edge or 1]
        if not all(isinstance(s, int) and s >= 1 for s in sides):
            raise ValueError(f"image spec: sizes must be positive integers, got {self}")
        height, width = self.shape
        if height != width:
            raise ValueError(f"image spec: the model takes square images, got {height}x{width}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"image spec: mean and std need 3 channels, std > 0; got {self}")
        if self.resample not in RESAMPLES:
            raise ValueError(f"image spec: resample {self.resample!r} is not one of {RESAMPLES}")

    @classmethod
    def default(cls, image_size: int) -> ImageSpec:
        """What mmops did before specs: a bilinear resize to a square, pixels to [-1, 1]."""
        return cls(size=(image_size, image_size))

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> ImageSpec:
        """The spec of a checkpoint's image processor; without one, its config's image size."""
        from transformers import AutoConfig, AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(name_or_path)
        except OSError:  # no preprocessor_config.json beside the weights
            config = AutoConfig.from_pretrained(name_or_path)
            size = getattr(getattr(config, "vision_config", config), "image_size", None)
            if not isinstance(size, int):
                raise ValueError(
                    f"{name_or_path}: no image processor config and no image_size in its config"
                ) from None
            return cls.default(size)
        return cls.from_processor_dict(processor.to_dict(), name_or_path)

    @classmethod
    def from_processor_dict(cls, config: dict[str, Any], name: str = "processor") -> ImageSpec:
        """The spec of a transformers image processor's `to_dict()`."""
        unsupported = [key for key in _HF_KEYS if config.get(key)]
        if unsupported or not config.get("do_resize", True):
            raise ValueError(f"{name}: image processor options mmops does not apply: {unsupported}")
        size = config["size"]
        crop = config.get("crop_size") if config.get("do_center_crop") else None
        if "shortest_edge" in size and size.get("longest_edge") is None:
            resize = {"shortest_edge": size["shortest_edge"]}
        elif "height" in size and "width" in size:
            resize = {"size": (size["height"], size["width"])}
        else:
            raise ValueError(f"{name}: image processor size {size} is not supported")
        rescale = config.get("rescale_factor", 1 / 255) if config.get("do_rescale", True) else 1.0
        normalize = config.get("do_normalize", True)
        value = config.get("resample")  # 0 is NEAREST: only None means unset
        resample = Image.Resampling(Image.Resampling.BILINEAR if value is None else int(value))
        return cls(
            **resize,
            crop=(crop["height"], crop["width"]) if crop else None,
            mean=_channels(config.get("image_mean", _HALF) if normalize else 0.0),
            std=_channels(config.get("image_std", _HALF) if normalize else 1.0),
            rescale=float(rescale),
            resample=resample.name.lower(),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageSpec:
        """A spec as `to_dict` wrote it (JSON turns its tuples into lists)."""
        known = {f.name for f in fields(cls)}
        if unknown := set(data) - known:
            raise ValueError(f"image spec: unknown keys {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the final tensor."""
        if self.crop is not None:
            return self.crop
        assert self.size is not None  # __post_init__: a size when no crop
        return self.size

    @property
    def image_size(self) -> int:
        """The side of the final (square) tensor: the model's `image_size`."""
        return self.shape[0]

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of an image of this size after the resize, before the crop."""
        if self.size is not None:
            return self.size[1], self.size[0]
        assert self.shortest_edge is not None
        edge = self.shortest_edge
        # transformers' arithmetic (get_resize_output_image_size), to the pixel.
        if width <= height:
            return edge, int(edge * height / width)
        return int(edge * width / height), edge

    def draft_size(self, width: int, height: int) -> tuple[int, int]:
        """The smallest (width, height) a JPEG of this size may be decoded at: DRAFT_FACTOR
        times the resize's output, with the image's own aspect."""
        out_width, out_height = self.resized_size(width, height)
        scale = DRAFT_FACTOR * max(out_width / width, out_height / height)
        return math.ceil(width * scale), math.ceil(height * scale)

    @cached_property
    def _filter(self) -> Image.Resampling:
        return Image.Resampling[self.resample.upper()]

    @cached_property
    def _normalise(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-channel scale and shift, or None for mmops' own [-1, 1] arithmetic."""
        if self.mean == _HALF and self.std == _HALF and self.rescale == 1 / 255:
            return None
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return mean, std

    def array(self, image: Image.Image | None) -> np.ndarray:
        """The model's (3, H, W) float32 array of an RGB image; zeros for a missing one."""
        height, width = self.shape
        if image is None:
            return np.zeros((3, height, width), dtype=np.float32)
        source, box, decoded = image.info.get(DRAFT_INFO, (image.size, None, image.size))
        if decoded != image.size:
            source, box = image.size, None
        target = self.resized_size(*source)
        if image.size != target or box is not None:
            image = image.resize(target, self._filter, box=box)
        if self.crop is not None and image.size != (width, height):
            # transformers' centre: the extra pixel of an odd margin on the right and bottom;
            # Pillow pads a crop larger than the image with black, as transformers does.
            left, top = (image.width - width) // 2, (image.height - height) // 2
            image = image.crop((left, top, left + width, top + height))
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
        if self._normalise is None:
            # What mmops always computed (bit for bit), in numpy: the same float32 arithmetic
            # as torch's, without a dispatch per operation.
            pixels = pixels / np.float32(127.5) - np.float32(1.0)
        else:
            # transformers' order: rescale, then (x - mean) / std.
            mean, std = self._normalise
            pixels = (pixels * np.float32(self.rescale) - mean) / std
        return np.ascontiguousarray(pixels)


def open_image(
    source: str | Path | bytes, max_pixels: int | None = None, spec: ImageSpec | None = None
) -> Image.Image:
    """An RGB image from a path or encoded PNG or JPEG bytes, fully decoded.

    Only the formats validation accepts in a dataset are decoded (Pillow's other decoders never
    see the bytes); any other raises UnidentifiedImageError, an OSError. With `max_pixels`, the
    size is checked from the header first: a decompression bomb raises ValueError before any
    pixel is decoded. With the `spec` it is for, a JPEG of at least twice DRAFT_FACTOR times the
    spec's resize a side is decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself, keeping at
    least DRAFT_FACTOR times the resize.
    """
    name = "" if isinstance(source, bytes) else f"{source}: "
    try:
        image = Image.open(
            io.BytesIO(source) if isinstance(source, bytes) else source, formats=IMAGE_FORMATS
        )
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"{name}{_NOT_ACCEPTED}") from None
    except Image.DecompressionBombError as error:
        raise ValueError(str(error)) from None
    with image:
        # The JPEG opener hands a multi-picture JPEG on as format MPO, which validation refuses.
        if image.format not in IMAGE_FORMATS:
            raise UnidentifiedImageError(f"{name}{_NOT_ACCEPTED}, got {image.format}")
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise ValueError(
                f"{image.width}x{image.height} is {image.width * image.height} pixels, "
                f"over the limit of {max_pixels}"
            )
        if spec is not None and image.format == "JPEG":
            _draft(image, spec)
        image.load()
        return image.convert("RGB")


def _draft(image: Image.Image, spec: ImageSpec) -> None:
    want = spec.draft_size(image.width, image.height)
    # libjpeg scales by 1/2, 1/4 or 1/8 only; below 2 nothing changes, so nothing is asked
    # and a smaller JPEG decodes exactly as it always did.
    if min(image.width // want[0], image.height // want[1]) >= 2:
        source = image.size
        drafted = image.draft("RGB", want)
        if drafted is not None:
            image.info[DRAFT_INFO] = (source, drafted[1], image.size)


def as_spec(spec: ImageSpec | int) -> ImageSpec:
    """A spec as given, or the default spec at an int size."""
    if isinstance(spec, ImageSpec):
        return spec
    if isinstance(spec, int) and not isinstance(spec, bool):
        return _default_spec(spec)
    raise TypeError(f"expected an ImageSpec or an image size, got {type(spec).__name__}")


@cache
def _default_spec(image_size: int) -> ImageSpec:
    return ImageSpec.default(image_size)


def image_spec_for(config: ModelConfig) -> ImageSpec:
    """The spec a model trains with: its dual-encoder checkpoint's, else its vision
    checkpoint's, else the default at `model.image_size` (which a checkpoint overrides)."""
    named = config.checkpoint("vision")
    if named is None:
        return ImageSpec.default(config.image_size)
    from mmops.model.backbones import from_pretrained

    return from_pretrained(*named, ImageSpec.from_pretrained)


def image_spec_of(meta: dict[str, Any]) -> ImageSpec:
    """The spec a saved model's meta records; models saved before specs get the default."""
    if meta.get(SPEC_KEY) is not None:
        return ImageSpec.from_dict(meta[SPEC_KEY])
    return ImageSpec.default(int(meta["model"]["image_size"]))


def _channels(value: float | list[float] | tuple[float, ...]) -> tuple[float, ...]:
    # One number stands for all three channels, as in transformers.
    return (float(value),) * 3 if isinstance(value, int | float) else tuple(map(float, value))
