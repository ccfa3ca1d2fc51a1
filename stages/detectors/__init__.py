"""Detectors (method registry, backbones, egre, lol); may import genimage, never features, runs, commands."""
