"""Drop-in adapters for training frameworks.

- :mod:`mica_core.integrations.verl`: verl advantage estimators (``mica``, ``mica_turn``, ...)
  with verl's estimator signature, registered with verl when it is importable.

Importing this package imports no framework; each adapter module imports its own.
"""
