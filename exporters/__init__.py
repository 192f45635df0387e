"""Exporters: a compressed model directory to other layouts, a dense fallback, or ONNX.

Modules (import the one you need; ``onnx`` and ``transformers`` load only with them):

* ``exporters.config``: ``ExportConfig`` (layout, dtype, block size, shard size), validated up front.
* ``exporters.layouts``: ``convert_layout`` / ``convert_layer`` (``dsf export --output DIR``).
* ``exporters.dense_fallback``: ``export_dense_fallback`` (``dsf export --dense-fallback``).
* ``exporters.onnx_export``: ``export_onnx``, ``layer_model`` (``dsf export --onnx FILE``).
* ``exporters.onnx_ops``: the ``ai.dsf`` operator domain and ``make_session`` (ONNX Runtime with its kernels).
* ``exporters.onnx_lowering``: ``lower_to_standard`` (``--lowering standard``).
* ``exporters.onnx_cnn``: ``export_cnn_onnx`` (compressed CNNs, standard operators only).
"""

__all__: list[str] = []
