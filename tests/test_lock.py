"""requirements.lock agrees with pyproject.toml and with what is installed."""

from __future__ import annotations

import importlib.metadata
import pathlib
import tomllib

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from recovjax.rundir import (LOCK_FILE, environment, installed_distributions,
                             lock_status, read_lock)

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOCK = ROOT / LOCK_FILE
INSTALLER_TOOLS = {"pip", "setuptools", "wheel"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _declared() -> list[tuple[str, Requirement]]:
    """(extra or "", requirement) for every dependency, every extra's too."""
    project = _project()
    declared = [("", Requirement(text)) for text in project["dependencies"]]
    for extra, texts in project.get("optional-dependencies", {}).items():
        declared += [(extra, Requirement(text)) for text in texts]
    return declared


def _pins() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            requirement = Requirement(text)
            (specifier,) = requirement.specifier
            pins[canonicalize_name(requirement.name)] = Version(
                specifier.version)
    return pins


def test_lock_pins_exact_versions_once_each():
    names = []
    for line in LOCK.read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        requirement = Requirement(text)
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", line
        version = specifiers[0].version
        assert "*" not in version and Version(version).local is None, (
            f"{line}: pin a release, without wildcards or a local label")
        assert not requirement.marker and not requirement.extras, line
        names.append(canonicalize_name(requirement.name))
    assert len(names) == len(set(names)), "a distribution pinned twice"
    # The library's reader (env.json) sees the same pins.
    assert {name: Version(v) for name, v in read_lock(LOCK).items()} == (
        _pins())


def test_every_dependency_and_extra_is_pinned_within_its_range():
    pins = _pins()
    extras = {extra for extra, _ in _declared() if extra}
    assert {"test", "bench"} <= extras
    for extra, requirement in _declared():
        name = canonicalize_name(requirement.name)
        assert name in pins, (
            f"{requirement} ({extra or 'dependencies'}) is not in {LOCK_FILE}")
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK_FILE} pins {name}=={pins[name]}, outside pyproject.toml's "
            f"{requirement} ({extra or 'dependencies'})")


def _requirements_of(distribution: str, extras: set[str]
                     ) -> list[Requirement]:
    found = []
    for text in importlib.metadata.requires(distribution) or []:
        requirement = Requirement(text)
        if requirement.marker is None or any(
                requirement.marker.evaluate(dict(default_environment(),
                                                 extra=extra))
                for extra in extras | {""}):
            found.append(requirement)
    return found


def test_what_the_test_extra_pulls_in_is_pinned_within_every_range():
    # The installed closure of recovjax[test] (pandas' and the other
    # dependencies' own dependencies included): every distribution in it is
    # pinned, at a version every requirer accepts.
    pins = _pins()
    pending = [(requirement, "recovjax[test]")
               for requirement in _requirements_of("recovjax", {"test"})]
    seen = set()
    while pending:
        requirement, requirer = pending.pop()
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirer} needs {requirement}, not pinned"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{requirer} needs {requirement}; {LOCK_FILE} pins {pins[name]}")
        if name not in seen:
            seen.add(name)
            pending += [(nested, requirement.name) for nested in
                        _requirements_of(requirement.name,
                                         set(requirement.extras))]
    assert {"jax", "flax", "pytest"} <= seen


def test_installed_versions_are_the_locked_ones():
    # `make test` installs with the lock as constraints; anything else means
    # the suite is not testing the pinned environment.
    pins = _pins()
    installed = installed_distributions()
    wrong = {name: (version, pins.get(canonicalize_name(name)))
             for name, version in installed.items()
             if canonicalize_name(name) not in INSTALLER_TOOLS | {"recovjax"}
             and Version(Version(version).public) != pins.get(
                 canonicalize_name(name))}
    assert not wrong, (f"installed (version, locked) differ from {LOCK_FILE}; "
                       f"reinstall with `make` or bump the lock: {wrong}")


def test_environment_records_every_distribution_and_the_lock():
    recorded = environment()
    assert recorded["distributions"] == installed_distributions()
    for name in ("jax", "numpy", "pytest"):
        assert recorded["distributions"][name] == importlib.metadata.version(
            name)
    assert recorded["lock"]["file"] == str(LOCK)
    assert recorded["lock"]["matches"] is True, recorded["lock"]
    assert recorded["cpu"] and isinstance(recorded["xla_flags"], str)


def test_lock_status_names_each_difference(tmp_path):
    lock = tmp_path / LOCK_FILE
    lock.write_text("# pins\nJax==1.0\nnumpy==2.0  # tested\ntorch==2.1\n")
    installed = {"jax": "1.0", "NumPy": "2.1", "torch": "2.1+cpu",
                 "extra-thing": "0.1", "pip": "99", "recovjax": "0.1.0"}
    status = lock_status(installed, lock)
    assert status == {"file": str(lock), "matches": False, "differences": {
        "NumPy": {"installed": "2.1", "locked": "2.0"},
        "extra-thing": {"installed": "0.1", "locked": None}}}
    assert lock_status({"jax": "1.0"}, lock)["matches"] is True
    assert lock_status(installed, tmp_path / "absent.lock") is None
    lock.write_text("jax>=1.0\n")
    with pytest.raises(ValueError, match=r"absent|:1: not an exact pin"):
        read_lock(lock)
    assert lock_status(installed, lock)["matches"] is False
