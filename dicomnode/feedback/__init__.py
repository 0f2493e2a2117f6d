"""Corrections that come back: corrected segmentations recognised and kept as training data."""
