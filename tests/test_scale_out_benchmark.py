"""The cost model of benchmarks/scale_out.py: the 70B projection's units and wall time, and the 2-rank solve wall of
a run's report, against hand-computed values."""

from __future__ import annotations

import json

import pytest

from benchmarks import scale_out


def test_projection_solves_gate_and_up_apart_and_adds_up():
    solver_speed = json.loads(scale_out.SOLVER_SPEED.read_text())
    projection = scale_out.project_llama70b(solver_speed)
    units = projection["unit_solve_s"]
    assert list(units) == ["q", "k+v", "o", "gate", "up", "down"]  # gate and up: 28672×8192 > 2^26 weights each
    a, b = scale_out.fit_solve_time(solver_speed)
    assert units["gate"] == pytest.approx(a * 8192**2 * 28672 + b * 8192**3)
    assert units["k+v"] == pytest.approx(2 * (a * 1024**2 * 8192 + b * 1024**3))
    block = projection["per_block_s"]
    # 8 ranks: the six units land on six ranks, the largest unit is the critical path
    assert block["solve_wall"] == pytest.approx(max(units.values()))
    assert sorted(block["rank_loads"], reverse=True) == pytest.approx(sorted(units.values(), reverse=True) + [0, 0])
    parts = block["solve_wall"] + block["hessian_and_factor_comm"] + block["forwards"] + block["weights_to_gpu"]
    assert block["total"] == pytest.approx(parts)
    assert projection["hours"] == pytest.approx((scale_out.ASSUMPTIONS["model_load_s"] + 80 * block["total"]) / 3600)


def _row(name: str, shape: tuple[int, int], seconds: float) -> dict:
    return {"name": name, "shape": list(shape), "seconds": seconds}


def test_solve_wall_bin_packs_a_reports_units_per_block():
    report = {"layer_errors": {"layers": [
        _row("b.0.self_attn.q_proj", (8, 8), 3.0), _row("b.0.self_attn.k_proj", (2, 8), 0.5),
        _row("b.0.self_attn.v_proj", (2, 8), 0.5), _row("b.0.self_attn.o_proj", (8, 8), 3.0),
        _row("b.0.mlp.gate_proj", (16, 8), 2.0), _row("b.0.mlp.up_proj", (16, 8), 2.0),
        _row("b.0.mlp.down_proj", (8, 16), 4.0),
        _row("b.1.self_attn.q_proj", (8, 8), 1.0), _row("b.1.self_attn.k_proj", (2, 8), 1.0),
        _row("b.1.self_attn.v_proj", (2, 8), 1.0), _row("b.1.self_attn.o_proj", (8, 8), 1.0),
        _row("b.1.mlp.gate_proj", (16, 8), 1.0), _row("b.1.mlp.up_proj", (16, 8), 1.0),
        _row("b.1.mlp.down_proj", (8, 16), 1.0),
    ]}}
    units = scale_out.block_units(report)
    assert units["b.0"] == [(1, 8, 8, 3.0), (2, 2, 8, 1.0), (1, 8, 8, 3.0), (2, 16, 8, 4.0), (1, 8, 16, 4.0)]
    assert scale_out.solve_wall(units, 1) == pytest.approx(15.0 + 7.0)
    # 2 ranks, owners by the proxy cost members·out·in·min(out, in): gate+up 2048, down 1024, q 512, o 512, k+v 64
    # -> rank 0: gate+up, k+v; rank 1: down, q, o. Block 0: max(4 + 1, 4 + 3 + 3) = 10; block 1: max(2 + 2, 3) = 4
    assert scale_out.solve_wall(units, 2) == pytest.approx(10.0 + 4.0)
    factors = {(1, 8, 8): 2.0, (2, 2, 8): 1.0, (2, 16, 8): 1.5, (1, 8, 16): 1.0}
    assert scale_out.solve_wall(units, 2, factors) == pytest.approx(max(6 + 1, 4 + 6 + 6) + max(3 + 2, 1 + 2 + 2))
