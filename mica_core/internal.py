"""mica's internal API: what mica's own tools outside the core (the benchmarks, the trainer)
may import besides the public names of :mod:`mica_core`.

Modules whose name starts with ``_`` are private to ``mica_core``: only its own modules
import them (``tests/test_architecture.py`` checks it). A tool that genuinely needs one of
their capabilities imports it from here, so that every such use is listed in one place.
These names are not part of the public contract and may change between releases.

- :func:`available_threads`, :func:`threads_for`, :data:`PARALLEL_MIN_ROWS`,
  :func:`parallel_min_rows`: how many threads ``backend="auto"`` uses (``_autoselect``).
"""

from __future__ import annotations

from ._autoselect import PARALLEL_MIN_ROWS, available_threads, parallel_min_rows, threads_for

__all__ = ["PARALLEL_MIN_ROWS", "available_threads", "parallel_min_rows", "threads_for"]
