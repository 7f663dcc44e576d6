"""Re-export of the package's offline test builders (kept as a module so conftest imports stay short)."""

from trl_qtuning.testing import make_arithmetic_dataset, make_tiny_model, make_tiny_tokenizer  # noqa: F401
