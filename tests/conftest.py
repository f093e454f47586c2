from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from medloupe.config import Settings
from tests.plugin_dist import install_plugin
from tests.postgres_helpers import Postgres

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session", autouse=True)
def medloupe_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache per test session (the default KB builds once), never the user's own; the
    environment is restored when the session ends.

    Set ``MEDLOUPE_TEST_CACHE`` to reuse a cache across sessions while developing."""
    path = Path(os.environ.get("MEDLOUPE_TEST_CACHE") or tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDLOUPE_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where the test plugin distribution (tests/plugin_dist.py) is installed."""
    return install_plugin(tmp_path_factory.mktemp("plugin"))


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    home = tmp_path / "home"
    monkeypatch.setenv("MEDLOUPE_HOME", str(home))
    return Settings(home=home)


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    import data_store

    return Path(data_store.__file__).parent / "data"


@pytest.fixture(scope="session")
def chest_dcm(dicom_dir: Path) -> Path:
    return dicom_dir / "RG1_UNCR.dcm"


@pytest.fixture(scope="session")
def ct_dcm(dicom_dir: Path) -> Path:
    return dicom_dir / "693_UNCR.dcm"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    path = SHARED / "datasets"
    if not path.is_dir():
        pytest.skip(f"../shared/datasets is absent ({path}); these tests need the shared data")
    return path


def cli_env(home: Path, extra_path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["MEDLOUPE_HOME"] = str(home)
    env["COLUMNS"] = "200"
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL server for the session (tests/postgres_helpers.py)."""
    try:
        server = Postgres().start()
    except FileNotFoundError as exc:
        pytest.skip(f"SKIPPED LOUDLY: PostgreSQL cannot be had here: no {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres: Postgres) -> str:
    """The URL of a new, empty database on the session's PostgreSQL."""
    return postgres.create_database()
