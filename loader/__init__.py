"""orcd loader package."""
