"""The Slurm health check's decisions (pure): when to drain, resume, and how many guest slots to offer."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from blahvm.batch.slurm import node_updates, parse_node

job_ids = st.lists(st.integers(1, 40).map(str), max_size=8, unique=True)
states = st.sampled_from(["IDLE", "MIXED", "ALLOCATED", "IDLE+DRAIN", "MIXED+DRAIN", "DOWN+DRAIN", "DOWN"])
reasons = st.one_of(st.just(""), st.text(min_size=1, max_size=40).map(lambda text: "blahvm: " + text),
                    st.sampled_from(["Epilog error", "NHC: disk full", "maintenance"]))
problems = st.one_of(st.none(), st.text(min_size=1, max_size=300))


@given(state=states, reason=reasons, problem=problems, max_guests=st.integers(0, 8), live=job_ids,
       slurm=job_ids, gres=st.sampled_from(["blahvm:{}", "gpu:2,blahvm:{}", "(null)"]), count=st.integers(0, 8))
def test_node_updates(state, reason, problem, max_guests, live, slurm, gres, count):
    fields = {"State": state, "Reason": reason, "Gres": gres.format(count)}
    updates = node_updates("n1", fields, problem, max_guests, live, slurm)
    assert all(update[:2] == ["update", "NodeName=n1"] and len(update) in (3, 4) for update in updates)
    settings = [word for update in updates for word in update[2:]]
    drained = "DRAIN" in state
    if problem is not None:
        if drained:
            assert updates == []  # never overwrite a drain, ours or anyone's
        else:
            (drain,) = updates
            assert drain[2] == "State=DRAIN" and drain[3].startswith("Reason=blahvm: ")
            assert "\n" not in drain[3] and len(drain[3]) <= 200
        return
    assert ("State=RESUME" in settings) == (drained and reason.startswith("blahvm:"))  # only our own drain
    assert not any(word.startswith("State=DRAIN") for word in settings)
    gres_updates = [word for word in settings if word.startswith("Gres=")]
    if gres.startswith("blahvm"):
        wanted = max(0, max_guests - len(set(live) - set(slurm)))
        assert gres_updates == ([] if wanted == count else [f"Gres=blahvm:{wanted}"])
    else:
        assert gres_updates == []  # other GRES on the node: left to the admin


reason_text = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=60)


@given(state=states, gres=st.sampled_from(["blahvm:3", "(null)", "gpu:tesla:4(S:0),blahvm:1"]), reason=reason_text)
def test_parse_node_keeps_a_free_text_reason(state, gres, reason):
    reason = " ".join(reason.split()) or "x"
    line = (f"NodeName=n1 Arch=x86_64 CPUTot=2 Gres={gres} NodeAddr=10.0.0.1 State={state} Weight=1 "
            f"Partitions=vms ExtSensorsTemp=n/s Reason={reason} [root@2026-11-24T07:57:06]\n")
    assert parse_node(line) == {"State": state, "Gres": gres, "Reason": reason}
    assert "Reason" not in parse_node(line.split(" Reason=")[0])
