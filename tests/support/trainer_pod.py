"""The trainer's Job and its one pod after the trainer exited, as the status computation reads
them: for the tests of what travels in the termination message."""

from __future__ import annotations

from typing import Any


def ended(message: str, *, exit_code: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(Job, pods) after the trainer container exited with ``exit_code`` and termination
    message ``message``: 0 completes the Job; anything else fails it (backoff limit reached)."""
    if exit_code == 0:
        status: dict[str, Any] = {
            "succeeded": 1,
            "conditions": [{"type": "Complete", "status": "True"}],
        }
        phase, reason = "Succeeded", "Completed"
    else:
        status = {
            "failed": 4,
            "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}],
        }
        phase, reason = "Failed", "Error"
    job = {"metadata": {"name": "x-trainer"}, "spec": {}, "status": status}
    terminated = {"exitCode": exit_code, "reason": reason, "message": message}
    pod = {
        "metadata": {"creationTimestamp": "2026-12-01T11:00:00Z"},
        "spec": {"containers": [{"name": "trainer"}]},
        "status": {
            "phase": phase,
            "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}],
        },
    }
    return job, [pod]
