"""Drop-in adapters for training frameworks.

- :mod:`mica_core.integrations.verl`: verl advantage estimators (``mica``, ``mica_turn``, ...)
  with verl's estimator signature, registered with verl when it is importable.
- :mod:`mica_core.integrations.trl`: ``MicaGRPOTrainer``, TRL's GRPO trainer with mica's
  per-turn advantages on each turn's tokens (TRL is imported on first use of the trainer).

Importing this package imports no framework; each adapter module imports its own.
"""
