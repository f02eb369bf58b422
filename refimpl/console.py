"""What a training run shows and hears: the progress display, and Ctrl-C / SIGTERM between steps."""

from __future__ import annotations

import math
import signal
import sys
import threading
import time


class Progress:
    """On a terminal, a tqdm bar (when tqdm is installed, extra ``progress``); otherwise (a file,
    a pipe, no tqdm) one plain line every ``interval`` seconds, never carriage-return fragments.

    Shows the step, ETA and Figure 1's live quantities: E2, tau, open gates, lambda', hit fraction.
    """

    def __init__(self, total: int, initial: int, n_latent: int, enabled: bool = True, interval: float = 10.0,
                 stream=None):
        self.total, self.step, self.n = total, initial, n_latent
        self.enabled, self.interval = enabled, interval
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None
        self.start, self.start_step, self.last_print = time.monotonic(), initial, 0.0
        if enabled and hasattr(self.stream, "isatty") and self.stream.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=initial, unit="batch", file=self.stream, dynamic_ncols=True,
                                mininterval=0.1)

    @staticmethod
    def describe(log: dict, tau: float, n: int) -> str:
        return (f"E2={log['E2']:.4g} tau={tau:g} open={log['open_gates']}/{n} "
                f"lambda'={log['lambda_eff']:.3g} hit={log['hit_fraction']:.2f}")

    def update(self, log: dict, tau: float) -> None:
        self.step = log["step"]
        if not self.enabled:
            return
        text = self.describe(log, tau, self.n)
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
            return
        now = time.monotonic()
        if now - self.last_print >= self.interval or self.step == self.total:
            self.last_print = now
            elapsed = now - self.start
            done = self.step - self.start_step
            eta = elapsed / done * (self.total - self.step) if done else float("nan")
            print(f"step {self.step}/{self.total} ({100 * self.step / self.total:.0f}%) "
                  f"{hms(elapsed)} elapsed, ETA {hms(eta)} | {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def hms(seconds: float) -> str:
    """``seconds`` as H:MM:SS; ``?`` when unknown (NaN or infinite)."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class StopOnSignal:
    """Turns the first SIGINT / SIGTERM / SIGHUP into a flag checked between steps (so a step is never
    cut in half); a second one raises KeyboardInterrupt at once. Only in the main thread."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def _handler(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
