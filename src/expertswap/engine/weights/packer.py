"""Writes the packed expert file (``packed_file``) in the background, one layer at a time, at a low priority.

Layers written by an earlier run count at once (the work resumes after a crash or a quit). Each finished layer
is attached to the store under the step lock, so its misses read packed bytes from the next step on. A full or
read-only disk stops the writing with a ``PackProgress`` error: nothing is lost, misses are quantised as read.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from expertswap.engine.weights.packed_file import layer_file, read_layer, write_layer
from expertswap.engine.weights.store import ExpertStore
from expertswap.protocol.events import PackProgress, Telemetry

_NICE = 10  # the writer yields the cores to decoding


class Packer:
    """The packed file of ``store``'s experts in ``folder``: ``start`` attaches what is written and writes the rest."""

    def __init__(self, store: ExpertStore, folder: Path, telemetry: Telemetry,
                 lock: AbstractContextManager[Any]) -> None:
        self.store, self.folder, self.telemetry, self.lock = store, folder, telemetry, lock
        self.error = ""
        self.bytes_written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="expertswap-packer", daemon=True)

    @property
    def layers(self) -> int:
        return len(self.store.layers)

    @property
    def done(self) -> int:
        return len(self.store.packed_layers())

    def start(self) -> None:
        """Write what is not written yet, in the background."""
        if self.done < self.layers:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def writing(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Until every layer is written, or writing stopped; whether it is all written."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return self.done == self.layers

    def progress(self) -> PackProgress:
        return PackProgress(layers_done=self.done, layers=self.layers, bytes_written=self.bytes_written,
                            error=self.error)

    def attach_written(self) -> None:
        """The layers an earlier run wrote: their misses read packed bytes from now on."""
        for layer, spec in self.store.layers.items():
            packed = read_layer(self.folder, layer, spec.num_experts)
            if packed is not None:
                with self.lock:
                    self.store.attach_packed(layer, packed)

    def _run(self) -> None:
        with contextlib.suppress(AttributeError, OSError):  # Linux and macOS: this thread alone
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)
        for layer, spec in self.store.layers.items():
            if layer in self.store.packed_layers():
                continue
            try:
                read = functools.partial(self.store.for_packing, layer)
                if not write_layer(self.folder, layer, spec.num_experts, read, self._stop.is_set):
                    return
            except Exception as exc:  # a full or read-only disk, a checkpoint changed under us: misses are quantised
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                self.error = f"cannot write packed experts to {self.folder}: {why}"
                self.telemetry.emit(self.progress())
                return
            packed = read_layer(self.folder, layer, spec.num_experts)
            if packed is None:
                self.error = f"{layer_file(self.folder, layer)} could not be read back"
                self.telemetry.emit(self.progress())
                return
            self.bytes_written += layer_file(self.folder, layer).stat().st_size
            with self.lock:
                self.store.attach_packed(layer, packed)
            self.telemetry.emit(self.progress())
