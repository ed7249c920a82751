"""Data tools: validation before training, dataset versions and fingerprints, DICOM ingestion (torch-free)."""
