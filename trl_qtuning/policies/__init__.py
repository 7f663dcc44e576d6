"""Selection methods, one small class each: Q-Tuning and the baselines it is compared with.

``QTuningConfig(sample_policy=..., token_policy=...)`` picks them by name; :func:`build_policy` builds the pair.
To add one, subclass :class:`SamplePolicy` or :class:`TokenPolicy` and decorate it with ``register_*``.
"""

from . import samples, tokens  # noqa: F401  (registers the built-in policies)
from .base import (
    SAMPLE_POLICIES, TOKEN_POLICIES, Policy, SampleBatch, SampleDecision, SamplePolicy, TokenBatch, TokenPolicy,
    build_policy, method_name, register_sample_policy, register_token_policy, select_qtuning,
)  # fmt: skip

__all__ = [
    "SAMPLE_POLICIES", "TOKEN_POLICIES", "Policy", "SampleBatch", "SampleDecision", "SamplePolicy", "TokenBatch",
    "TokenPolicy", "build_policy", "method_name", "register_sample_policy", "register_token_policy", "select_qtuning",
]  # fmt: skip
