"""Frames, the shared-memory arena and the wire tuples, without processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from v2mount.errors import BadRequest, ModelError, Overloaded, V2MountError
from v2mount.pool._ipc import (
    SHM_DIR,
    Arena,
    arena_path,
    decode,
    encode,
    error_from_wire,
    error_to_wire,
    request_from_wire,
    request_to_wire,
    response_from_wire,
    response_to_wire,
)
from v2mount.types import InferenceRequest, InferenceResponse, RequestedOutput, Tensor

THRESHOLD = 64 * 1024


class Refused(BadRequest):
    """A model's own error class, importable by the parent."""


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[Arena]:
    created = Arena.create(str(tmp_path / "arena"))
    assert created is not None
    yield created
    created.close()
    created.unlink()


def test_arena_names_are_fresh_and_need_a_shared_memory_folder(tmp_path: Path) -> None:
    first, second = arena_path("v2mount-1-m-1"), arena_path("v2mount-1-m-1")
    assert first != second and first is not None and first.startswith(SHM_DIR)
    assert arena_path("x", directory=str(tmp_path / "missing")) is None
    assert Arena.create(str(tmp_path / "missing" / "arena")) is None


def test_large_buffers_go_through_the_arena_and_come_back_as_private_copies(
    arena: Arena, tmp_path: Path
) -> None:
    big = np.arange(1 << 20, dtype=np.float32)
    small = np.arange(8, dtype=np.int64)
    frame = encode({"big": big, "small": small}, arena, THRESHOLD)
    assert len(frame) < 4096 and arena.size >= big.nbytes

    # The other end maps the same file (as a worker does) and decodes.
    other = Arena.attach(arena.path)
    assert other is not None
    decoded = decode(frame, other)
    other.close()
    assert np.array_equal(decoded["big"], big) and np.array_equal(decoded["small"], small)
    assert decoded["big"].flags.writeable and decoded["big"].dtype == np.float32
    decoded["big"][0] = -1.0  # a private copy: the arena can be reused at once
    assert decode(frame, arena)["big"][0] == 0.0


def test_without_an_arena_everything_travels_in_the_frame() -> None:
    big = np.ones(1 << 18, dtype=np.float64)
    frame = encode((1, big), None, THRESHOLD)
    assert len(frame) > big.nbytes
    seq, array = decode(frame, None)
    assert seq == 1 and np.array_equal(array, big)


def test_an_arena_that_cannot_grow_falls_back_to_the_frame(arena: Arena) -> None:
    assert not arena.reserve(1 << 60)  # far more than /dev/shm could spare
    assert arena.size == 0

    class Full(Arena):
        def reserve(self, needed: int) -> bool:
            return False

    full = Full(arena.path, os.open(arena.path, os.O_RDWR))
    big = np.ones(1 << 17, dtype=np.float32)
    frame = encode(big, full, THRESHOLD)
    full.close()
    assert len(frame) > big.nbytes and np.array_equal(decode(frame, None), big)


def test_arena_keeps_its_size_between_messages(arena: Arena) -> None:
    payload = np.zeros(3 << 20, dtype=np.uint8)
    encode(payload, arena, THRESHOLD)
    size = arena.size
    encode(payload[: 1 << 20], arena, THRESHOLD)
    assert arena.size == size == 4 << 20


def test_request_and_response_wire_round_trip() -> None:
    data = np.array([b"a", b"bc"], dtype=object)
    request = InferenceRequest(
        [Tensor("s", "BYTES", (2,), data, {"content_type": "str"})],
        id="7",
        parameters={"p": [1, 2]},
        outputs=[RequestedOutput("y", {"binary_data": True})],
    )
    again = request_from_wire(request_to_wire(request))
    assert again.id == "7" and again.parameters == {"p": [1, 2]}
    assert again.outputs == request.outputs and again.requested_output_names == ["y"]
    assert again.input("s").parameters == {"content_type": "str"}
    assert again["s"].tolist() == [b"a", b"bc"]

    response = InferenceResponse("m", [Tensor("y", "FP32", (1,), np.ones(1, np.float32))], "2", "7")
    back = response_from_wire(response_to_wire(response))
    assert (back.model_name, back.model_version, back.id) == ("m", "2", "7")
    assert back.output("y").data.tolist() == [1.0]


def test_errors_keep_their_class_and_message() -> None:
    bad = error_from_wire(error_to_wire(BadRequest("no")))
    assert type(bad) is BadRequest and bad.message == "no"

    busy = error_from_wire(error_to_wire(Overloaded("full", retry_after=7)))
    assert isinstance(busy, Overloaded) and busy.headers() == {"Retry-After": "7"}

    own = error_from_wire(error_to_wire(Refused("mine")))
    assert type(own) is Refused and own.message == "mine" and own.status_code == 400

    plain = error_from_wire(error_to_wire(ValueError("x must be positive")))
    assert type(plain) is ModelError and plain.message == "ValueError: x must be positive"


def test_an_error_class_the_parent_cannot_import_falls_back_to_its_v2mount_base() -> None:
    class Local(BadRequest):  # not picklable by reference
        pass

    wire = error_to_wire(Local("local"))
    assert wire[2] is None
    error: V2MountError = error_from_wire(wire)
    assert type(error) is BadRequest and error.message == "local"
