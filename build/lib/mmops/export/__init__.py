"""ONNX export, INT8 quantization and the parity gate that picks what serves."""
