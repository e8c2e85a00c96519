"""One-off measurements behind the docs (not part of the product); see docs/trainability.md."""
