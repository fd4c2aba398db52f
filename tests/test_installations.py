"""Two blahvm installations on one libvirtd (a test site beside production, two batch clusters whose
job ids both start at 1): their guests never share a name (the state dir is in every name's hash),
and neither's teardown or reap ever removes the other's guest. test:///default."""

from __future__ import annotations

import pytest

from blahvm.hypervisor import naming
from blahvm.ledger import Ledger
from blahvm.lifecycle import _bringup, _common, prepare, reap, teardown
from blahvm.model import Outcome
from tests.test_lifecycle import (
    POOL_PATH,
    assert_nothing_left,
    domain_names,
    guest_of,
    live_entries,
    make_config,
    make_job,
    run_dirs,
    volume_names,
)


def two_installations(tmp_path, golden):
    ours = make_config(tmp_path / "ours", golden)
    theirs = make_config(tmp_path / "theirs", golden, pool="blahvm-theirs", pool_path=POOL_PATH + "-theirs")
    return ours, theirs


@pytest.fixture
def old_naming(monkeypatch):
    """prepare as blahvm did before names carried the installation (an installation not yet upgraded,
    or a job prepared before the upgrade): its guest gets the legacy name of the job id alone."""
    monkeypatch.setattr(_bringup, "job_names", _common.legacy_job_names)
    return monkeypatch


def test_a_guest_name_carries_its_installation_and_stays_short_and_safe():
    a, b = naming.guest_name("7", "/var/lib/blahvm"), naming.guest_name("7", "/srv/test-site/state")
    assert a != b and a.startswith("blahvm-7-") and b.startswith("blahvm-7-")
    assert a == naming.guest_name("7", "/var/lib/blahvm/")  # the same dir however it is written
    assert naming.guest_name("7") == naming.legacy_guest_name("7") not in (a, b)
    assert naming.guest_names("7", "/var/lib/blahvm") == (a, naming.legacy_guest_name("7"))
    long = naming.guest_name("../../" + "x" * 500, "/var/lib/blahvm")
    assert naming.SAFE_NAME.match(long) and len(long) == len(naming.guest_name("../../" + "x" * 500))


def test_two_installations_job_7_get_different_guests_and_both_run_at_once(tmp_path, golden, keep_driver):
    ours, theirs = two_installations(tmp_path, golden)
    job = make_job("7")
    mine = prepare(ours, job, ready_timeout=None)
    assert mine.outcome is Outcome.OK, mine
    made = prepare(theirs, job, ready_timeout=None)  # their own job 7, while ours runs
    assert made.outcome is Outcome.OK, made
    try:
        assert mine.guest == guest_of(ours, "7") != made.guest == guest_of(theirs, "7")
        assert {mine.guest, made.guest} <= domain_names(keep_driver)
        assert volume_names(ours, keep_driver) == {mine.guest + ".qcow2"}
        assert volume_names(theirs, keep_driver) == {made.guest + ".qcow2"}
        assert _common.job_names(ours, "7").run_dir != _common.job_names(theirs, "7").run_dir
        assert teardown(ours, "7").outcome is Outcome.OK
        assert made.guest in domain_names(keep_driver) and mine.guest not in domain_names(keep_driver)
        assert reap(ours).guests == ()  # theirs is not ours to reap either
        assert made.guest in domain_names(keep_driver)
    finally:
        assert teardown(theirs, "7").outcome is Outcome.OK
    assert_nothing_left(ours, keep_driver)
    assert_nothing_left(theirs, keep_driver)


def test_teardown_leaves_another_installations_guest_of_the_same_name_alone(tmp_path, golden, keep_driver,
                                                                             old_naming):
    """An installation not yet upgraded still names its job 7's guest after the id alone: a teardown
    of ours that finds that name (our closed job 7, an epilogue run twice) checks the metadata first."""
    ours, theirs = two_installations(tmp_path, golden)
    job = make_job("7")
    assert prepare(ours, job, ready_timeout=None).outcome is Outcome.OK
    assert teardown(ours, job.job_id).outcome is Outcome.OK  # our ledger keeps job 7, closed
    made = prepare(theirs, job, ready_timeout=None)  # their own job 7, named the old way
    assert made.outcome is Outcome.OK and made.guest == naming.legacy_guest_name("7")
    old_naming.undo()  # ours is upgraded
    try:
        again = teardown(ours, job.job_id)
        assert again.outcome is Outcome.OK and "left alone" in again.message, again
        assert made.guest in domain_names(keep_driver)
    finally:
        assert teardown(theirs, job.job_id).outcome is Outcome.OK  # recognised by its recorded name
    assert made.guest not in domain_names(keep_driver)
    assert_nothing_left(theirs, keep_driver)


def test_an_upgrade_leaves_no_orphan_of_a_job_prepared_with_the_old_name(tmp_path, golden, keep_driver, old_naming):
    ours, _ = two_installations(tmp_path, golden)
    old, crashed = make_job("old.1"), make_job("old.2")
    first = prepare(ours, old, ready_timeout=None)
    assert first.outcome is Outcome.OK and first.guest == naming.legacy_guest_name("old.1")
    assert prepare(ours, crashed, ready_timeout=None).outcome is Outcome.OK
    old_naming.undo()  # blahvm upgraded while both jobs run
    assert reap(ours, dry_run=True).guests == () and reap(ours).guests == ()  # both still live: nothing is an orphan
    assert {entry.guest for entry in live_entries(ours)} == {first.guest, naming.legacy_guest_name("old.2")}
    assert _common.job_names_in_use(ours, "old.1").run_dir == first.run_dir  # launch finds its agent
    again = prepare(ours, old, ready_timeout=None)  # a prepare run twice reuses the old guest
    assert again.outcome is Outcome.OK and again.reused and again.guest == first.guest, again
    done = teardown(ours, "old.1")
    assert done.outcome is Outcome.OK and done.guest_removed, done  # blahvm's own guest, not a static lease
    # a crash after the ledger closed the entry: the old-named guest is still found by its job id
    with Ledger(ours.host) as ledger:
        entry = ledger.get("old.2")
        ledger.close("old.2", Outcome.OK, expected_version=entry.version)
    assert naming.legacy_guest_name("old.2") in domain_names(keep_driver)
    left = teardown(ours, "old.2")
    assert left.outcome is Outcome.OK and left.guest_removed, left
    assert_nothing_left(ours, keep_driver)
    assert run_dirs(ours) == set()
