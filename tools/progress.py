"""Progress of the long tools and benchmarks on stderr: count, rate and time left (ETA).

    with Progress(total=num_tokens, desc="eval_ppl", unit="token", enabled=not opts.no_progress) as bar:
        for doc in docs:
            ...
            bar.update(len(doc), docs=f"{i}/{len(docs)}")

* On a terminal (stderr is a TTY) it is a tqdm bar, redrawn in place at most twice a second.
* Anywhere else (a SLURM or CI log) there are no carriage-return redraws: one plain line of the
  same text (a bar of :data:`LOG_BAR_WIDTH` characters, the text never cut) every
  :data:`LOG_INTERVAL_S` seconds, and one last line when the work ends. Work that fails prints
  no last line, so an error message stays the last, and often only, line on stderr.
* Only rank 0 shows it: the ``rank`` given, else the ``RANK`` variable torchrun sets.
* ``--no-progress`` (:func:`add_progress_flag`), the same flag in every tool and benchmark, turns it
  off. Results go to stdout and output files, never here; :meth:`Progress.print` prints a result
  line on stdout while a bar is drawn without breaking the bar.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # between two lines in a log (stderr not a TTY)
LOG_BAR_WIDTH = 20  # characters of the bar in a log's lines
TTY_INTERVAL_S = 0.5  # between two redraws on a terminal


def add_progress_flag(parser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="show no progress on stderr (default: rank 0 shows count, rate and time left; a bar on "
                             f"a terminal, one line every {LOG_INTERVAL_S:g} s in a log)")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class Progress:
    """Progress towards ``total`` ``unit``s (``unit="B"``: bytes, shown as kB, MB, GB), on stderr.

    ``update(n, **postfix)`` adds ``n`` done and shows ``postfix`` (``docs="3/10"``) after the rate;
    ``close()`` ends it (the context manager closes it, printing no last line after an exception).
    """

    def __init__(self, total: Optional[int], desc: str, unit: str = "it", *, enabled: bool = True,
                 rank: Optional[int] = None, stream=None, log_interval: float = LOG_INTERVAL_S):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and (_rank() if rank is None else rank) == 0
        self.total, self.desc, self.unit, self.log_interval = total, desc, unit, log_interval
        self.unit_scale = unit == "B"
        # "40%|####      | 1.20GB/3.00GB [00:10<00:15, 120MB/s, shard=1/2]": tqdm's own, but for the unit
        # after the counts of bytes and a fixed bar in a log (None: tqdm's, without a total)
        counts = "{n_fmt}B/{total_fmt}B" if unit == "B" else "{n_fmt}/{total_fmt}"
        right = "| " + counts + " [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
        self.tty_format = None if total is None else "{l_bar}{bar}" + right
        self.log_format = None if total is None else "{l_bar}{bar:%d}" % LOG_BAR_WIDTH + right
        self.n, self.postfix, self.closed, self.n_shown = 0, "", False, None
        self.start = self.last_line = time.monotonic()
        tty = self.enabled and getattr(self.stream, "isatty", lambda: False)()
        self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=self.unit_scale, bar_format=self.tty_format,
                        file=self.stream, mininterval=TTY_INTERVAL_S, dynamic_ncols=True) if tty else None

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if postfix:
            self.postfix = ", ".join(f"{k}={v}" for k, v in postfix.items())
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix, refresh=False)
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last_line >= self.log_interval:
            self._line()

    def text(self) -> str:
        """The progress as one line: count, percentage and bar (with a total), rate, time left, postfix."""
        return tqdm.format_meter(self.n, self.total, time.monotonic() - self.start, prefix=self.desc, unit=self.unit,
                                 unit_scale=self.unit_scale, postfix=self.postfix or None,
                                 bar_format=self.log_format, ascii=True)

    def _line(self) -> None:
        self.last_line, self.n_shown = time.monotonic(), self.n
        print(self.text(), file=self.stream, flush=True)

    def print(self, line: str) -> None:
        """``line`` on stdout (a result), the bar cleared first and redrawn after it."""
        if self.bar is None:
            print(line, flush=True)
            return
        with tqdm.external_write_mode(file=sys.stdout):
            print(line, flush=True)

    def close(self, finished: bool = True) -> None:
        """End the progress: a terminal's bar stays as drawn last; a log gets the last line when ``finished``."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and finished and self.n_shown != self.n:
            self._line()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(finished=exc_type is None)


__all__ = ["LOG_BAR_WIDTH", "LOG_INTERVAL_S", "Progress", "add_progress_flag"]
