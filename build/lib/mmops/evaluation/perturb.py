"""Perturbations for the robustness figures: pixel noise, blur and typos."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from mmops.model.preprocess import ImageTransform, TextTransform


def gaussian_noise(std: float, rng: np.random.Generator) -> ImageTransform:
    """Add Gaussian noise of `std` (in 0..1 pixel units) to every pixel."""

    def apply(image: Image.Image) -> Image.Image:
        pixels = np.asarray(image, dtype=np.float32)
        noisy = pixels + rng.normal(0, std * 255, pixels.shape)
        return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))

    return apply


def blur(radius: float) -> ImageTransform:
    """Gaussian blur of `radius` pixels."""
    return lambda image: image.filter(ImageFilter.GaussianBlur(radius))


def typos(rate: float, rng: np.random.Generator) -> TextTransform:
    """Swap, drop or replace one letter in a `rate` share of the words."""
    letters = "abcdefghijklmnopqrstuvwxyz"

    def typo(word: str) -> str:
        if len(word) < 2 or rng.random() >= rate:
            return word
        i = int(rng.integers(0, len(word) - 1))
        kind = rng.integers(0, 3)
        if kind == 0:
            return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        if kind == 1:
            return word[:i] + word[i + 1 :]
        return word[:i] + letters[int(rng.integers(0, 26))] + word[i + 1 :]

    def apply(text: str) -> str:
        return " ".join(typo(word) for word in text.split(" "))

    return apply
