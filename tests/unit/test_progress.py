"""tools/progress.py: rank 0 only, sparse plain lines in a log, a redrawn bar on a terminal, off
with --no-progress, rate and time left in the text, nothing on stdout but what the tool prints."""

import argparse
import io
import re
import types

import pytest

from tools import progress as progress_module
from tools.progress import LOG_BAR_WIDTH, LOG_INTERVAL_S, Progress, add_progress_flag


class Clock:
    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    """tools.progress's clock, advanced by the test: no sleeping."""
    fake = Clock()
    monkeypatch.setattr(progress_module, "time", types.SimpleNamespace(monotonic=fake.monotonic))
    return fake


def test_a_log_gets_one_plain_line_per_interval_and_a_last_one(clock):
    log = io.StringIO()
    with Progress(90, "eval_ppl", unit="token", stream=log) as bar:
        for _ in range(29):  # 29 s of work: under the interval, no line
            clock.now += 1
            bar.update(1, docs="1/3")
        assert log.getvalue() == ""
        clock.now += 1
        bar.update(1, docs="1/3")  # 30 s: the first line
        for _ in range(30):
            clock.now += 1
            bar.update(1, docs="2/3")  # 60 s: the second
        clock.now += 1
        bar.update(1)  # 61 s: no line until the end
        assert len(log.getvalue().splitlines()) == 2
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 3  # at 30 s, at 60 s, and the last when the work ended (61 s)
    assert all(re.search(r"%\|[#0-9 ]{" + str(LOG_BAR_WIDTH) + r"}\|", line) for line in lines)  # a bar of fixed width
    # count and percentage, elapsed < time left, rate, postfix
    assert lines[0].startswith("eval_ppl:  33%|") and lines[0].endswith(
        "| 30/90 [00:30<01:00,  1.00token/s, docs=1/3]"), lines[0]
    assert lines[1].endswith("| 60/90 [01:00<00:30,  1.00token/s, docs=2/3]"), lines[1]
    assert lines[2].endswith("| 61/90 [01:01<00:29,  1.00token/s, docs=2/3]"), lines[2]


def test_the_default_interval_keeps_a_log_sparse(clock):
    assert LOG_INTERVAL_S == 30
    log = io.StringIO()
    with Progress(10_000, "export", unit="B", stream=log) as bar:
        for _ in range(10_000):
            clock.now += 0.0625  # exact in binary: 625 s in all
            bar.update(1)
    lines = log.getvalue().splitlines()  # 10,000 updates: a line each 30 s and the last
    assert len(lines) == 625 // 30 + 1
    assert lines[-1].endswith("| 10.0kB/10.0kB [10:25<00:00, 16.0B/s]"), lines[-1]


def test_work_that_fails_prints_no_last_line(clock):
    log = io.StringIO()
    with pytest.raises(ValueError):
        with Progress(10, "export", stream=log) as bar:
            clock.now += 1
            bar.update(3)
            raise ValueError("the error message stays the last line")
    assert log.getvalue() == ""


@pytest.mark.parametrize("rank_env,rank,shown", [(None, None, True), ("0", None, True), ("1", None, False),
                                                 ("1", 0, True), ("0", 3, False)])
def test_only_rank_0_shows_it(monkeypatch, clock, rank_env, rank, shown):
    """The rank given, else torchrun's RANK; a single process (no RANK) is rank 0."""
    if rank_env is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank_env)
    log = io.StringIO()
    with Progress(4, "eval_passkey", unit="sample", rank=rank, stream=log) as bar:
        clock.now += 1
        bar.update(4)
    assert bool(log.getvalue()) == shown
    terminal = Terminal()
    Progress(4, "eval_passkey", unit="sample", rank=rank, stream=terminal).close()
    assert bool(terminal.getvalue()) == shown


def test_no_progress_turns_it_off(clock):
    parser = argparse.ArgumentParser()
    add_progress_flag(parser)
    assert parser.parse_args([]).no_progress is False
    opts = parser.parse_args(["--no-progress"])
    assert opts.no_progress is True
    for stream in (io.StringIO(), Terminal()):
        with Progress(5, "train_step", unit="run", enabled=not opts.no_progress, stream=stream) as bar:
            clock.now += 100
            bar.update(5)
        assert stream.getvalue() == ""


def test_a_terminal_gets_a_bar_redrawn_in_place_with_rate_and_time_left():
    terminal = Terminal()
    with Progress(8, "max_seq", unit="run", stream=terminal) as bar:
        for i in range(8):
            bar.update(1, setup="fpdt", seq=4096)
    text = terminal.getvalue()
    assert text.startswith("\rmax_seq:   0%|") and text.endswith("\n") and text.count("\n") == 1
    last = text.rstrip("\n").split("\r")[-1]
    assert last.startswith("max_seq: 100%|") and "| 8/8 [00:00<00:00, " in last, last
    assert "run/s, setup=fpdt, seq=4096]" in last, last


def test_results_go_to_stdout_only(capsys):
    terminal = Terminal()
    with Progress(2, "train_step", unit="run", stream=terminal) as bar:
        bar.print('{"seq": 1024}')
        bar.update(1)
    assert capsys.readouterr().out == '{"seq": 1024}\n'
    assert '{"seq"' not in terminal.getvalue()
    with Progress(2, "train_step", unit="run", stream=io.StringIO()) as bar:
        bar.print('{"seq": 2048}')
    assert capsys.readouterr().out == '{"seq": 2048}\n'
