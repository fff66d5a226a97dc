"""The project installs beside PyPI's `kernels` (Hugging Face's kernel loader, a top-level `kernels`
package), in either order, and uninstalling either leaves the other whole.

The attention package lives in the repository's top-level `kernels/` folder but installs as
`draw.kernels`, so the two distributions share no file. Each case builds a fresh virtual environment
(over this interpreter's site-packages, for torch) and installs this checkout and `kernels` from the
package registry; without the registry the test is skipped.
"""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
USE_BOTH = (
    "import kernels, torch\n"
    "from draw import kernels as attention\n"
    "assert callable(kernels.get_kernel) and 'site-packages' in kernels.__file__\n"
    "x = torch.rand(2, 1, 8, 8)\n"
    "assert attention.read(x, x, torch.zeros(2, 5), 2).shape == (2, 2, 1, 2, 2)\n"
)
USE_DRAW = "from draw import kernels as attention; import draw.cli; assert callable(attention.read)\n"
USE_HF = "import kernels; assert callable(kernels.get_kernel)\n"


def pip(venv: pathlib.Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "-q", *args],
                   check=True, capture_output=True, text=True, timeout=300)


def python(venv: pathlib.Path, code: str, tmp_path) -> None:
    result = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def kernels_wheel(tmp_path_factory):
    where = tmp_path_factory.mktemp("wheels")
    result = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(where), "kernels"],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.skip(f"the package registry did not give `kernels`: {result.stderr.strip().splitlines()[-1:]}")
    return where


@pytest.mark.slow
@pytest.mark.parametrize("first", ["draw", "kernels"])
def test_installs_beside_pypi_kernels_in_either_order(first, kernels_wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True, timeout=120)
    install = {
        "draw": lambda: pip(venv, "install", "--no-deps", "--no-build-isolation", str(ROOT)),
        "kernels": lambda: pip(venv, "install", "--no-index", "--find-links", str(kernels_wheel), "kernels"),
    }
    second = "kernels" if first == "draw" else "draw"
    install[first]()
    install[second]()
    python(venv, USE_BOTH, tmp_path)
    pip(venv, "uninstall", "-y", "kernels" if first == "kernels" else "draw-triton")
    python(venv, USE_DRAW if first == "kernels" else USE_HF, tmp_path)  # the other one is whole
