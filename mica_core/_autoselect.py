"""Which compiled backend ``backend="auto"`` runs, by input size."""


def pick_backend(n_rows: int) -> str:
    return "cython"
