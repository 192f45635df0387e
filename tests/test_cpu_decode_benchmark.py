"""benchmarks/cpu_decode.py's coded rows: which factor gets which code format, and that the codes decode to the
factors within one quantization step."""

import torch

from benchmarks.cpu_decode import coded_factors
from benchmarks.e2e_models import random_dsf_factors


def test_int4_plus_int8_puts_the_factor_with_fewer_values_in_int8():
    A, B, _ = random_dsf_factors((96, 64), 0.5, torch.float32, "cpu", torch.Generator().manual_seed(0))
    small = "A" if int((A != 0).sum()) < int((B != 0).sum()) else "B"
    codes = coded_factors({"A": A, "B": B}, "int4+int8")
    for key, factor in (("A", A), ("B", B)):
        c, s = codes[key]
        assert c.dtype == torch.int8 and torch.equal(c != 0, (c != 0) & (factor != 0))
        if key == small:  # int8: one scale per row
            assert s.shape == (factor.shape[0],) and int(c.abs().max()) <= 127
            decoded = c.float() * s.float()[:, None]
        else:  # int4: one scale per 128 columns
            assert s.shape == (factor.shape[0], -(-factor.shape[1] // 128)) and int(c.abs().max()) <= 7
            decoded = c.float() * s.float().repeat_interleave(128, dim=1)[:, : factor.shape[1]]
        step = s.float().max()
        assert float((decoded - factor).abs().max()) <= 0.5 * float(step) + 1e-7, key
