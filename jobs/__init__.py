"""orcd jobs package."""
