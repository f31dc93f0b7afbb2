#!/usr/bin/env python
"""Beam-search evaluation of a run (``recast-eval``; this file is kept so ``python scripts/evaluate.py`` works too)."""
from recast_ms.commands.evaluate import main

if __name__ == "__main__":
    main()
