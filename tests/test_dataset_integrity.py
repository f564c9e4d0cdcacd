"""`jaxlrp.explain_dataset` refuses to mix runs and never writes a silent wrong row: provenance,
checksummed chunks, one writer, per-row status, and `out`, `targets` and `explain` as users pass
them. The fault-injection tests with killed processes are in `test_dataset.py`."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

import jaxlrp
from jaxlrp import composites

import models

MODEL = models.CNN()
N, BATCH = 37, 16


@pytest.fixture(scope="module")
def setup():
    variables, _ = models.init(MODEL, (1, 8, 8, 2), dtype=np.float32)
    x = np.random.default_rng(0).normal(size=(N, 8, 8, 2)).astype(np.float32)
    targets = np.arange(N) % 3
    explain = jaxlrp.lrp(MODEL, composites.EpsilonPlusFlat())
    return explain, variables, x, targets, explain(variables, x, target=targets)


def _run(setup, out, **changes):
    explain, variables, x, targets, _ = setup
    arguments = dict(explain=explain, variables=variables, x=x, targets=targets, out=out, batch_size=BATCH,
                     progress=False)
    arguments.update(changes)
    return jaxlrp.explain_dataset(arguments.pop("explain"), arguments.pop("variables"), arguments.pop("x"),
                                  **arguments)


def _files(path) -> dict:
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(path) for f in fs}


def _chunk(path, name: str, c: int) -> str:
    return os.path.join(path, name, "c", str(c), *["0"] * (3 if name != "status" else 0))


@pytest.fixture
def finished(setup, tmp_path):
    out = tmp_path / "r"
    _run(setup, out)
    return out


def test_a_store_from_another_run_is_refused_before_any_work(setup, finished):
    explain, variables, x, targets, _ = setup
    before = _files(finished)
    other_weights = jax.tree.map(lambda a: a * 1.01, variables)
    other_data = x.copy()
    other_data[20, 3, 3, 1] += 1.0  # one value in the second chunk
    cases = {
        "the weights": dict(variables=other_weights),
        "the program": dict(explain=jaxlrp.lrp(MODEL, composites.EpsilonGammaBox(-3.0, 3.0))),
        "epsilon=0.25": dict(explain=jaxlrp.lrp(MODEL, composites.EpsilonPlus(epsilon=0.25))),
        "rows 32:37": dict(targets=np.where(np.arange(N) == 33, (targets + 1) % 3, targets)),
        "rows 16:32": dict(x=other_data),
        "its targets were a class per sample, now none": dict(targets=None),
        "chunks of 16 rows, but this run writes chunks of 8": dict(batch_size=8),
        "'relevance' holds shape": dict(dtype=np.float64),
    }
    for said, change in cases.items():
        with pytest.raises(ValueError, match="Resuming would mix two runs") as error:
            _run(setup, finished, **change)
        assert said in str(error.value) and "overwrite=True" in str(error.value)
    assert _files(finished) == before  # nothing written, nothing left behind (no lease)
    written = _run(setup, finished, variables=other_weights, overwrite=True)
    np.testing.assert_allclose(np.asarray(written), explain(other_weights, x, target=targets), rtol=1e-5, atol=1e-6)


def test_a_resume_checks_data_only_where_chunks_are_done(setup, finished):
    """A stopped run (chunk 1's status never written) resumed with other data in that chunk is no
    mix: the chunk is computed from the new data; other data in a finished chunk is refused."""
    explain, variables, x, targets, _ = setup
    os.remove(_chunk(finished, "status", 1))
    other = x.copy()
    other[20] += 1.0
    written = _run(setup, finished, x=other)
    np.testing.assert_allclose(np.asarray(written[16:32]), explain(variables, other, target=targets)[16:32],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rows 0:16"):
        _run(setup, finished, x=other * 2)


def test_corrupt_chunks_are_found_verified_and_recomputed(setup, finished):
    reference = setup[-1]
    assert jaxlrp.verify_dataset(finished, x=setup[2], targets=setup[3]).complete
    damaged = [_chunk(finished, "relevance", 0), _chunk(finished, "relevance", 1), _chunk(finished, "status", 2)]
    original = [open(p, "rb").read() for p in damaged]
    open(damaged[0], "wb").write(original[0][: len(original[0]) // 2])  # cut short
    open(damaged[1], "wb").write(b"garbage")
    flipped = bytearray(original[2])
    flipped[3] ^= 0x10
    open(damaged[2], "wb").write(bytes(flipped))  # one bit
    report = jaxlrp.verify_dataset(finished)
    assert not report.complete and sorted(report.corrupt) == [(0, 16), (16, 32), (32, 37)], report
    with pytest.warns(jaxlrp.CorruptChunkWarning, match="3 chunk"):
        written = _run(setup, finished)
    np.testing.assert_allclose(np.asarray(written), reference, rtol=1e-5, atol=1e-6)
    assert jaxlrp.verify_dataset(finished).complete


def test_a_replaced_or_missing_chunk_is_found(setup, finished):
    relevance = [_chunk(finished, "relevance", c) for c in (0, 1)]
    data = open(relevance[1], "rb").read()
    open(relevance[0], "wb").write(data)  # a valid chunk, but another one's
    os.remove(_chunk(finished, "relevance", 2))
    report = jaxlrp.verify_dataset(finished)
    assert "output digest differs" in report.corrupt[(0, 16)] and "missing: relevance" in report.corrupt[(32, 37)]
    with pytest.warns(jaxlrp.CorruptChunkWarning, match="1 chunk"):  # the missing one is simply not done
        written = _run(setup, finished)
    np.testing.assert_allclose(np.asarray(written), setup[-1], rtol=1e-5, atol=1e-6)
    assert jaxlrp.verify_dataset(finished).complete


def test_every_single_bit_flip_of_a_chunk_is_caught(finished):
    path = _chunk(finished, "relevance", 2)
    original = open(path, "rb").read()
    rng = np.random.default_rng(3)
    for bit in rng.choice(len(original) * 8, size=60, replace=False):
        data = bytearray(original)
        data[bit // 8] ^= 1 << (bit % 8)
        open(path, "wb").write(bytes(data))
        assert list(jaxlrp.verify_dataset(finished).corrupt) == [(32, 37)], bit
    open(path, "wb").write(original)
    assert jaxlrp.verify_dataset(finished).complete


def test_verify_reports_data_that_differ(setup, finished):
    x = setup[2].copy()
    x[3] = 0.0
    report = jaxlrp.verify_dataset(finished, x=x, targets=setup[3])
    assert report.mismatched == ((0, 16),) and not report.complete
    assert report.provenance["jax"] == jax.__version__ and report.counts[jaxlrp.RowStatus.EXPLAINED] == N


def _lease(out, **holder):
    record = {"owner": "someone", "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time(), **holder}
    os.makedirs(out, exist_ok=True)
    (out / "jaxlrp.lease").write_text(json.dumps(record))


def test_a_live_writer_is_refused_and_an_abandoned_lease_taken_over(setup, tmp_path):
    reference = setup[-1]
    for holder in ({}, {"host": "elsewhere", "pid": 1}):  # this process; another host, heartbeat fresh
        out = tmp_path / f"held-{len(holder)}"
        _lease(out, **holder)
        with pytest.raises(jaxlrp.LeaseHeld, match="being written by another run"):
            _run(setup, out)
        assert os.listdir(out) == ["jaxlrp.lease"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # A pid gone; another host's stale heartbeat; this host's live pid (reused after a restart)
    # with a stale heartbeat; an unreadable lease.
    for holder in ({"pid": dead.pid}, {"host": "elsewhere", "heartbeat": time.time() - 60},
                   {"heartbeat": time.time() - 60}, {"heartbeat": "?"}):
        out = tmp_path / f"abandoned-{len(os.listdir(tmp_path))}"
        _lease(out, **holder)
        np.testing.assert_allclose(np.asarray(_run(setup, out)), reference, rtol=1e-5, atol=1e-6)
        assert not (out / "jaxlrp.lease").exists()  # given back


def test_a_lease_that_cannot_be_renewed_is_lost(monkeypatch):
    from jaxlrp import _lease

    class Failing:
        """A store whose writes fail after the first (the lease taken, then storage errors)."""

        def __init__(self):
            self.kvstore, self.writes = ts.KvStore.open("memory://").result(), 0

        def read(self, key):
            return self.kvstore.read(key)

        def write(self, key, value, **kwargs):
            self.writes += 1
            if self.writes > 1:
                raise ValueError("UNAVAILABLE: the storage is gone")
            return self.kvstore.write(key, value, **kwargs)

    monkeypatch.setattr(_lease, "RENEW_S", 0.01)
    lease = _lease.Lease(Failing(), "memory://")
    lease.acquire()
    time.sleep(0.1)
    assert lease._thread.is_alive() and lease.kvstore.writes > 2  # renewals retried, the thread alive
    lease.check()  # renewed recently enough
    lease.renewed -= _lease.EXPIRES_S
    with pytest.raises(jaxlrp.LeaseHeld, match="was taken over by another run|did not renew"):
        lease.check()
    lease._stop.set()


def test_invalid_rows_are_recorded_never_written_as_valid(setup, tmp_path):
    explain, variables, x, targets, reference = setup
    x, targets = x.copy(), targets.copy()
    x[3, 0, 0, 0] = np.nan
    targets[5], targets[7] = -1, 3  # the model has 3 classes
    wrapped = lambda v, batch, target: explain(v, batch, target=target)  # noqa: E731 (no output known)
    for i, fn in enumerate((explain, wrapped)):
        with pytest.warns(jaxlrp.InvalidRowsWarning, match="3 of 37 rows could not be explained"):
            written = _run(setup, tmp_path / f"r{i}", explain=fn, x=x, targets=targets)
        status = ts.open({"driver": "zarr3", "kvstore": f"file://{tmp_path}/r{i}/status/"}).result().read().result()
        out_of_range = jaxlrp.RowStatus.TARGET_OUT_OF_RANGE if fn is explain else jaxlrp.RowStatus.RELEVANCE_NOT_FINITE
        expected = np.full(N, jaxlrp.RowStatus.EXPLAINED)
        expected[3], expected[5], expected[7] = jaxlrp.RowStatus.INPUT_NOT_FINITE, jaxlrp.RowStatus.TARGET_OUT_OF_RANGE, out_of_range
        np.testing.assert_array_equal(status, expected)
        maps = np.asarray(written)
        assert np.isnan(maps[[3, 5, 7]]).all()
        rest = np.setdiff1d(np.arange(N), [3, 5, 7])
        np.testing.assert_allclose(maps[rest], reference[rest], rtol=1e-5, atol=1e-6)
        counts = jaxlrp.verify_dataset(tmp_path / f"r{i}").counts
        assert counts[jaxlrp.RowStatus.EXPLAINED] == N - 3 and counts[jaxlrp.RowStatus.UNWRITTEN] == 0
    out, nan_tail = tmp_path / "tail", x.copy()
    nan_tail[32:] = np.nan  # the last chunk all invalid, all NaN: stored all the same, done
    with pytest.warns(jaxlrp.InvalidRowsWarning):
        _run(setup, out, x=nan_tail, targets=None)
    before = _files(out)
    with pytest.warns(jaxlrp.InvalidRowsWarning):
        _run(setup, out, x=nan_tail, targets=None)
    assert _files(out) == before and jaxlrp.verify_dataset(out).complete  # nothing computed again


def test_a_traced_target_out_of_range_gives_nan_not_zeros(setup):
    explain, variables, x, _, _ = setup
    relevance = jax.jit(lambda t: explain(variables, x[:3], target=t))(jnp.array([0, 3, -1]))
    assert np.isfinite(relevance[0]).all() and np.isnan(relevance[1:]).all()


def test_out_as_users_write_it(setup, tmp_path, monkeypatch):
    reference = setup[-1]
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    forms = ["./a.zarr", "../b.zarr", "~/c.zarr", tmp_path / "d.zarr", f"file://{tmp_path}/e.zarr",
             {"driver": "file", "path": str(tmp_path / "f.zarr")}, "memory://g"]
    for out in forms:
        np.testing.assert_allclose(np.asarray(_run(setup, out)), reference, rtol=1e-5, atol=1e-6, err_msg=str(out))
    assert {"a.zarr", "b.zarr", "home", "d.zarr", "e.zarr", "f.zarr"} <= set(os.listdir(tmp_path / "work")) | set(
        os.listdir(tmp_path))
    assert (tmp_path / "home" / "c.zarr" / "zarr.json").exists() and not (tmp_path / "work" / "~").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; it must name a directory"):
        _run(setup, tmp_path / "file")
    with pytest.raises(TypeError, match="out is a directory"):
        _run(setup, 3)
    with pytest.raises(TypeError, match="dtype is the floating dtype"):
        _run(setup, tmp_path / "h", dtype=np.int32)
    with pytest.raises(ValueError, match="holds 1 file"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("mine")
        _run(setup, tmp_path / "other")
    assert not (tmp_path / "h").exists()


def test_many_targets_recorded_layers_and_outputs_are_arrays(setup, tmp_path):
    explain, variables, x, targets, reference = setup
    many = np.stack([targets, (targets + 1) % 3], axis=1)  # (N, 2)
    for batch_size in (BATCH, 2):  # K = 2 targets; with batch_size 2 the axes K and B are equally long
        written = _run(setup, tmp_path / f"many{batch_size}", targets=many, batch_size=batch_size)
        assert written.shape == (N, 2, 8, 8, 2)
        np.testing.assert_allclose(np.asarray(written), np.moveaxis(explain(variables, x, target=many), 0, 1),
                                   rtol=1e-5, atol=1e-6)
    recording = jaxlrp.lrp(MODEL, composites.EpsilonPlusFlat(), record=("Conv_1",))
    stores = _run(setup, tmp_path / "recorded", explain=recording)
    direct = recording(variables, x, target=targets)
    assert isinstance(stores, jaxlrp.Explanation) and set(stores.layers) == {"Conv_1"}
    for got, want in ((stores.input, direct.input), (stores.layers["Conv_1"], direct.layers["Conv_1"]),
                      (stores.activations["Conv_1"], direct.activations["Conv_1"])):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "recorded" / "layers" / "Conv_1" / "zarr.json").exists()
    with_output = jaxlrp.output_and_lrp(MODEL, composites.EpsilonPlusFlat())
    output, relevance = _run(setup, tmp_path / "outputs", explain=with_output)
    np.testing.assert_allclose(np.asarray(output), MODEL.apply(variables, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(relevance), reference, rtol=1e-5, atol=1e-6)
