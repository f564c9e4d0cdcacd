"""`jaxlrp.explain_dataset`: equal to a direct call, sharded, resumable after a kill, one writer at
a time, no resume with other weights, multi-host."""

import collections
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

import jaxlrp
from jaxlrp import composites

import models

WORKER = str(pathlib.Path(__file__).parent / "dataset_worker.py")
MODEL = models.CNN()


@pytest.fixture(scope="module")
def setup():
    variables, _ = models.init(MODEL, (1, 8, 8, 2), dtype=np.float32)
    x = np.random.default_rng(0).normal(size=(37, 8, 8, 2)).astype(np.float32)
    explain = jaxlrp.lrp(MODEL, composites.EpsilonPlusFlat())
    return explain, variables, x


def _read(path, name="relevance") -> np.ndarray:
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{path}/{name}/"}}).result().read().result()


@pytest.mark.parametrize("sharded", [False, True])
def test_equals_a_direct_call_with_a_short_last_batch(setup, tmp_path, sharded):
    explain, variables, x = setup
    targets = np.arange(len(x)) % 3
    mesh = jax.make_mesh((8,), ("data",)) if sharded else None
    written = jaxlrp.explain_dataset(explain, variables, x, targets=targets, out=tmp_path / "r", batch_size=16, mesh=mesh,
                                     progress=False)
    assert written.shape == x.shape and written.dtype.numpy_dtype == np.float32
    np.testing.assert_allclose(np.asarray(written), explain(variables, x, target=targets), rtol=1e-5, atol=1e-6)
    chunk_rows = 16 // 8 if sharded else 16  # one chunk per device shard; none past the end
    assert len(os.listdir(tmp_path / "r" / "relevance" / "c")) == -(-len(x) // chunk_rows)


def test_reads_zarr_memmap_and_token_ids_and_seeds(setup, tmp_path):
    explain, variables, x = setup
    memmap = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=x.shape)
    memmap[:] = x
    store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "x.zarr")}},
                    create=True, dtype=ts.float32, shape=x.shape).result()
    store[...] = x
    seeds = np.random.default_rng(1).normal(size=(len(x), 3)).astype(np.float32)
    reference = explain(variables, x, target=seeds)
    for i, source in enumerate((memmap, store)):
        written = jaxlrp.explain_dataset(explain, variables, source, targets=seeds, out=tmp_path / f"r{i}", batch_size=10,
                                         progress=False, dtype=np.float64)
        assert written.dtype.numpy_dtype == np.float64
        np.testing.assert_allclose(np.asarray(written), reference, rtol=1e-5, atol=1e-6)


