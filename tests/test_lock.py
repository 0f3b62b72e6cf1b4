"""The dependency locks (scripts/lock, uv): every dependency pyproject.toml names is locked
at a version its bounds allow, every locked package carries hashes, and the image and the
test venv install from them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ROOT / "deploy" / "requirements.lock"
DEV = ROOT / "deploy" / "requirements-dev.lock"
ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)(?: *; *([^\\]+?))? *\\?$")


def locked(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a lock, entries whose marker holds here."""
    entries: dict[str, tuple[str, list[str]]] = {}
    current: str = ""
    for line in path.read_text().splitlines():
        found = ENTRY.match(line)
        if found:
            name, version, marker = found.groups()
            current = canonicalize_name(name)
            held = Requirement(f"x; {marker}").marker if marker else None
            if held is not None and not held.evaluate():  # for another platform
                current = ""
                continue
            entries[current] = (version, [])
        elif line.strip().startswith("--hash=sha256:") and current:
            entries[current][1].append(line.strip().removeprefix("--hash=sha256:").rstrip(" \\"))
    return entries


def requirements(extra: str | None) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = list(project["dependencies"])
    if extra:
        names += project["optional-dependencies"][extra]
    return [Requirement(n) for n in names]


@pytest.mark.parametrize(("path", "extra"), [(RUNTIME, None), (DEV, "dev")],
                         ids=["runtime", "dev"])
def test_the_lock_pins_every_dependency_of_pyproject_within_its_bounds(
        path: Path, extra: str | None) -> None:
    lock = locked(path)
    assert lock, f"{path} locks nothing"
    for requirement in requirements(extra):
        if requirement.marker and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{requirement} is not in {path.name}: run scripts/lock"
        version = lock[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{path.name} locks {name}=={version}, outside {requirement}: run scripts/lock")
    for package, (version, hashes) in lock.items():
        assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), (
            f"{path.name}: {package}=={version} has no sha256 hash")


def test_the_dev_lock_has_the_runtime_lock_inside_at_the_same_versions() -> None:
    runtime, dev = locked(RUNTIME), locked(DEV)
    assert {n: v for n, (v, _) in runtime.items()} == {
        n: dev[n][0] for n in runtime if n in dev}
    assert set(runtime) <= set(dev)


def test_the_image_and_the_venv_install_from_the_locks() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "COPY deploy/requirements.lock" in dockerfile
    assert "--require-hashes --no-deps -r /tmp/requirements.lock" in dockerfile
    venv = (ROOT / "scripts" / "venv").read_text()
    assert "deploy/requirements-dev.lock" in venv and "--require-hashes" in venv
