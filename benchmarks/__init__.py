"""Benchmark and GPU-check scripts (not part of the installed library).

Run them from the repository root as modules, e.g. ``python -m benchmarks.bench --quick``; the
library packages are imported as installed, or from ``PYTHONPATH``. ``benchmarks/gpu_checks.sh``
runs them on the GPU machine by target (``bash benchmarks/gpu_checks.sh OUTDIR bench``).
"""
