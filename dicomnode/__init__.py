"""dicomnode: a DICOM node that runs ONNX models on studies and returns SEG and TID 1500 SR."""

__version__ = "0.1.0"
