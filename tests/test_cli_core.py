"""The ``blahvm`` command as an admin runs it: a real process, real files, exit codes that mean things."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from blahvm.routing.fast import cache_file, load_table

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "docs", "examples", "site.yaml")


def blahvm(*args, env_extra=None, cache_dir=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLAHVM_")}
    env["BLAHVM_CACHE_DIR"] = cache_dir or "/nonexistent/blahvm-cache"
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "blahvm.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_version():
    from blahvm import __version__

    assert blahvm("--version").stdout.strip() == f"blahvm {__version__}"


def test_check_valid_and_invalid(tmp_path):
    ok = blahvm("check", "--config", EXAMPLE)
    assert ok.returncode == 0 and "valid: 2 environments, 3 queues, 5 routes" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("host: {max_guests: many}\nqueues: {q: {max_walltime: soon}}\n")
    result = blahvm("check", "--config", str(bad))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{bad}:1: host.max_guests: expected a whole number of at least 1, got 'many'",
        f"{bad}:2: queues.q.max_walltime: duration 'soon': expected e.g. 90m, 10h, 2d, 1h30m or HH:MM:SS",
        "blahvm: the config has 2 problems",
    ]
    assert "Traceback" not in result.stderr


def test_config_comes_from_the_option_then_the_environment(tmp_path):
    missing = blahvm("check", env_extra={"BLAHVM_CONFIG": str(tmp_path / "nope.yaml")})
    assert missing.returncode == 2 and "nope.yaml: cannot read the config" in missing.stderr
    assert blahvm("check", "--config", EXAMPLE, env_extra={"BLAHVM_CONFIG": "/nope"}).returncode == 0


def test_route_exit_codes_and_json():
    routed = blahvm("route", "--config", EXAMPLE, "--user", "cms001", "--queue", "grid", "--walltime", "20h",
                    "--json")
    assert routed.returncode == 0
    assert json.loads(routed.stdout) == {
        "decision": "route", "queue": "long", "environment": "slc4", "rule": "cms-long", "reason": None,
        "vo": "cms", "memory": "2GiB", "vcpus": 1, "walltime": "20h", "resources": None,
    }
    rejected = blahvm("route", "--config", EXAMPLE, "--vo", "alice", "--json")
    assert rejected.returncode == 1
    assert json.loads(rejected.stdout)["reason"] == "no execution environment is offered to this VO; ask your " \
                                                    "site admin"
    bad = blahvm("route", "--config", EXAMPLE, "--memory", "lots")
    assert bad.returncode == 2 and bad.stderr.startswith("blahvm: size 'lots'")


def test_route_explain():
    result = blahvm("route", "--config", EXAMPLE, "--vo", "atlas", "--environment", "slc3", "--explain")
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        "  cms-short: no: queue not given (route wants grid)",
        "  cms-long: no: queue not given (route wants grid)",
        "  atlas-lhcb-legacy: matches",
        "route atlas-lhcb-legacy: queue long, environment slc3 (vo atlas, memory 1GiB, vcpus 1, walltime 2h)",
    ]


def test_lint_exit_codes(tmp_path):
    assert blahvm("lint", "--config", EXAMPLE).returncode == 0
    config = tmp_path / "site.yaml"
    config.write_text("environments: {e: {image: /e, flavour: kvm, memory: 1G, vcpus: 1}}\nqueues: {q: {}}\n"
                      "routes:\n  - {name: all, reject: closed}\n  - {name: late, queue: q, environment: e}\n")
    result = blahvm("lint", "--config", str(config))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "shadowed: route late can never match: route all above it takes every job it would"]


def test_the_route_cache_is_used_only_when_it_matches_and_is_trusted(tmp_path):
    cache = tmp_path / "cache"
    config = tmp_path / "site.yaml"
    config.write_text(open(EXAMPLE).read())
    table = load_table(str(config), str(cache))
    entry = cache_file(str(cache), str(config))
    assert os.path.exists(entry)
    assert load_table(str(config), str(cache)).data == table.data
    # a changed config is never answered from the old entry
    config.write_text(open(EXAMPLE).read().replace("max_guests: 3", "max_guests: 2").replace(
        "short: {max_walltime: 10h", "short: {max_walltime: 12h"))
    assert load_table(str(config), str(cache)).data != table.data
    # an entry others could have written is ignored, not believed
    os.chmod(entry, 0o666)
    assert load_table(str(config), None).data == load_table(str(config), str(cache)).data


def test_the_cached_path_answers_like_the_full_loader(tmp_path):
    first = blahvm("route", "--config", EXAMPLE, "--vo", "lhcb", "--memory", "1GiB", "--json",
                   cache_dir=str(tmp_path))
    second = blahvm("route", "--config", EXAMPLE, "--vo", "lhcb", "--memory", "1GiB", "--json",
                    cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) and first.stdout == second.stdout and first.returncode == second.returncode == 0


@pytest.mark.parametrize("argv", [["route", "--cores", "x"], ["route", "--walltime", "-1"], ["nonsense"],
                                  ["route", "--config", "/dev/null/x"], ["check", "--config", "/"]])
def test_bad_arguments_never_give_a_traceback(argv):
    result = blahvm(*argv)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.strip()
