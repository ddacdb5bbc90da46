"""`RunningCommand.finish_now`: a helper command waited for before the loop runs (the
start-up parse of a big config, `bootstrap_facts.py`). Real processes."""

from __future__ import annotations

import sys
import time

from envoy_autoreload.command import RunningCommand


def test_an_answer_longer_than_a_pipe_holds_is_read_whole() -> None:
    """Read as it is written: a child whose answer fills the pipe is not left blocked
    until its deadline."""
    size = 1 << 19  # 512 KiB: eight times a pipe's default buffer
    command = RunningCommand([sys.executable, "-c", f"print('x' * {size})"], timeout_s=30)
    began = time.monotonic()
    result = command.finish_now()
    command.close()
    assert result.returncode == 0 and not result.timed_out
    assert len(result.stdout) == size + 1
    assert time.monotonic() - began < 20, "waited for its deadline"


def test_one_past_its_deadline_is_killed_and_said_so() -> None:
    command = RunningCommand(["sleep", "30"], timeout_s=0.3)
    began = time.monotonic()
    result = command.finish_now()
    command.close()
    assert result.timed_out and result.returncode is None
    assert time.monotonic() - began < 10


def test_one_that_closes_its_pipes_but_lives_on_is_killed_at_its_deadline() -> None:
    command = RunningCommand(["sh", "-c", "exec >&- 2>&-; sleep 30"], timeout_s=0.3)
    result = command.finish_now()
    command.close()
    assert result.timed_out
