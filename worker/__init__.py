"""orcd worker package."""
