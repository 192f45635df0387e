"""Compression of convolutional networks: DSF-conv, basis convolutions, sensitivity-based layer selection, batch-norm
re-estimation, the real CNNs and image sets of the experiments.

Modules: ``layers`` (which convs), ``calibration`` (Hessians of unfolded inputs), ``dsf_conv`` (DSF and
single-matrix solvers on convs, ``CNN_DSF_OPTIONS``), ``basis`` (basis convolutions), ``sensitivity``
(per-layer sensitivity and budgeted selection), ``finetune`` (short distillation), ``bn`` (batch-norm
re-estimation), ``metrics`` (parameters, MACs, accuracy, agreement), ``pipeline`` (``compress_cnn``, ``save_cnn``),
``data``, ``models`` and ``networks`` (MNIST digits, Fashion-MNIST, natural photos; ccexam MNIST CNN,
Fashion-MNIST CNN, EfficientNet-Lite0; each network with its data by name). Reload a saved model with
``dsf_runtime.conv.load_compressed_into``; export it to ONNX with ``exporters.onnx_cnn``.
"""

from compress.conv.pipeline import CNN_METHODS, CNNCompressConfig, CNNCompressResult, compress_cnn, save_cnn

__all__ = ["CNN_METHODS", "CNNCompressConfig", "CNNCompressResult", "compress_cnn", "save_cnn"]
