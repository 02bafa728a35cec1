"""A small progress bar on stderr, so that training needs no extra install (tqdm is not a dependency).

The subset of tqdm's interface the trainers and the skip-set search use: Progress(iterable=None, total=, desc=,
unit=, disable=, initial=), iteration, update(n), the count `n`, set_postfix(**values), refresh(), close(), and use
as a context manager. It redraws at most
every `every` seconds (default 0.2 s) with a carriage return on a terminal and prints one final line
otherwise (a log file gets the summary, not hundreds of redraws).
"""
import sys
import time


class Progress:
    def __init__(self, iterable=None, total=None, desc="", unit="it", disable=False, every=0.2, file=None, initial=0):
        self.iterable, self.desc, self.unit, self.disable, self.every = iterable, desc, unit, disable, every
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.postfix = total, initial, ""
        self.file = file if file is not None else sys.stderr
        self.tty = getattr(self.file, "isatty", lambda: False)()
        self.t0 = self.last = time.perf_counter()
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1):
        self.n += n
        self.refresh(force=False)

    def refresh(self, force=True):
        """Redraw now (force) or if `every` seconds have passed since the last redraw."""
        now = time.perf_counter()
        if not self.disable and self.tty and (force or now - self.last >= self.every):
            self.last = now
            self.file.write("\r" + self.line(now))
            self.file.flush()

    def set_postfix(self, refresh=False, **values):
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def line(self, now=None):
        """`desc: n/total unit [elapsed, rate unit/s, postfix]`."""
        dt = (now or time.perf_counter()) - self.t0
        rate = self.n / dt if dt > 0 else 0.0
        of = f"/{self.total}" if self.total is not None else ""
        pct = f" {100 * self.n / self.total:3.0f}%" if self.total else ""
        post = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}:{pct} {self.n}{of} {self.unit} [{dt:.1f} s, {rate:.1f} {self.unit}/s{post}]"

    def close(self):
        if self.closed or self.disable:
            self.closed = True
            return
        self.closed = True
        self.file.write(("\r" if self.tty else "") + self.line() + "\n")
        self.file.flush()
