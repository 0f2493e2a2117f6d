"""Imaging layer: DICOM series to volumes with geometry, and synthetic phantoms."""
