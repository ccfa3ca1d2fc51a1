"""Orchestration for the LaRE / LoL feature-cache pipeline: CLI, fingerprints, cache store, stage runner."""

__version__ = "0.1.0"
