"""Run plumbing (cache data, batches, checkpoints, calibration, records); may import genimage, features,
detectors."""
