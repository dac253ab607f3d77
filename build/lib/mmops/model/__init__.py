"""The multimodal classifier, its preprocessing and its on-disk folder format."""
