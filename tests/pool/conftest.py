"""Fixtures of the pool tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from v2mount.pool._arena import Arena


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[Arena]:
    """A shared-memory arena of the test's own (in ``tmp_path``), unlinked afterwards."""
    created = Arena.create(str(tmp_path / "arena"))
    assert created is not None
    yield created
    created.close()
    created.unlink()
