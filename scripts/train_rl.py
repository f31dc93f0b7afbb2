#!/usr/bin/env python
"""RL post-training from an SFT run (``recast-rl``; this file is kept so ``python scripts/train_rl.py`` works too)."""
from recast_ms.commands.rl import main

if __name__ == "__main__":
    main()
