"""Runtime: packed sparse formats, the compressed-model directory, modules, kernels and the loader."""
