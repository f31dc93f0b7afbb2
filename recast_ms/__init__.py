"""recast_ms: ReCast (repair-then-contrast) GRPO-style RL for semantic-ID recommendation on MindSpore.

Stages, one module or package each: ``data`` -> ``rollout`` -> ``signals`` -> ``trainer`` -> ``metrics``.
"""
__version__ = "0.1.0"
