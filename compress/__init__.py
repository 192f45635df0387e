"""Compression: layer solvers (DSF, SparseGPT, Wanda, magnitude), calibration and evaluation."""
