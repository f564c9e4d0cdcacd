"""Test settings: JAX's default numerics unless a test asks for float64; 8 CPU devices; Keras on its JAX backend.

Users run JAX with `jax_enable_x64` off, so every test does too, unless it (or its module,
through `pytestmark`) carries the `float64` marker: the parity tests against the peers and the
float64 references turn x64 on for their setup (fixtures included) and their run. A test that
asks for float64 without the marker fails (pyproject.toml makes JAX's truncation warning an
error) instead of silently computing in float32.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("KERAS_BACKEND", "jax")  # Keras reads it once, when first imported

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "float64: runs with jax_enable_x64 on (float64 parity and references); "
        "every other test runs in JAX's default configuration, x64 off")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before the test's fixtures are made, so that they are made in its precision too."""
    jax.config.update("jax_enable_x64", item.get_closest_marker("float64") is not None)

