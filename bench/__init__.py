"""Benchmarks of mica_core: ``python -m bench`` (see ``bench/__main__.py``) and
``python -m bench.torch_bench``. Results are written to ``bench/results/*.json``."""
