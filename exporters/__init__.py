"""Exporters: compressed factors to packed safetensors directories, dense fallbacks and ONNX."""
