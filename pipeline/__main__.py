"""`python -m pipeline`: the `pipeline` command (what `torchrun ... -m pipeline train ...` starts)."""

from pipeline.cli import main

main()
