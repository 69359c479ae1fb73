"""Batch node states in cloudmap's terms (see :class:`cloudmap.nodes.ProviderNode`).

Batch says ``idle`` once our start task has exited 0, which it does only after the node
agent has launched its slots: so ``idle`` and ``running`` are cloudmap's ``ready`` (the
pool then tells idle from running by the scheduler). Batch's ``running`` means Batch tasks
run, which cloudmap does not use.
"""

from __future__ import annotations

BATCH_TO_PROVIDER = {
    "creating": "creating",
    "starting": "starting",
    "waitingforstarttask": "starting",
    "rebooting": "starting",
    "reimaging": "starting",
    "upgradingos": "starting",
    "idle": "ready",
    "running": "ready",
    "starttaskfailed": "start_failed",
    "preempted": "preempted",
    "leavingpool": "leaving",
    "deallocating": "leaving",
    "unusable": "unusable",
    "offline": "unusable",
    "unknown": "unusable",
    "deallocated": "unusable",
}


def provider_state(batch_state: object) -> str:
    """cloudmap's provider state for a Batch node state (unknown ones are unusable)."""
    value = getattr(batch_state, "value", batch_state)  # the SDK's enums print as Name.MEMBER
    return BATCH_TO_PROVIDER.get(str(value).lower(), "unusable")
