"""One writer at a time on a data-set store: a lease held in the store itself.

The lease is one key, `jaxlrp.lease`, holding JSON (`owner`, `host`, `pid`, `heartbeat`), taken
and renewed with tensorstore's conditional writes (compare-and-swap on the key's storage
generation), so two processes that race for it cannot both win, on a local disk or on any
tensorstore key-value store. The holder renews the heartbeat every `RENEW_S` seconds from a
daemon thread. A lease counts as abandoned, and is taken over, when its heartbeat is older than
`EXPIRES_S`, or at once when its holder ran on this host and its pid no longer runs: a killed run
never leaves the store locked for longer than that. A holder that could not renew for
`EXPIRES_S - RENEW_S` counts its lease lost and stops before its next batch.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

KEY = "jaxlrp.lease"
RENEW_S = 5.0
EXPIRES_S = 30.0


class LeaseHeld(RuntimeError):
    """Another process is writing to the store."""


class Lease:
    """The store's writer lease, taken by `acquire` and given back by `release`."""

    def __init__(self, kvstore, where: str):
        self.kvstore, self.where = kvstore, where
        self.owner = uuid.uuid4().hex
        self.generation = None
        self.renewed = 0.0
        self.lost = False
        self._stop = threading.Event()
        self._thread = None

    def acquire(self) -> None:
        """Takes the lease, or raises `LeaseHeld` naming its holder."""
        found = self.kvstore.read(KEY).result()
        if found.state == "value":
            holder = _parse(found.value)
            if holder is not None and _alive(holder):
                raise LeaseHeld(
                    f"jaxlrp.explain_dataset: '{self.where}' is being written by another run (process "
                    f"{holder.get('pid')} on {holder.get('host')}, heartbeat {time.time() - holder['heartbeat']:.0f} s "
                    f"ago). Wait for it to finish, stop it, or choose another `out`; a killed run's lease "
                    f"lapses by itself (at once on this host, after {EXPIRES_S:.0f} s elsewhere)."
                )
        written = self.kvstore.write(KEY, self._record(), if_equal=found.stamp.generation).result()
        if not written.generation:
            raise LeaseHeld(
                f"jaxlrp.explain_dataset: another run took the lease of '{self.where}' at the same moment; "
                "only one run writes to a store at a time."
            )
        self.generation, self.renewed = written.generation, time.time()
        self._thread = threading.Thread(target=self._renew, name="jaxlrp-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raises if the lease was lost: another run took it over, or it was not renewed for so
        long that another run may have."""
        if time.time() - self.renewed > EXPIRES_S - RENEW_S:
            self.lost = True
        if self.lost:
            raise LeaseHeld(
                f"jaxlrp.explain_dataset: the lease of '{self.where}' was taken over by another run while this "
                f"one did not renew it for {EXPIRES_S:.0f} s; this run stops without writing more."
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.generation is not None and not self.lost:
            self.kvstore.write(KEY, None, if_equal=self.generation).result()
        self.generation = None

    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "heartbeat": time.time()}).encode()

    def _renew(self) -> None:
        """Renews the heartbeat every `RENEW_S` s; a failed write (a storage error) is retried at
        the next beat, and `check` calls the lease lost once none succeeded for too long."""
        while not self._stop.wait(RENEW_S):
            try:
                written = self.kvstore.write(KEY, self._record(), if_equal=self.generation).result()
            except Exception:  # noqa: BLE001 (retried; check() decides when it is too late)
                continue
            if not written.generation:
                self.lost = True
                return
            self.generation, self.renewed = written.generation, time.time()


def _parse(value: bytes) -> dict | None:
    try:
        holder = json.loads(value)
        float(holder["heartbeat"])
        return holder
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: a write cut short; abandoned


def _alive(holder: dict) -> bool:
    """Whether the lease's holder may still be writing: its heartbeat is recent and, on this host,
    its process still runs (a pid that is gone frees the lease at once; a pid reused by another
    process after a restart holds it only until the heartbeat expires)."""
    if time.time() - float(holder["heartbeat"]) >= EXPIRES_S:
        return False
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError, TypeError):
            pass
    return True
