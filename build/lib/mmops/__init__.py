"""mmops: an MLOps platform for multimodal (image + text) models."""

__version__ = "0.1.0"
