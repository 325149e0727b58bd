"""Tests of notify hooks with real hook scripts (written to tmp_path and executed).

Waiting is by polling a condition with a bounded number of short sleeps; nothing asserts
on how fast the machine is.
"""

from __future__ import annotations

import inspect
import os
import signal
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from sidecar.hooks import HookRunner, HookSettings

pytestmark = pytest.mark.timeout(60)


def write_script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


async def wait_until(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    """Poll `condition` every 20 ms, failing the test after about `seconds`."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await trio.sleep(0.02)
    pytest.fail(f"condition not met within {seconds} s")


def process_is_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def kill_listed_pids(pids_file: Path) -> None:
    if pids_file.exists():
        for pid in map(int, pids_file.read_text().split()):
            if not process_is_gone(pid):
                os.kill(pid, signal.SIGKILL)


def read_env_dump(path: Path) -> dict[str, str]:
    entries = path.read_bytes().decode().split("\0")
    return dict(entry.split("=", 1) for entry in entries if entry)


# --- settings -------------------------------------------------------------------------------


def test_defaults_and_validation() -> None:
    s = HookSettings()
    assert (s.on_gained, s.on_lost, s.on_leader_change) == (None, None, None)
    assert (s.hook_timeout, s.max_queue) == (10.0, 16)
    for fields, message in [
        ({"on_gained": []}, "hooks.on_gained must be a non-empty argv list"),
        ({"hook_timeout": 0}, "hooks.hook_timeout must be > 0"),
        ({"max_queue": 0}, "hooks.max_queue must be >= 1"),
        ({"on_gained": "/bin/true"}, "Expected `array | null`, got `str`"),
        ({"timeout": 3}, "unknown field"),
    ]:
        with pytest.raises(msgspec.ValidationError, match=message):
            msgspec.convert(fields, HookSettings)


# --- environment ----------------------------------------------------------------------------


async def test_hook_sees_its_facts_and_no_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dump = tmp_path / "env.{event}"
    hook = write_script(tmp_path / "hook.sh", f'env -0 > "{tmp_path}/env.$FIP_EVENT"\n')
    for name, value in {
        "DIGITALOCEAN_TOKEN": "dop_v1_secret",
        "FIP_SIDECAR_CLUSTER_KEY": "cluster-key",
        "MY_API_TOKEN": "t",
        "aws_secret_access_key": "s",
        "SSH_KEY_PATH": "/k",
        "KEEP_ME": "yes",
    }.items():
        monkeypatch.setenv(name, value)
    settings = HookSettings(on_gained=(hook,), on_leader_change=(hook,))
    runner = HookRunner(settings, node_id=2, floating_ip="203.0.113.10")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        runner.notify("gained", "leader", 7, 2)
        runner.notify("leader_change", "follower", 8, None)
        await wait_until(lambda: runner.counts()["leader_change", "ok"] == 1)
        nursery.cancel_scope.cancel()

    gained = read_env_dump(Path(str(dump).format(event="gained")))
    assert {k: v for k, v in gained.items() if k.startswith("FIP_")} == {
        "FIP_EVENT": "gained",
        "FIP_ROLE": "leader",
        "FIP_TERM": "7",
        "FIP_LEADER_ID": "2",
        "FIP_NODE_ID": "2",
        "FIP_FLOATING_IP": "203.0.113.10",
        "FIP_ADDRESS": "",
        "FIP_FAMILY": "",
    }
    assert gained["KEEP_ME"] == "yes" and gained["PATH"] == os.environ["PATH"]
    for secret in (
        "DIGITALOCEAN_TOKEN",
        "FIP_SIDECAR_CLUSTER_KEY",
        "MY_API_TOKEN",
        "aws_secret_access_key",
        "SSH_KEY_PATH",
    ):
        assert secret not in gained
    changed = read_env_dump(Path(str(dump).format(event="leader_change")))
    assert changed["FIP_EVENT"] == "leader_change" and changed["FIP_LEADER_ID"] == ""
    assert changed["FIP_ROLE"] == "follower" and changed["FIP_TERM"] == "8"
    assert runner.counts()["gained", "ok"] == 1
    assert runner.last_result is not None and runner.last_result.exit_code == 0


# --- time limits and failures ---------------------------------------------------------------


async def test_hanging_hook_is_killed_with_its_children_and_the_next_still_runs(
    tmp_path: Path,
) -> None:
    pids = tmp_path / "pids"
    log = tmp_path / "log"
    hook = write_script(
        tmp_path / "hook.sh",
        f"""if [ "$FIP_EVENT" = gained ]; then
    sleep 300 &
    echo "$$ $!" > {pids}.tmp && mv {pids}.tmp {pids}
    wait
else
    echo "$FIP_EVENT $FIP_TERM" >> {log}
fi
""",
    )
    settings = HookSettings(on_gained=(hook,), on_lost=(hook,), hook_timeout=1.0)
    runner = HookRunner(settings, node_id=1, floating_ip=None)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run)
            started = trio.current_time()
            runner.notify("gained", "leader", 3, 1)
            runner.notify("lost", "follower", 4, None)
            await wait_until(lambda: runner.counts()["lost", "ok"] == 1)
            assert trio.current_time() - started >= 1.0  # not killed early
            nursery.cancel_scope.cancel()
        counts = runner.counts()
        assert counts["gained", "timeout"] == 1 and counts["gained", "ok"] == 0
        assert log.read_text() == "lost 4\n"
        # The script wrote its pids within its second unless the machine is very slow.
        if pids.exists():
            listed = [int(p) for p in pids.read_text().split()]
            await wait_until(lambda: all(process_is_gone(pid) for pid in listed), 5)
    finally:
        kill_listed_pids(pids)


async def test_failed_and_missing_hooks_are_counted_and_do_not_stop_the_runner(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    failing = write_script(tmp_path / "fail.sh", "echo 'cannot reach pager' >&2\nexit 4\n")
    settings = HookSettings(
        on_gained=(failing,), on_lost=(str(tmp_path / "missing.sh"),), on_leader_change=("true",)
    )
    runner = HookRunner(settings, node_id=1, floating_ip=None)
    caplog.set_level("INFO", logger="sidecar.hooks")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        runner.notify("gained", "leader", 1, 1)
        runner.notify("lost", "follower", 2, None)
        runner.notify("leader_change", "follower", 2, None)
        await wait_until(lambda: runner.counts()["leader_change", "ok"] == 1)
        nursery.cancel_scope.cancel()
    counts = runner.counts()
    assert counts["gained", "failed"] == 1 and counts["lost", "failed"] == 1
    failed = [r for r in caplog.records if r.getMessage() == "hook failed"]
    assert [getattr(r, "exit_code", None) for r in failed] == [4, None]
    assert getattr(failed[0], "output", None) == "cannot reach pager"
    assert "No such file" in str(getattr(failed[1], "error", ""))


async def test_events_without_a_hook_are_ignored() -> None:
    runner = HookRunner(HookSettings(on_gained=("true",)), node_id=1, floating_ip=None)
    runner.notify("lost", "follower", 1, None)
    assert runner.pending == 0
    runner.notify("gained", "leader", 2, 1)
    assert runner.pending == 1
    with pytest.raises(ValueError, match="unknown hook event"):
        runner.notify("promoted", "leader", 2, 1)  # type: ignore[arg-type]


# --- never blocking the election ------------------------------------------------------------


async def test_notify_never_blocks_even_while_a_hook_hangs(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    hook = write_script(
        tmp_path / "hang.sh", f"echo $$ > {pids}.tmp && mv {pids}.tmp {pids}\nexec sleep 300\n"
    )
    runner = HookRunner(
        HookSettings(on_gained=(hook,), on_lost=(hook,), hook_timeout=50.0, max_queue=4),
        node_id=1,
        floating_ip=None,
    )
    assert not inspect.iscoroutinefunction(HookRunner.notify)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run)
            runner.notify("gained", "leader", 1, 1)
            await wait_until(pids.exists)  # the hook is running and hangs
            with trio.testing.assert_no_checkpoints():
                for term in range(2, 1002):
                    assert runner.notify("lost", "follower", term, None) is None
            assert runner.pending == 4
            assert runner.counts()["lost", "dropped"] == 996
            hung = int(pids.read_text())
            nursery.cancel_scope.cancel()  # shutting down kills the running hook
        await wait_until(lambda: process_is_gone(hung), 5)
    finally:
        kill_listed_pids(pids)


async def test_overflow_drops_the_oldest_and_runs_the_rest_in_order(tmp_path: Path) -> None:
    log = tmp_path / "log"
    hook = write_script(tmp_path / "log.sh", f'echo "$FIP_TERM" >> {log}\n')
    runner = HookRunner(
        HookSettings(on_leader_change=(hook,), max_queue=3), node_id=1, floating_ip=None
    )
    for term in range(1, 7):
        runner.notify("leader_change", "follower", term, term % 3)
    assert runner.pending == 3
    assert runner.counts()["leader_change", "dropped"] == 3
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await wait_until(lambda: runner.counts()["leader_change", "ok"] == 3)
        nursery.cancel_scope.cancel()
    assert log.read_text().split() == ["4", "5", "6"]
    assert runner.pending == 0


async def test_an_idle_runner_wakes_up_for_a_new_event(tmp_path: Path) -> None:
    log = tmp_path / "log"
    hook = write_script(tmp_path / "log.sh", f'echo "$FIP_EVENT" >> {log}\n')
    runner = HookRunner(HookSettings(on_gained=(hook,)), node_id=1, floating_ip=None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await trio.testing.wait_all_tasks_blocked()  # run() is parked on an empty queue
        runner.notify("gained", "leader", 1, 1)
        await wait_until(lambda: runner.counts()["gained", "ok"] == 1)
        await trio.testing.wait_all_tasks_blocked()
        runner.notify("gained", "leader", 2, 1)
        await wait_until(lambda: runner.counts()["gained", "ok"] == 2)
        nursery.cancel_scope.cancel()
    assert log.read_text().split() == ["gained", "gained"]


async def test_wait_idle_returns_once_queued_hooks_have_run(tmp_path: Path) -> None:
    """A shutdown resign queues `lost`; the service waits for it before the process exits."""
    log = tmp_path / "log"
    hook = write_script(tmp_path / "slow.sh", f'sleep 0.3; echo "$FIP_EVENT" >> {log}\n')
    runner = HookRunner(
        HookSettings(on_gained=(hook,), on_lost=(hook,)), node_id=1, floating_ip=None
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        runner.notify("gained", "leader", 1, 1)
        runner.notify("lost", "follower", 1, None)
        with trio.fail_after(20):
            await runner.wait_idle()
        assert log.read_text().split() == ["gained", "lost"]
        nursery.cancel_scope.cancel()