def test_stateful_nnx_module_in_bfloat16(tmp_path):
    from flax import nnx

    model = nnx.Sequential(nnx.Conv(2, 4, (3, 3), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
                           nnx.relu, lambda h: h.mean((1, 2)),
                           nnx.Linear(4, 3, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=nnx.Rngs(1)))
    x = np.random.default_rng(2).normal(size=(11, 8, 8, 2)).astype(jnp.bfloat16)
    explain = jaxlrp.lrp(model, composites.EpsilonPlusFlat())
    written = jaxlrp.explain_dataset(explain, None, x, out=tmp_path / "r", batch_size=8,
                                     mesh=jax.make_mesh((8,), ("data",)), progress=False)
    np.testing.assert_array_equal(np.asarray(written), np.asarray(explain(x), np.float32))


def test_progress_bar_reports_throughput(setup, tmp_path, capsys):
    explain, variables, x = setup
    jaxlrp.explain_dataset(explain, variables, x[:5], out=tmp_path / "r", batch_size=4)
    shown = capsys.readouterr().out
    assert "5/5" in shown and "samples/s" in shown


def test_bad_input_is_an_error_before_any_work(setup, tmp_path):
    explain, variables, x = setup
    jaxlrp.explain_dataset(explain, variables, x[:8], out=tmp_path / "r", batch_size=8, progress=False)
    with pytest.raises(ValueError, match=r"'relevance' holds shape \(8, 8, 8, 2\).*this run writes shape \(9, 8, 8, 2\)"):
        jaxlrp.explain_dataset(explain, variables, x[:9], out=tmp_path / "r", batch_size=8, progress=False)
    with pytest.raises(ValueError, match="targets has 3 rows, but x has 9 samples"):
        jaxlrp.explain_dataset(explain, variables, x[:9], targets=np.zeros(3, int), out=tmp_path / "s", batch_size=8)
    with pytest.raises(ValueError, match="batch_size 12 does not divide over the 8 devices"):
        jaxlrp.explain_dataset(explain, variables, x, out=tmp_path / "s", batch_size=12,
                               mesh=jax.make_mesh((8,), ("data",)))
    with pytest.raises(ValueError, match="needs an axis named 'data'"):
        jaxlrp.explain_dataset(explain, variables, x, out=tmp_path / "s", batch_size=8,
                               mesh=jax.make_mesh((8,), ("batch",)))
    assert not (tmp_path / "s").exists()


def _worker(out, *flags, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.Popen([sys.executable, WORKER, str(out), *flags], stdout=subprocess.PIPE, text=True,
                            env=env, **kwargs)


def _finish(process):
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0 and "DONE" in out, out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "r"
    _finish(_worker(out))
    return _read(out)


def _chunks(path) -> dict:
    """`{chunk: mtime}` of the relevance chunks whose status is written (the chunks done)."""
    done = {f for f in os.listdir(path / "status" / "c") if f.isdigit()}
    return {f: os.stat(path / "relevance" / "c" / f / "0" / "0" / "0").st_mtime_ns for f in done}


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted):
    out = tmp_path / "r"
    process = _worker(out, "--block-at", "24")  # hangs loading the fourth batch, the first one written
    assert process.stdout.readline().strip() == "BLOCKED"
    process.kill()
    process.wait()
    before = _chunks(out)
    assert 0 < len(before) < 15  # 29 rows in chunks of 2: some written, not all
    _finish(_worker(out, "--log", str(tmp_path / "read.json")))
    np.testing.assert_array_equal(_read(out), uninterrupted)
    after = _chunks(out)
    assert len(after) == 15 and all(after[f] == t for f, t in before.items())  # none written twice
    read = json.loads((tmp_path / "read.json").read_text())
    # Each chunk is read once: a finished one to check its input digest, a missing one to compute
    # it. Besides: (0, 1), the row read for the input's dtype, and (28, 29), the last row, read again
    # as the last batch's padding.
    chunks = collections.Counter((a, b) for a, b in read if (a, b) not in ((0, 1), (28, 29)))
    assert chunks == collections.Counter((a, a + 2) for a in range(0, 28, 2))


def test_one_writer_at_a_time_and_no_resume_with_other_weights(tmp_path, uninterrupted):
    out = tmp_path / "r"
    first = _worker(out, "--block-at", "24")
    assert first.stdout.readline().strip() == "BLOCKED"
    second = _worker(out, stderr=subprocess.PIPE)
    _, error = second.communicate(timeout=300)
    assert second.returncode != 0 and "is being written by another run" in error, error
    first.kill()
    first.wait()
    other = _worker(out, "--weights-scale", "1.01", stderr=subprocess.PIPE)
    _, error = other.communicate(timeout=300)
    assert other.returncode != 0 and "the weights (variables) differ" in error, error
    _finish(_worker(out))  # the killed run's lease lapsed at once: same host, its process gone
    np.testing.assert_array_equal(_read(out), uninterrupted)


def test_two_processes_write_what_one_writes(tmp_path, uninterrupted):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / "r"
    workers = [_worker(out, "--process", str(i), "--processes", "2", "--port", port) for i in range(2)]
    for process in workers:
        _finish(process)
    np.testing.assert_array_equal(_read(out), uninterrupted)
