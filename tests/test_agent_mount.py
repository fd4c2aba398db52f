"""The agent's ``mount`` request: root's way to give a restored guest the job's directory.

A real mount needs a guest (tests/test_templates.py restores one with a working directory); here
the agent runs on the host and every refusal is checked: the same path rules as the host's
``check_workdir``, the control port only, before the bind only.
"""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blahvm.guest import agent, control
from blahvm.guest.client import AgentError
from blahvm.guest.protocol import agent_socket_path
from blahvm.image import guest_init
from tests.test_agent_exec import NOBODY, agent_in_tmpdir
from tests.test_jobfiles import BAD_PATHS


def _host_accepts(path):
    try:
        guest_init.check_workdir(path)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("case", sorted(BAD_PATHS))
def test_the_agent_refuses_the_paths_the_host_refuses(case):
    assert not _host_accepts(BAD_PATHS[case])
    assert agent.workdir_problem(BAD_PATHS[case]) is not None


@settings(max_examples=200, deadline=None)
@given(path=st.one_of(st.text(max_size=40), st.lists(st.sampled_from(["", ".", "..", "a", "ü", "\n", "b c"]),
                                                       max_size=5).map("/".join)))
def test_the_agent_and_the_host_agree_on_every_path(path):
    assert (agent.workdir_problem(path) is None) == _host_accepts(path)
    assert agent.MAX_WORKDIR_BYTES == guest_init.MAX_WORKDIR_BYTES
    assert agent.MOUNT_OPTIONS == guest_init.WORKDIR_MOUNT_OPTIONS


@pytest.fixture
def unbound():
    with agent_in_tmpdir(None, sockets=1) as directory:
        yield directory


@pytest.mark.parametrize("tag, path, why", [
    ("blahvm-workdir", "/home/u/../root", "normalised"),
    ("blahvm-workdir", "/home/u\nx", "control characters"),
    ("blahvm-workdir", "relative", "normalised"),
    ("-o", "/home/u", "plain name"),
    ("a" * 37, "/home/u", "plain name"),
])
def test_a_bad_mount_request_is_refused(unbound, tag, path, why):
    with pytest.raises(AgentError, match=why):
        control.mount(os.path.join(unbound, "control.sock"), tag, path, timeout=30)
    assert not os.path.exists(path) or path == "/home/u"


def test_mount_is_served_on_the_control_port_alone_and_never_after_the_bind(unbound):
    with pytest.raises(AgentError, match="not served"):  # the job's own socket cannot ask for it
        control.mount(agent_socket_path(unbound, 0), "blahvm-workdir", "/nonexistent/job", timeout=30)
    ctl = os.path.join(unbound, "control.sock")
    control.bind(ctl, NOBODY, timeout=30)
    with pytest.raises(AgentError, match="before the guest is bound, never after"):
        control.mount(ctl, "blahvm-workdir", "/nonexistent/job", timeout=30)
    assert not os.path.exists("/nonexistent/job")
