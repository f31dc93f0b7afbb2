"""recast_ms: ReCast (repair-then-contrast) GRPO-style RL for semantic-ID recommendation on MindSpore.

Stages, one module or package each: ``data`` -> ``rollout`` -> ``rewards`` / ``signals`` -> ``trainer`` ->
``metrics``; every Qwen3 graph (MindFormers' model, its CPU patches, the KV decode graphs) is in ``models``;
the console commands are in ``commands``.
"""
__version__ = "0.1.0"
