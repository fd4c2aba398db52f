"""Two blahvm installations on one libvirtd (a test site beside production, two batch clusters whose
job ids both start at 1): neither's teardown ever removes the other's guest. test:///default."""

from __future__ import annotations

from blahvm.lifecycle import prepare, teardown
from blahvm.model import Outcome
from tests.test_lifecycle import POOL_PATH, domain_names, make_config, make_job


def test_teardown_leaves_another_installations_guest_of_the_same_job_id_alone(tmp_path, golden, keep_driver):
    ours = make_config(tmp_path / "ours", golden)
    theirs = make_config(tmp_path / "theirs", golden, pool="blahvm-theirs", pool_path=POOL_PATH + "-theirs")
    job = make_job("7")
    mine = prepare(ours, job, ready_timeout=None)
    assert mine.outcome is Outcome.OK
    assert teardown(ours, job.job_id).outcome is Outcome.OK  # our ledger keeps job 7, closed
    made = prepare(theirs, job, ready_timeout=None)  # their own job 7
    assert made.outcome is Outcome.OK
    try:
        again = teardown(ours, job.job_id)  # an epilogue run twice, a hand-run teardown with our config
        assert again.outcome is Outcome.OK and "left alone" in again.message, again
        assert made.guest in domain_names(keep_driver)
    finally:
        assert teardown(theirs, job.job_id).outcome is Outcome.OK
    assert made.guest not in domain_names(keep_driver)
