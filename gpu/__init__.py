"""orcd gpu package."""
