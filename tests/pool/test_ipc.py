"""Frames, the shared-memory arena and the request channel, without worker processes."""

from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest

from v2mount.errors import BadRequest, ModelError, Overloaded, V2MountError
from v2mount.metrics.custom import MetricUpdate
from v2mount.pool._arena import SHM_DIR, Arena, arena_path
from v2mount.pool._ipc import (
    HEADER,
    PICKLED_META,
    Channel,
    decode_reply,
    decode_request,
    encode_error,
    encode_request,
    encode_result,
    error_from_wire,
    error_to_wire,
    frame_route,
    updates_of,
)
from v2mount.types import InferenceRequest, InferenceResponse, RequestedOutput, Tensor

THRESHOLD = 64 * 1024


class Refused(BadRequest):
    """A model's own error class, importable by the parent."""


def flags(frame: bytes) -> int:
    return int(HEADER.unpack_from(frame)[2])


def one(name: str, array: np.ndarray, datatype: str = "FP32") -> InferenceRequest:
    return InferenceRequest([Tensor(name, datatype, array.shape, array)], id="i")


def test_arena_names_are_fresh_and_need_a_shared_memory_folder(tmp_path: Path) -> None:
    first, second = arena_path("v2mount-1-m-1"), arena_path("v2mount-1-m-1")
    assert first != second and first is not None and first.startswith(SHM_DIR)
    assert arena_path("x", directory=str(tmp_path / "missing")) is None
    assert Arena.create(str(tmp_path / "missing" / "arena")) is None


def test_large_buffers_go_through_the_arena_and_come_back_as_private_copies(
    arena: Arena,
) -> None:
    big = np.arange(1 << 20, dtype=np.float32)
    small = np.arange(8, dtype=np.int64)
    request = InferenceRequest(
        [Tensor("big", "FP32", big.shape, big), Tensor("small", "INT64", small.shape, small)]
    )
    frame = encode_request(request, 5, arena, THRESHOLD)
    assert len(frame) < 4096 and arena.size >= big.nbytes

    # The other end maps the same file (as a worker does) and decodes.
    other = Arena.attach(arena.path)
    assert other is not None
    seq, decoded = decode_request(bytearray(frame), other)
    other.close()
    assert seq == 5
    assert np.array_equal(decoded["big"], big) and np.array_equal(decoded["small"], small)
    assert decoded["big"].flags.writeable and decoded["big"].dtype == np.float32
    decoded["big"][0] = -1.0  # a private copy: the arena can be reused at once
    assert decode_request(bytearray(frame), arena)[1]["big"][0] == 0.0


def test_without_an_arena_everything_travels_in_the_frame() -> None:
    big = np.ones(1 << 18, dtype=np.float64)
    frame = encode_request(one("x", big, "FP64"), 1, None, THRESHOLD)
    assert len(frame) > big.nbytes
    seq, request = decode_request(bytearray(frame), None)
    assert seq == 1 and np.array_equal(request["x"], big) and request["x"].flags.writeable


def test_a_request_frame_names_its_model_slot_in_the_header() -> None:
    """A shared pool's worker runs the model of the frame's slot (16 bits of the header)."""
    for slot in (0, 7, (1 << 16) - 1):
        frame = encode_request(one("x", np.zeros(2, np.float32)), 3, None, THRESHOLD, slot=slot)
        assert frame_route(bytearray(frame)) == (slot, 3)
        assert decode_request(bytearray(frame), None)[0] == 3


def test_an_arena_that_cannot_grow_falls_back_to_the_frame(arena: Arena) -> None:
    assert not arena.reserve(1 << 60)  # far more than /dev/shm could spare
    assert arena.size == 0

    class Full(Arena):
        def reserve(self, needed: int) -> bool:
            return False

    full = Full(arena.path, os.open(arena.path, os.O_RDWR))
    big = np.ones(1 << 17, dtype=np.float32)
    frame = encode_request(one("x", big), 1, full, THRESHOLD)
    full.close()
    assert len(frame) > big.nbytes
    assert np.array_equal(decode_request(bytearray(frame), None)[1]["x"], big)


def test_arena_keeps_its_size_between_messages(arena: Arena) -> None:
    payload = np.zeros(3 << 20, dtype=np.uint8)
    encode_request(one("x", payload, "UINT8"), 1, arena, THRESHOLD)
    size = arena.size
    encode_request(one("x", payload[: 1 << 20], "UINT8"), 2, arena, THRESHOLD)
    assert arena.size == size == 4 << 20


@pytest.mark.parametrize(
    ("datatype", "array"),
    [
        ("BOOL", np.array([[True, False], [False, True]])),
        ("UINT8", np.arange(6, dtype=np.uint8).reshape(2, 3)),
        ("INT64", np.array([-(1 << 62), 7], np.int64)),
        ("FP16", np.array([0.5, -2.0], np.float16)),
        ("FP64", np.array(3.5)),  # a 0-d tensor
        ("FP32", np.arange(12, dtype=np.float32).reshape(3, 4).T),  # not contiguous
        ("FP32", np.arange(4, dtype=">f4")),  # big-endian
        ("BYTES", np.array([[b"a", b""], [b"caf\xc3\xa9", b"\0" * 3]], dtype=object)),
    ],
)
def test_tensors_of_every_kind_round_trip_without_pickle(datatype: str, array: np.ndarray) -> None:
    frame = encode_request(one("t", array, datatype), 3, None, THRESHOLD)
    assert not flags(frame) & PICKLED_META and b"\x80\x05" not in frame  # no pickle inside
    _, request = decode_request(bytearray(frame), None)
    tensor = request.input("t")
    assert tensor.datatype == datatype and tensor.shape == array.shape
    assert tensor.data.shape == array.shape and tensor.data.tolist() == array.tolist()
    assert tensor.data.dtype == array.dtype


