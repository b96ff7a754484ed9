"""dora-verify: numerical analysis and verification of DoRA (weight-decomposed low-rank adaptation).

Public API (stable once documented in the README):

* ``dora_verify.sweep(shape=(8192, 2048), **options) -> dict``: run the error sweep, return the report.
* ``dora_verify.oracles``: ``compose_truth``, ``row_norm_truth``, ``scale_truth`` (tier 1 float64
  double-double with bounds, escalating to exact rationals).
* ``dora_verify.metrics.compare(approx, reference)``: every metric against an oracle reference.
* ``dora_verify.cases.make_case(regime, ...)``: seeded inputs per numerical regime.
* ``dora_verify.forms``: the compose and norm formulas under study, in any dtype.
* ``dora_verify.kernels``: the production kernels (see kernels/).
"""

from __future__ import annotations

__version__ = "0.1.0"


def sweep(shape=(8192, 2048), **options) -> dict:
    """Run the error sweep for W of ``shape`` = (d_out, d_in); ``options`` are the fields of
    ``dora_verify.sweep.SweepConfig`` (tokens, rank, alpha, dtype, seed, device, ...). Returns the
    report dict; write it with ``dora_verify.report.write_report(report, out_dir)``."""
    from .sweep import SweepConfig, run_sweep

    return run_sweep(SweepConfig(d_out=int(shape[0]), d_in=int(shape[1]), **options))
