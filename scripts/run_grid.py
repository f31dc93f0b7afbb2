#!/usr/bin/env python
"""The experiment grid (``recast-grid``; this file is kept so ``python scripts/run_grid.py`` works too)."""
from recast_ms.commands.grid import main

if __name__ == "__main__":
    main()