def test_request_fields_round_trip_and_plain_parameters_need_no_pickle() -> None:
    request = InferenceRequest(
        [Tensor("s", "BYTES", (2,), np.array([b"a", b"bc"], object), {"content_type": "str"})],
        id="7",
        parameters={"p": [1, 2.5, None, {"q": "r"}], "flag": True},
        outputs=[RequestedOutput("y", {"binary_data": True})],
    )
    frame = encode_request(request, 9, None, THRESHOLD)
    assert not flags(frame) & PICKLED_META
    seq, again = decode_request(bytearray(frame), None)
    assert seq == 9 and again.id == "7" and again.parameters == request.parameters
    assert again.outputs == request.outputs and again.requested_output_names == ["y"]
    assert again.input("s").parameters == {"content_type": "str"}
    assert again["s"].tolist() == [b"a", b"bc"]


@pytest.mark.parametrize(
    "value", [(1, 2), np.float32(1.5), b"raw", float("nan"), 1 << 70, {1: "int key"}]
)
def test_parameters_json_would_change_travel_pickled_unchanged(value: object) -> None:
    request = InferenceRequest([Tensor("x", "FP32", (1,), np.ones(1, np.float32))])
    request.parameters = {"v": value}
    frame = encode_request(request, 1, None, THRESHOLD)
    assert flags(frame) & PICKLED_META
    again = decode_request(bytearray(frame), None)[1].parameters["v"]
    assert type(again) is type(value)
    assert again == value or (again != again and value != value)  # NaN is NaN


def test_objects_numpy_cannot_describe_are_pickled_per_tensor() -> None:
    mixed = np.array([b"bytes", "text", 3], dtype=object)
    frame = encode_request(one("m", mixed, "BYTES"), 1, None, THRESHOLD)
    assert decode_request(bytearray(frame), None)[1]["m"].tolist() == [b"bytes", "text", 3]


def test_results_carry_metrics_and_errors_keep_theirs(arena: Arena) -> None:
    updates = [MetricUpdate("counter", "calls", "calls", (("model", "m"),), 1.0)]
    big = np.ones(1 << 16, dtype=np.float32)
    response = InferenceResponse("m", [Tensor("y", "FP32", big.shape, big)], "2", "7", {"k": 1})
    frame = bytearray(encode_result(response, 4, updates, arena, THRESHOLD))
    reply = decode_reply(frame, arena)
    assert reply.seq == 4 and reply.updates == updates and updates_of(frame) == updates
    assert isinstance(reply.outcome, InferenceResponse)
    back = reply.outcome
    assert (back.model_name, back.model_version, back.id, back.parameters) == (
        "m",
        "2",
        "7",
        {"k": 1},
    )
    assert np.array_equal(back.output("y").data, big)

    error = bytearray(encode_error(ValueError("x must be positive"), 5, updates))
    failed = decode_reply(error, None)
    assert failed.seq == 5 and failed.updates == updates and updates_of(error) == updates
    assert type(failed.outcome) is ModelError
    assert failed.outcome.message == "ValueError: x must be positive"


def test_the_channel_moves_whole_frames_in_pieces() -> None:
    """Frames larger than the socket buffer go out and come in over several calls."""
    left, right = socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    with left, right:
        sender, receiver = Channel(left.fileno()), Channel(right.fileno())
        os.set_blocking(left.fileno(), False)
        os.set_blocking(right.fileno(), False)
        big = np.arange(1 << 18, dtype=np.float32)
        frame = encode_request(one("x", big), 11, None, THRESHOLD)
        sender.begin(frame)
        rounds, got = 0, None
        while got is None:
            sender.write_some()
            got = receiver.read_some()
            rounds += 1
        assert rounds > 1 and not sender.writing and not receiver.reading
        seq, request = decode_request(got, None)
        assert seq == 11 and np.array_equal(request["x"], big)
        assert receiver.read_some() is None  # nothing more, and the channel is reusable
        right.close()
        sender.begin(frame)
        with pytest.raises(OSError):
            while not sender.write_some():
                pass


def test_a_frame_cut_short_is_end_of_file() -> None:
    left, right = socket.socketpair()
    with left, right:
        frame = encode_request(one("x", np.ones(4, np.float32)), 1, None, THRESHOLD)
        left.sendall(frame[: len(frame) // 2])
        left.close()
        receiver = Channel(right.fileno())
        with pytest.raises(EOFError):
            receiver.receive()


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
    assert pickle.loads(pickle.dumps(error)).message == "local"
