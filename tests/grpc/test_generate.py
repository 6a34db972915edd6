"""The committed protobuf and gRPC modules are exactly what the documented command makes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from v2mount.grpc import generate

#: sha256 of kserve/kserve @ aaac4e29 docs/predict-api/v2/grpc_predict_v2.proto.
SPEC_SHA256 = "408092a3cfb737c1be17e47211fd6b072211839f61d133af6512e64d4efcca04"


def test_the_generated_modules_are_up_to_date(capsys: pytest.CaptureFixture[str]) -> None:
    assert generate.main(["--check"]) == 0, capsys.readouterr().out


def test_the_check_notices_a_stale_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "v2mount" / "grpc" / "proto"
    folder.mkdir(parents=True)
    for path in generate.PROTO_DIR.iterdir():
        if path.is_file():
            (folder / path.name).write_bytes(path.read_bytes())
    stale = folder / "grpc_predict_v2_pb2.py"
    stale.write_text(stale.read_text() + "# edited by hand\n")
    monkeypatch.setattr(generate, "PROTO_DIR", folder)
    monkeypatch.setattr(generate, "ROOT", tmp_path)
    assert generate.main(["--check"]) == 1
    assert "grpc_predict_v2_pb2.py" in capsys.readouterr().out


def test_the_spec_proto_is_copied_unchanged() -> None:
    packaged = (generate.PROTO_DIR / "grpc_predict_v2.proto").read_bytes()
    assert hashlib.sha256(packaged).hexdigest() == SPEC_SHA256
