"""What each stage computes, in layers that import one way (tests/system/test_layers.py): genimage (the data),
features (the LaRE and pixel recipe), detectors, runs (cache data, batches, checkpoints), and a module
per command on top (extract with extract_dask, train, evaluate, report, detect, robustness)."""
