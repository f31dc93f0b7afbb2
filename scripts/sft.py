#!/usr/bin/env python
"""Supervised warm start (``recast-sft``; this file is kept so ``python scripts/sft.py`` works too)."""
from recast_ms.commands.sft import main

if __name__ == "__main__":
    main()
