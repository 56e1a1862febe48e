"""How hard the property tests try.  Under mutation testing (tools/mutation.py sets XENDBG_MUTATION)
every mutant reruns them, so they draw a tenth of the examples, from a fixed seed: a mutant's
verdict is then the same on every run."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

MUTATION = bool(os.environ.get("XENDBG_MUTATION"))


def budget(examples: int, *health_checks: HealthCheck) -> settings:
    return settings(max_examples=max(10, examples // 10) if MUTATION else examples, deadline=None,
                    derandomize=MUTATION, suppress_health_check=[HealthCheck.too_slow, *health_checks])
