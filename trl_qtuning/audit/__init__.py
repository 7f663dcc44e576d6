"""``trl-qtuning audit``: the Error-Uncertainty plane as a lens on an SFT dataset, in one scoring pass.

``audit_dataset(model, dataset, ...)`` scores every row once with the trainer's own scoring forward and writes a
table (Parquet), the plane as a figure, a page of the most suspected rows and a summary; docs/audit.md says what each
holds and how well the suspicion score finds injected noise. The Q-Tuning core never imports this package.
"""

from .api import AuditInputError, AuditResult, AuditSettings, audit_dataset, load_audit_dataset, load_audit_model
from .detection import auroc, candidate_scores, detection_table, precision_at

__all__ = [
    "AuditInputError",
    "AuditResult",
    "AuditSettings",
    "audit_dataset",
    "auroc",
    "candidate_scores",
    "detection_table",
    "load_audit_dataset",
    "load_audit_model",
    "precision_at",
]
