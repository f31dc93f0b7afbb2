#!/usr/bin/env python
"""The main job on the embedded default (``recast-main``; this file is kept so ``python scripts/run_main.py`` works too)."""
from recast_ms.commands.main import main

if __name__ == "__main__":
    main()
