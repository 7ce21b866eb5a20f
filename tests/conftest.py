from __future__ import annotations

from pathlib import Path

import pytest

from confide.enclave.keys import Identity

REPO = Path(__file__).resolve().parents[1]
TESTVECTORS = REPO.parent / "shared" / "testvectors"


@pytest.fixture
def alice() -> Identity:
    return Identity.generate("alice")


@pytest.fixture
def bob() -> Identity:
    return Identity.generate("bob")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "confide-home"
    monkeypatch.setenv("CONFIDE_HOME", str(root))
    return root
