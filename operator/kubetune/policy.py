"""The platform's license policy for datasets: one rule for the operator (before a pod is
scheduled) and the trainer (before a row is read). Pure: no I/O, no trainer imports."""

from __future__ import annotations

import re

from kubetune import api

# Placeholders that declare nothing: the gate wants the dataset's actual license.
_NOT_A_LICENSE = {"", "unknown", "none", "n/a", "na", "unspecified", "tbd", "todo", "?", "other"}
# Markers of licenses that forbid commercial use: CC *-NC-*, "non-commercial", research-only...
_NON_COMMERCIAL = re.compile(
    r"(^|[^A-Z])NC([^A-Z]|$)|NON[-_ ]?COMMERCIAL|RESEARCH[-_ ]?ONLY|ACADEMIC|PERSONAL[-_ ]?USE"
    r"|NO[-_ ]?COMMERCIAL|EVALUATION[-_ ]?ONLY",
)


def is_non_commercial(name: str) -> bool:
    return bool(_NON_COMMERCIAL.search(name.upper()))


def license_problem(license: api.LicenseSpec, policy: api.Policy) -> str | None:
    """Why the dataset's license fails the gate (a message naming the field), or None: a real
    license name, on the platform's allow-list when there is one, and compatible with the
    declared usage."""
    name = license.name.strip()
    if name.lower() in _NOT_A_LICENSE:
        return (
            f"spec.dataset.license.name: {license.name!r} is not a license: declare the "
            "dataset's license (an SPDX id such as CC-BY-4.0, or your agreement's name)"
        )
    if policy.allowedLicenses is not None:
        allowed = {a.strip().lower() for a in policy.allowedLicenses}
        if name.lower() not in allowed:
            listed = ", ".join(policy.allowedLicenses) or "none"
            return (
                f"spec.dataset.license.name: license {name!r} is not allowed by the platform "
                f"policy (allowed: {listed}); ask your platform team or use another dataset"
            )
    if license.usage == "commercial" and is_non_commercial(name):
        return (
            f"spec.dataset.license: {name!r} does not allow commercial use, but "
            "spec.dataset.license.usage is commercial; use data licensed for commercial use "
            "(or, if the model is not for commercial use, declare the real usage)"
        )
    return None
