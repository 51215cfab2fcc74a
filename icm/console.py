"""What a person sees while a job runs: one live progress line per phase, then the summary; worker
noise off unless ``--verbose``; errors in full.

* ``configure(verbose)`` — called once by every driver (``pipelines/common.py``) before anything
  imports torch, ultralytics or Ray. Quiet (the default): ultralytics' ``LOGGER`` and progress bars
  off (``YOLO_VERBOSE=False``, its own switch: ``verbose=False`` on ``train()`` leaves both on),
  third-party warnings that say nothing a user can act on filtered each by its exact message
  (``THIRD_PARTY_WARNINGS``), and the Ray lines listed in ``RAY_LOG_SKIP`` dropped by Ray's own log
  filter (``RAY_DEDUP_LOGS_SKIP_REGEX``); when stdout is not a terminal, Ray's worker prefixes
  lose their colour codes (``RAY_COLOR_PREFIX=0``). ``worker_env()`` carries the same settings to Ray's
  worker processes (their runtime env). ``--verbose`` sets none of it: everything prints as the
  libraries print it. Warnings, errors and tracebacks from any process are never filtered.
* ``Progress`` — the project's progress display: done / total, rate, ETA. On a terminal one line
  redrawn in place; when stdout is not a terminal (CI, ``nohup``, ``ray job submit`` logs) a plain
  line every ``ICM_PROGRESS_EVERY`` seconds (default 30) and a last one, never a cursor escape.

Ray-free: ``icm.data.ray_io`` applies these settings to Ray (log filter, Ray Data's progress bars,
Ray Train's log level) and carries worker-side progress to the driver.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
import warnings
from typing import TextIO

VERBOSE_ENV = "ICM_VERBOSE"

# (category, exact message): warnings from libraries we depend on that a user cannot act on. Each
# is filtered by its whole text, so any other warning of the same category still prints.
THIRD_PARTY_WARNINGS = (
    # compressai imports torch_geometric, which calls torch.jit.script at import, in every worker that builds a codec
    (FutureWarning, "`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`."),
)

# Lines Ray forwards from its own actors that carry nothing a user can act on, matched exactly.
RAY_LOG_SKIP = (
    # Ray Train's placement-group cleaner polls the state API, which needs the dashboard: without
    # one (ray.dashboard: false, tests) it says so every few seconds for the whole run.
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. "
    "Continuing to monitor.",
)
# ... and lines whose text varies, by the fixed start Ray gives them: Ray Train V2 logs every
# report at INFO through a logger named by its file path (outside the "ray.train" logger that
# LoggingConfig sets to WARNING); and its controller's core worker logs, at every training run's
# start, that Ray Train's own PreemptionWatcher actor has its constructor arguments in the object
# store (ray-project/ray#53727: a note on Ray's internals, nothing the job passes).
RAY_LOG_SKIP_PATTERNS = (re.escape("Reporting training result ") + r"\d+: TrainingReport\(",
                         re.escape("Actor with class name: 'PreemptionWatcher' and ID: '") + r"[0-9a-f]+"
                         + re.escape("' has constructor arguments in the object store and max_restarts > 0."))
RAY_SKIP_ENV = "RAY_DEDUP_LOGS_SKIP_REGEX"


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def ray_log_skip_regex() -> str:
    return "|".join([re.escape(line) for line in RAY_LOG_SKIP] + list(RAY_LOG_SKIP_PATTERNS))


def _python_warnings_option() -> str:
    """The ``PYTHONWARNINGS`` entries for ``THIRD_PARTY_WARNINGS`` (a message there is a literal
    prefix of the warning's text, so it may hold neither ':' nor ',')."""
    entries = []
    for category, message in THIRD_PARTY_WARNINGS:
        assert ":" not in message and "," not in message, message
        entries.append(f"ignore:{message}:{category.__name__}")
    return ",".join(entries)


def worker_env(verbose: bool | None = None) -> dict[str, str]:
    """Environment variables that give Ray's worker processes the driver's console settings."""
    verbose = is_verbose() if verbose is None else verbose
    if verbose:
        return {VERBOSE_ENV: "1"}
    own, ours = os.environ.get("PYTHONWARNINGS", ""), _python_warnings_option()
    return {VERBOSE_ENV: "0", "YOLO_VERBOSE": "False",
            "PYTHONWARNINGS": own if ours in own else ",".join(filter(None, (own, ours)))}


def configure(verbose: bool) -> None:
    """Set this process's console settings (and those its child processes inherit). Call before
    torch, ultralytics or Ray is imported: ultralytics reads ``YOLO_VERBOSE`` and Ray its log
    filter at import."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if not sys.stdout.isatty():   # a log file: Ray's "(worker pid=…)" prefixes without terminal colours
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if verbose:
        return
    for key, value in worker_env(False).items():
        os.environ[key] = value
    os.environ.setdefault(RAY_SKIP_ENV, ray_log_skip_regex())
    for category, message in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)


def format_duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """``label: done/total unit · rate · ETA · elapsed``. ``update(done)`` or ``advance(n)`` from any
    thread; ``close()`` prints the final line. Rate and ETA count from the first update, so work
    already done by an earlier run (``start``) does not inflate the rate."""

    def __init__(self, label: str, total: int, unit: str = "images", *, start: int = 0, note: str = "",
                 stream: TextIO | None = None, live: bool | None = None, every_s: float | None = None):
        self.label, self.total, self.unit = label, max(int(total), 0), unit
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.every_s = float(os.environ.get("ICM_PROGRESS_EVERY", 30)) if every_s is None else every_s
        self.done = self.start = int(start)
        self.note = note
        self.started = time.monotonic()
        self._printed_at: float | None = None
        self._printed_state: tuple | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._emit(force=True)

    def update(self, done: int, total: int | None = None, note: str | None = None) -> None:
        with self._lock:
            self.done = int(done)
            if total is not None:
                self.total = int(total)
            if note is not None:
                self.note = note
            self._emit()

    def advance(self, n: int = 1, note: str | None = None) -> None:
        self.update(self.done + n, note=note)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        ran = self.done - self.start
        parts = [f"{self.label}: {self.done}/{self.total} {self.unit}"]
        if self.note:
            parts[0] += f" ({self.note})"
        if ran > 0 and elapsed > 0:
            rate = ran / elapsed
            parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 0.1 else f"{elapsed / ran:.3g} s per {self.unit.rstrip('s')}")
            if self.done < self.total:
                parts.append(f"ETA {format_duration((self.total - self.done) / rate)}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        return "[icm] " + " · ".join(parts)

    def _emit(self, force: bool = False, final: bool = False) -> None:
        if self._closed:
            return
        now = time.monotonic()
        if self.live:
            if force or final or self._printed_at is None or now - self._printed_at >= 0.2:
                # \r and "erase to end of line": a terminal redraws the line in place
                self.stream.write("\r" + self.line() + "\x1b[K" + ("\n" if final else ""))
                self.stream.flush()
                self._printed_at = now
        elif force or final or self._printed_at is None or now - self._printed_at >= self.every_s:
            if final and self._printed_state == (self.done, self.total, self.note):
                return   # the last periodic line already said it
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._printed_at, self._printed_state = now, (self.done, self.total, self.note)

    def close(self) -> None:
        with self._lock:
            self._emit(final=True)
            self._closed = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
