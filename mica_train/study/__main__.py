"""``python -m mica_train.study`` is ``mica study``."""

from .cli import main

raise SystemExit(main())
