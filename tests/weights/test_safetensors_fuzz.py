"""Fuzz the safetensors path with corrupt files and hostile config.json values: only our own errors
(CheckpointError, ConfigError, ContextLengthError), no crash, no huge allocation, no hang."""

import json
import struct
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from limits import LOAD_MB, bounded
from safetensors.torch import save_file
from testing_utils import random_model

from gemma4.config import FULL, SLIDING, ConfigError, ContextLengthError
from gemma4.weights import CheckpointError, load_model, save
from gemma4.weights.safetensors import open_tensors

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    save_file({"a": torch.randn(8, 16), "b": torch.arange(10), "c": torch.randn(3).bfloat16()}, path)
    return path.read_bytes()


def read_all(path):
    for _, get, _ in open_tensors([path]):
        get()


def check(tmp_path, data: bytes):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        read_all(path)  # a mutation that keeps the file valid is fine too
    except CheckpointError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 32 * 2**20


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(cut=st.integers(min_value=0, max_value=10_000))
def test_truncated(tmp_path, good_file, cut):
    check(tmp_path, good_file[: min(cut, len(good_file) - 1)])


@SETTINGS
@given(data=st.data())
def test_header_byte_flips(tmp_path, good_file, data):
    header_end = 8 + struct.unpack("<Q", good_file[:8])[0]
    buf = bytearray(good_file)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, header_end - 1))
        buf[i] = data.draw(st.integers(0, 255))
    check(tmp_path, bytes(buf))


@SETTINGS
@given(blob=st.binary(max_size=512))
def test_random_bytes(tmp_path, blob):
    check(tmp_path, blob)


@SETTINGS
@given(claimed=st.integers(min_value=0, max_value=2**64 - 1))
def test_absurd_header_length(tmp_path, good_file, claimed):
    check(tmp_path, struct.pack("<Q", claimed) + good_file[8:])


# ------------------------------------------------------------------------------------------------
# config.json fields: sizes, counts, types and nested RoPE objects, loaded against real weights.
# Bounds per example: a 5 s deadline (20 s hard stop) and under LOAD_MB of added peak RSS (limits.py).

BASES = ("tiny-gemma-3-270m", "tiny-e2b", "tiny-26b-a4b")  # Gemma 3; PLE + KV sharing; MoE + k_eq_v
DELETE = object()
SIZES = st.sampled_from([0, 1, 2, 3, 4, 6, 7, 8, 16, 64, 128, 1023, 10**8, 2**31, 2**63, 2**64, -1, -64])
SCALARS = st.one_of(SIZES, st.integers(-2, 300), st.integers(), st.floats(), st.booleans(), st.none(),
                    st.text(max_size=6), st.sampled_from([SLIDING, FULL, "default", "linear", "proportional", "64"]))
KEYS = st.sampled_from([SLIDING, FULL, "rope_type", "rope_theta", "factor", "partial_rotary_factor", "head_dim",
                        "num_key_value_heads", "0", "5"])
VALUES = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=8) | st.dictionaries(KEYS, kids, max_size=3),
                      max_leaves=8)
EXTRA_FIELDS = ["sliding_window_pattern", "per_layer_config", "rope_scaling", "rope_theta", "query_pre_attn_scalar",
                "global_head_dim", "num_global_key_value_heads"]  # absent from some bases
CONFIG_FUZZ = settings(max_examples=150, deadline=5000, derandomize=True, database=None,
                       suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def base_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {name: save(root / name, random_model(name)) for name in BASES}


@CONFIG_FUZZ
@given(base=st.sampled_from(BASES), data=st.data())
def test_fuzz_config_fields(base_checkpoints, tmp_path_factory, base, data):
    src = base_checkpoints[base]
    config = json.loads((src / "config.json").read_text())
    fields = data.draw(st.lists(st.sampled_from(sorted(config) + EXTRA_FIELDS), min_size=1, max_size=3, unique=True))
    for field in fields:
        value = data.draw(st.one_of(SIZES, st.integers(-2, 300), VALUES, st.just(DELETE)), label=field)
        if value is DELETE:
            config.pop(field, None)
        else:
            config[field] = value
    path = tmp_path_factory.mktemp("cfg")
    (path / "model.safetensors").symlink_to(src / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config))
    with bounded(seconds=20, memory_mb=LOAD_MB):
        try:
            model = load_model(path)
            with torch.no_grad():
                model(torch.tensor([[2, 5, 7, 9]]))  # a clean load is a usable model
        except (CheckpointError, ConfigError, ContextLengthError) as e:
            assert str(e)
