"""Loaded by every Python subprocess a test starts with this folder on PYTHONPATH: loopback only."""

import loopback

loopback.install()
