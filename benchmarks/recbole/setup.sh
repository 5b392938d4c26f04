#!/usr/bin/env bash
# Installs RecBole 1.2.1 in its own virtualenv, benchmarks/recbole/.venv (never the project's .venv: RecBole is
# not a project dependency and needs older numpy / pandas / setuptools than the project uses).
#
#   bash benchmarks/recbole/setup.sh            # PYTHON=python3.11 bash ... to choose the interpreter
#
# Re-running it is cheap: pip leaves satisfied pins alone. See README.md beside this file for why each pin exists.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
PYTHON="${PYTHON:-python3}"

# ray<=2.6.3 (a hard RecBole 1.2.1 requirement) ships wheels for CPython 3.7-3.11 only
"$PYTHON" -c 'import sys; sys.exit(not ((3, 8) <= sys.version_info[:2] <= (3, 11)))' || {
    echo "setup.sh: needs Python 3.8-3.11 (ray<=2.6.3 has no wheels for newer ones); set PYTHON=..." >&2
    exit 1
}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# One resolver run, so no later step can move torch. torch is pinned exactly: the project's version, the CPU wheel
# from the local pip configuration; an unpinned torch would pull a multi-GB CUDA build.
PINS=(
    "torch==2.13.0"                # the project's torch (pyproject.toml): here the local CPU wheel
    "recbole==1.2.1"
    "numpy<2"                      # RecBole aliases np.float_, np.int_ ... (gone in numpy 2) and uses np.float
    "pandas<2.2"                   # RecBole 1.2.1 was released against pandas < 2.2 (the issue's pin)
    "setuptools>=77.0.3,<81"       # ray 2.6.3 imports pkg_resources (removed in setuptools 81); torch 2.13.0
                                   # requires setuptools>=77.0.3, so the issue's setuptools<70 cannot resolve
    "ray==2.6.3"                   # RecBole requires ray>=1.13,<=2.6.3 (recbole.quick_start imports ray.tune)
    "colorlog==4.7.2"              # RecBole pins these two exactly
    "colorama==0.4.4"
    "thop==0.1.1.post2209072238"   # RecBole's FLOPs counter; thop's own torch requirement is unpinned
    "pyarrow==17.0.0"              # run_sasrec.py reads the Parquet splits; pyarrow 26 needs numpy>=2
)

# Resolve first and refuse a CUDA torch build (nvidia-* wheels, gigabytes) before anything is downloaded.
REPORT="$(mktemp)"
trap 'rm -f "$REPORT"' EXIT
nice -n 19 "${PIP[@]}" install --quiet --dry-run --report "$REPORT" "${PINS[@]}"
"$VENV/bin/python" - "$REPORT" <<'PY'
import json, sys

plan = json.load(open(sys.argv[1]))["install"]
cuda = sorted(p["metadata"]["name"] for p in plan if p["metadata"]["name"].lower().startswith("nvidia-"))
if cuda:
    sys.exit(f"setup.sh: refusing, the resolver picked a CUDA torch build (would install {', '.join(cuda)})")
PY
nice -n 19 "${PIP[@]}" install --quiet "${PINS[@]}"

"$VENV/bin/python" - <<'PY'
import warnings

warnings.filterwarnings("ignore", "pkg_resources is deprecated", UserWarning)
import numpy, pandas, pyarrow, torch
import recbole
from recbole.config import Config  # noqa: F401  (imports torch.utils.tensorboard)
from recbole.model.sequential_recommender import SASRec  # noqa: F401
from recbole.quick_start import run_recbole  # noqa: F401  (imports ray.tune, hence pkg_resources)

assert recbole.__version__ == "1.2.1", recbole.__version__
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
assert int(numpy.__version__.split(".")[0]) < 2, numpy.__version__
print(f"recbole {recbole.__version__}, torch {torch.__version__}, numpy {numpy.__version__}, "
      f"pandas {pandas.__version__}, pyarrow {pyarrow.__version__}")
PY
"${PIP[@]}" check
echo "RecBole venv ready: $VENV"
