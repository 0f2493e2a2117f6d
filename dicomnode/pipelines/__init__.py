"""Pipelines: volume -> model bundles -> masks, findings and measurements."""
