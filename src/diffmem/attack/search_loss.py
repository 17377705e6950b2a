"""The loss a Dori search reached, which the robustness table reports and adversarial fine-tuning records per round.

It lives in a module of its own so that `diffmem.mitigations.adversarial` does not import `diffmem.attack.table`
(the table runs every mitigation, adversarial fine-tuning among them): that import made the two a circle.
"""

from __future__ import annotations


def final_search_loss(losses: list[float]) -> float:
    """The loss a Dori search reached: the mean of its last 10 steps (the per-step loss is one noisy batch)."""
    tail = losses[-10:]
    return sum(tail) / len(tail)
