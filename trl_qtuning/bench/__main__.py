"""``python -m trl_qtuning.bench --config MATRIX.yaml``."""

from .cli import main

raise SystemExit(main())
