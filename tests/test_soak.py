"""A short soak with faults (bench/soak.py): 16 jobs, two at a time on a host with max_guests 2, kill -9
at seeded random points of prepare, launch and teardown, libvirtd restarted once half-way; then one
reap and the invariants. The full soak (200 jobs) runs from ``bench/run``."""

from __future__ import annotations

import os

import pytest

from bench import soak

pytest.importorskip("libvirt")

JOBS = 16
SEED = 8  # kills planned in every phase for these 16 jobs: prepare 3, launch 3, teardown 3


@pytest.mark.guest
def test_short_soak_with_kills_and_a_libvirtd_restart_leaks_nothing(demo_image):
    lines = []
    figures = soak.soak(JOBS, concurrency=2, max_guests=2, seed=SEED, log=lines.append)
    soak.print_figures(figures)
    assert figures["problems"] == [], figures["problems"]
    assert figures["leaked"] == dict(guests=0, clones=0, slots=0)
    assert sum(figures["outcomes"].values()) == JOBS
    assert set(figures["kills_planned"]) == {"prepare", "launch", "teardown"}
    assert sum(figures["kills"].values()) >= 3, figures["kills"]  # kills land (a phase may end first)
    assert figures["outcomes"].get("ran", 0) >= 1, figures["outcomes"]
    assert figures["libvirtd_down_seconds"] is not None
    assert os.path.exists(soak.LIBVIRTD_PID)
    with open(soak.LIBVIRTD_PID) as stream:
        assert os.path.exists(f"/proc/{int(stream.read())}"), "libvirtd runs again afterwards"
