"""docs/settings.md is what docs/gen_settings.py makes of the settings models today."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from tests.support import load_module
from v2mount.settings import ModelSettings, Settings, TensorSpec

DOCS = Path(__file__).resolve().parents[2] / "docs"


def generator() -> ModuleType:
    return load_module(DOCS / "gen_settings.py", "v2mount_docs_gen_settings")


def test_the_settings_page_is_up_to_date() -> None:
    page = (DOCS / "settings.md").read_text(encoding="utf-8")
    assert page == generator().render(), "docs/settings.md is stale: python docs/gen_settings.py"


def test_every_field_and_variable_is_on_the_page() -> None:
    page = generator().render()
    for name in Settings.model_fields:
        assert f"| `{name}` | `V2MOUNT_{name.upper()}` | " in page
    for model in (ModelSettings, TensorSpec):
        for name in model.model_fields:
            assert f"| `{name}` |" in page or name == "source_dir"
