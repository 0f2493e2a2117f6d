"""Training module (TensorFlow): architectures, DICOM datasets, training, evaluation."""
