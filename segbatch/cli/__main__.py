"""``python -m segbatch.cli``: what Ray Jobs run on the cluster (``engine/submit.py``)."""

from segbatch.cli import main

main()
