"""Helper processes for CPU work that threads cannot split.

SIFT Flow's belief propagation (:mod:`topdown.flows`) is thousands of small torch
ops per pyramid level. Their dispatch holds the GIL, so a second thread in the same
process gains nothing and intra-op threads cost more than they split
(docs/BENCHMARKS.md, "SIFT Flow fidelity and speed"); a second process uses the
second core. :func:`map_split` runs one chunk of a batch in the calling process and
the others at the same time in persistent single-threaded helper processes, started
on first use and kept for later calls.

A helper is ``python -c`` importing this module, not a fork or a multiprocessing
spawn: it inherits no threads, OpenMP state or open files, and never re-runs the
caller's ``__main__``. The call crosses a pipe as the function's importable name,
picklable arguments and the tensors as raw bytes (one copy each way).
"""
from __future__ import annotations

import atexit
import importlib
import math
import os
import pickle
import struct
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["map_split", "helper_cpu_seconds", "HelperError"]

_LENGTH = struct.Struct("<Q")
_ROOT = Path(__file__).resolve().parent.parent  # the folder holding the topdown package
_HELPERS: list["_Helper"] = []
_LOCK = threading.Lock()


def _read_exact(stream, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            raise EOFError
        got += k
    return buf


def _send(stream, obj, tensors: Sequence[Tensor]) -> None:
    tensors = [t.detach().cpu().contiguous() for t in tensors]
    meta = pickle.dumps((obj, [(t.dtype, tuple(t.shape)) for t in tensors]))
    stream.write(_LENGTH.pack(len(meta)))
    stream.write(meta)
    for t in tensors:
        if t.numel():
            stream.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    stream.flush()


def _recv(stream) -> tuple[object, list[Tensor]]:
    (n,) = _LENGTH.unpack(_read_exact(stream, _LENGTH.size))
    obj, specs = pickle.loads(_read_exact(stream, n))
    tensors = []
    for dtype, shape in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            tensors.append(torch.empty(shape, dtype=dtype))
        else:
            tensors.append(torch.frombuffer(_read_exact(stream, nbytes), dtype=dtype).reshape(shape))
    return obj, tensors


def serve() -> None:
    """A helper's loop: read a call, run it single-threaded, send its tensor back (or the error)."""
    torch.set_num_threads(1)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the channel
    while True:
        try:
            (name, args), tensors = _recv(inp)
        except EOFError:  # the caller closed the pipe or exited
            return
        module, _, fn = name.rpartition(":")
        try:
            result = getattr(importlib.import_module(module), fn)(*tensors, *args)
            _send(out, None, [result])
        except Exception:  # noqa: BLE001 - reported to the caller, which raises it
            _send(out, traceback.format_exc(), [])


class HelperError(RuntimeError):
    """The function raised inside a helper (the helper itself is fine and is kept)."""


class _Helper:
    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, "-c", "from topdown.parallel import serve; serve()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def submit(self, name: str, tensors: Sequence[Tensor], args: tuple) -> None:
        try:
            _send(self.proc.stdin, (name, args), tensors)
        except (BrokenPipeError, OSError) as err:
            raise RuntimeError(self._gone()) from err

    def result(self) -> Tensor:
        try:
            err, tensors = _recv(self.proc.stdout)
        except EOFError:
            raise RuntimeError(self._gone()) from None
        if err is not None:
            raise HelperError(f"in helper process {self.proc.pid}:\n{err}")
        return tensors[0]

    def _gone(self) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = "none yet"
        return f"helper process {self.proc.pid} ({sys.executable} -c ...topdown.parallel.serve) exited, code {code}"

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def _helpers(n: int) -> list[_Helper]:
    alive = [h for h in _HELPERS if h.proc.poll() is None]
    _HELPERS[:] = alive
    while len(_HELPERS) < n:
        _HELPERS.append(_Helper())
    return _HELPERS[:n]


def map_split(fn: Callable[..., Tensor], chunks: Sequence[Sequence[Tensor]], args: tuple = ()) -> list[Tensor]:
    """``[fn(*chunk, *args) for chunk in chunks]``, the first chunk here and each other one in its own
    helper process, all at the same time.

    ``fn`` must be importable by name (a module-level function) and return one tensor; ``args`` must
    be picklable. The results are on the CPU. An error in a helper is raised here with its traceback;
    a helper that died is named and replaced on the next call.
    """
    name = f"{fn.__module__}:{fn.__qualname__}"
    with _LOCK:
        helpers = _helpers(len(chunks) - 1)
        sent, errors, results = [], [], []
        try:
            for h, chunk in zip(helpers, chunks[1:]):
                h.submit(name, chunk, args)
                sent.append(h)
            first = fn(*chunks[0], *args)
        finally:
            for h in sent:  # always drain, so that every channel stays in step
                try:
                    results.append(h.result())
                except HelperError as err:
                    errors.append(err)
                except RuntimeError as err:  # the helper is gone
                    errors.append(err)
                    _HELPERS.remove(h)
                    h.close()
        if errors:
            raise errors[0]
        return [first, *results]


def helper_cpu_seconds() -> float:
    """User + system CPU seconds of the live helpers (Linux ``/proc``; NaN elsewhere), for benchmarks
    that add them to the caller's own CPU time."""
    total = 0.0
    for h in _HELPERS:
        try:
            fields = Path(f"/proc/{h.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return math.nan
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _close_all() -> None:
    for h in _HELPERS:
        h.close()
    _HELPERS.clear()


def _forget_in_child() -> None:
    # A forked child (e.g. a DataLoader worker) must not talk on its parent's channels: drop its
    # copies of the pipe ends and start its own helpers if it ever needs them.
    for h in _HELPERS:
        for stream in (h.proc.stdin, h.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
    _HELPERS.clear()
    global _LOCK
    _LOCK = threading.Lock()  # another thread may have held it at the fork


atexit.register(_close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
