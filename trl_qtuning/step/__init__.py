"""One optimizer step, in the order the trainer runs it: score (scoring), decide (decision), apply (batch, packing),
report (metrics); the collator that carries row ids, and the event the listeners hear (events)."""
