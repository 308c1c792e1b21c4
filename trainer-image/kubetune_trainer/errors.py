"""Errors the trainer turns into an exit code and a message a person can act on.

Every stage raises one of these with a message that names the cause and the spec field, e.g.
``spec.dataset.source: s3://data/x.jsonl: object not found``. The entry point catches
:class:`TrainerError`, writes the message to the termination log and exits with ``exit_code``;
the operator maps the code to a retry decision (user errors are never retried). Messages never
contain secret values: only the names of the fields and Secrets that hold them.
"""

from __future__ import annotations

from kubetune import api


class TrainerError(Exception):
    """Base: ``str(error)`` is what the user sees; ``exit_code`` is what the pod exits with."""

    exit_code: int = api.EXIT_INFRA_ERROR


class UserError(TrainerError):
    """Bad spec or data: retrying cannot help, the job fails at once."""

    exit_code = api.EXIT_USER_ERROR


class InfraError(TrainerError):
    """Storage, network or hardware trouble: the Job retries (from the last checkpoint)."""

    exit_code = api.EXIT_INFRA_ERROR


class Preempted(TrainerError):
    """SIGTERM arrived; a final checkpoint was committed. Retried, not counted as a failure."""

    exit_code = api.EXIT_PREEMPTED
