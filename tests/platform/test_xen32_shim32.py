"""Real Xen judges the shim: shim32's scenario on the Xen built from source (platform xen32shared) and on
``shim32 --abi 4.0`` must agree step for step, in rc and errno, normal and faulty.

Only what fixtures/README.md ("xen32shared: the shim's scenario on a real Xen") lists may differ:
- ``xen_version`` (and every multicall entry that calls it): the version word is the release's,
  0x40000 for the shim's 4.0 and 0x40011 for 4.17 (common/kernel.c, ``XEN_VERSION << 16 | XEN_SUBVERSION``);
  compared as "the version of the Xen that runs".
- ``int81`` is not run on xen32: QEMU's TCG, in long mode, gives the #GP of a refused software INT n the
  error code n * 16 + 2 (the CPU's is n * 8 + 2), from which Xen 4.17's do_general_protection
  (arch/x86/traps.c) reads vector 2; the guest leaves the step out there (guest/entry.S, user_code).
"""

from __future__ import annotations

import pytest
from conftest import build

pytestmark = pytest.mark.platform

NOT_ON_XEN32 = {"int81"}


def version_word(release: str) -> int:
    major, minor = release.split(".")
    return int(major) << 16 | int(minor)


def steps(res, version: int) -> list[tuple[str, int | str, str]]:
    """(step, rc, errno) in transcript order; the running Xen's version word reads as "version"."""
    t = res.transcript
    assert t.done and t.failed is None, res.stderr + res.stdout[-3000:]
    return [(s.name, "version" if s.rc == version else s.rc, s.errno) for s in t.steps.values()]


@pytest.mark.parametrize("faulty", [False, True], ids=["normal", "faulty"])
def test_transcripts_agree_step_for_step(platform_run, faulty: bool) -> None:
    real = platform_run("xen32shared", faulty=faulty)
    shim = platform_run("shim32", abi="4.0", faulty=faulty)
    real_steps = steps(real, version_word(build("xen32shared")["xen_release"]))
    shim_steps = steps(shim, version_word("4.0"))
    assert {name for name, _, _ in shim_steps} - {name for name, _, _ in real_steps} == NOT_ON_XEN32
    expected = [s for s in shim_steps if s[0] not in NOT_ON_XEN32]
    assert real_steps == expected
    # Both ran on the Xen they claim: 4.0 emulated, the release built from source.
    assert real.transcript.steps["xen_version"].fields["version"] == build("xen32shared")["xen_release"]
    assert shim.transcript.steps["xen_version"].fields["version"] == "4.0"


def test_the_timer_virq_is_the_generation_s(platform_run) -> None:
    # VIRQ_TIMER is 1 in Xen 2.0 and 0 from 3.0 (public/xen.h, RELEASE-2.0.0 / RELEASE-3.0.0, 4.0.0,
    # 4.17.0). The shim took 1 for every generation until the real Xen delivered no tick for it.
    real = platform_run("xen32shared")
    assert real.transcript.steps["evtchn.bind_virq"].fields["virq"] == "0"
    assert real.transcript.steps["event"].fields["port"] == real.transcript.steps["evtchn.bind_virq"].fields["port"]
    for abi, virq in (("2.0", "1"), ("3.0", "0"), ("4.0", "0")):
        t = platform_run("shim32", abi=abi).transcript
        assert t.steps["evtchn.bind_virq"].fields["virq"] == virq, abi
        assert t.steps["evtchn.bind_virq"].rc == 0, abi
