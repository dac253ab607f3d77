"""Image file checks. Imports only Pillow and the config, so worker processes start fast."""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from mmops.config import IMAGE_FORMATS, ImageLimits

# Absolute (POSIX or Windows) paths and any '..' component: images stay inside the dataset.
UNSAFE_PATH = r"^(?:/|\\|[A-Za-z]:)|(?:^|[/\\])\.\.(?:[/\\]|$)"
_UNSAFE_PATH_RE = re.compile(UNSAFE_PATH)


@dataclass(frozen=True)
class ImageInfo:
    """What inspecting one image found: either `problem` (a check name and message) or its facts."""

    path: str
    problem: str | None = None
    message: str = ""
    sha256: str = ""
    width: int = 0
    height: int = 0
    format: str = ""


def is_unsafe_path(relpath: str) -> bool:
    return bool(_UNSAFE_PATH_RE.search(relpath))


def inspect_image(root: str, relpath: str, limits: ImageLimits) -> ImageInfo:
    """Check one image of a dataset: inside it, present, of sane size, fully decodable."""
    return _inspect(os.path.realpath(root), relpath, limits)


def inspect_chunk(root: str, relpaths: list[str], limits: ImageLimits) -> list[ImageInfo]:
    real_root = os.path.realpath(root)
    return [_inspect(real_root, relpath, limits) for relpath in relpaths]


def _inspect(real_root: str, relpath: str, limits: ImageLimits) -> ImageInfo:
    # os.path rather than pathlib: this runs once per image, 100k times for a large dataset.
    if "\0" in relpath:  # os.path and open() raise on it rather than find no file
        return ImageInfo(relpath, "image.exists", "the path holds a NUL byte")
    resolved = os.path.realpath(os.path.join(real_root, relpath))
    if not resolved.startswith(real_root + os.sep):
        return ImageInfo(
            relpath, "image.inside_dataset", f"resolves outside the dataset: {resolved}"
        )
    try:
        with open(resolved, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limits.max_file_mb * 2**20:
                return ImageInfo(
                    relpath, "image.file_size", f"{size / 2**20:.1f} MiB > {limits.max_file_mb}"
                )
            data = f.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return ImageInfo(relpath, "image.exists", "file not found")
    except OSError as exc:  # a symlink loop, a permission problem
        return ImageInfo(relpath, "image.exists", f"cannot read: {exc}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if image.format not in IMAGE_FORMATS:
                expected = " or ".join(IMAGE_FORMATS)
                return ImageInfo(
                    relpath, "image.format", f"format {image.format}, expected {expected}"
                )
            problem = _dimension_problem(width, height, limits)
            if problem:
                return ImageInfo(relpath, "image.dimensions", problem)
            # Decode every pixel: a truncated or corrupt file fails here, not in a training worker.
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return ImageInfo(relpath, "image.dimensions", f"decompression bomb: {exc}")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return ImageInfo(relpath, "image.decodes", f"cannot decode: {exc}")
    return ImageInfo(
        relpath,
        sha256=hashlib.sha256(data).hexdigest(),
        width=width,
        height=height,
        format=image.format,
    )


def _dimension_problem(width: int, height: int, limits: ImageLimits) -> str | None:
    if width * height > limits.max_pixels:
        return f"{width}x{height} = {width * height} pixels > max_pixels {limits.max_pixels}"
    if max(width, height) > limits.max_side:
        return f"{width}x{height}: a side is longer than max_side {limits.max_side}"
    if min(width, height) < limits.min_side:
        return f"{width}x{height}: a side is shorter than min_side {limits.min_side}"
    return None
