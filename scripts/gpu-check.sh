#!/usr/bin/env bash
# Check llm-flow on a CUDA machine in one command: install it beside the machine's own CUDA torch,
# run the GPU tests (compiled Triton kernels = torch path, the engine on CUDA = on the CPU), then
# time `llm-flow bench` on a random-weight Llama-3.1-8B in bfloat16 (with the per-head map).
#
#   scripts/gpu-check.sh [WHEELS_DIR]        (run from anywhere inside a source checkout)
#
# Needs: Python with a CUDA build of torch (and transformers) already installed. Everything else
# llm-flow needs (transformer-lens, streamlit, ..., the gpu extra's triton, pytest) is installed
# only where missing, never replacing torch: pip is held to the installed torch by a constraint.
# WHEELS_DIR ($1 or $WHEELS_DIR): install offline from that folder of wheels (llm-flow's own
# wheel and its dependencies; `pip download` / `pip wheel` them on a connected machine);
# without it pip uses PyPI, and llm-flow itself comes from this checkout.
# Environment: OUT (results folder, default ./gpu-check-out), PYTHON (default python3),
# TOKENS (default 512,2048,8192), PIP_ARGS (extra pip options, e.g. --user).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS_DIR="${1:-${WHEELS_DIR:-}}"
OUT="${OUT:-./gpu-check-out}"
PY="${PYTHON:-python3}"
TOKENS="${TOKENS:-512,2048,8192}"
read -r -a EXTRA_PIP <<<"${PIP_ARGS:-}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"  # random weights and tiny test models: no downloads

pip_install() {
    if [[ -n "$WHEELS_DIR" ]]; then
        "$PY" -m pip install ${EXTRA_PIP[@]+"${EXTRA_PIP[@]}"} --no-index --find-links "$WHEELS_DIR" "$@"
    else
        "$PY" -m pip install ${EXTRA_PIP[@]+"${EXTRA_PIP[@]}"} "$@"
    fi
}

echo "== the machine (results go to $OUT)"
"$PY" - <<'PY' | tee "$OUT/env.txt"
import platform, sys
import torch
print(f"python {sys.version.split()[0]} on {platform.platform()}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit("gpu-check: torch sees no CUDA device; install a CUDA build of torch first")
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i} {torch.cuda.get_device_name(i)}, capability {torch.cuda.get_device_capability(i)}")
PY
if command -v nvidia-smi >/dev/null; then nvidia-smi | tee -a "$OUT/env.txt"; fi

echo "== llm-flow itself (--no-deps: its dependencies are checked one by one below)"
# Its wheel from WHEELS_DIR if there is one, else built from this checkout (offline, that needs
# a setuptools wheel in WHEELS_DIR). Reinstalled every time: the same version may have changed.
wheel=""
if [[ -n "$WHEELS_DIR" ]]; then
    wheel="$(find "$WHEELS_DIR" -maxdepth 1 -name 'llm_flow-*.whl' | sort | tail -n 1)"
fi
pip_install --no-deps --force-reinstall "${wheel:-$REPO}"

echo "== llm-flow's missing dependencies, the gpu extra and pytest (torch held as installed)"
"$PY" -c 'import torch; print("torch==" + torch.__version__)' >"$OUT/constraints.txt"
"$PY" - >"$OUT/missing.txt" <<'PY'
import importlib.metadata as md
import sys

try:
    from packaging.requirements import Requirement
except ImportError:  # packaging comes with transformers; pip vendors a copy too
    from pip._vendor.packaging.requirements import Requirement

needed = [Requirement(r) for r in md.requires("llm-flow") or []] + [Requirement("pytest>=8")]
for req in needed:
    if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ("", "gpu")):
        continue  # another extra (dev)
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        have = None
    if have is not None and req.specifier.contains(have, prereleases=True):
        continue
    if req.name == "torch":
        sys.exit(f"gpu-check: torch {have} is not in llm-flow's range {req.specifier}; "
                 "install a CUDA torch in that range first")
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    print(f"{req.name}{extras}{req.specifier}")
PY
if [[ -s "$OUT/missing.txt" ]]; then
    tr '\n' ' ' <"$OUT/missing.txt"
    echo
    pip_install -c "$OUT/constraints.txt" -r "$OUT/missing.txt"
else
    echo "nothing missing"
fi
"$PY" -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}")' \
    | tee -a "$OUT/env.txt"

echo "== GPU tests"
cd "$REPO"
"$PY" -m pytest tests/unit/engine/test_cuda.py tests/unit/engine/test_gpu_kernels.py \
    -q -ra -p no:cacheprovider --durations=10 --junitxml "$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.txt"
# A skip here means CUDA or triton went missing: a check that did not run did not pass.
"$PY" - "$OUT/pytest.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
if int(suite.get("skipped", 0)):
    sys.exit(f"gpu-check: {suite.get('skipped')} GPU tests were skipped (see pytest.txt)")
PY

echo "== bench: random:Llama-3.1-8B, bfloat16, tokens $TOKENS"
# One run per token count, so a count that runs out of memory keeps the others' numbers (all
# rows end up in bench.json too). The checkout's llm_flow (PYTHONPATH) has the shapes and the
# bench text, which an installed wheel lacks.
failed=()
IFS=',' read -r -a counts <<<"$TOKENS"
for n in "${counts[@]}"; do
    if PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m llm_flow.cli.main bench \
        --device cuda --model random:Llama-3.1-8B --dtype bfloat16 --tokens "$n" --heads --json \
        >"$OUT/bench-$n.json" 2>"$OUT/bench-$n.err"; then
        cat "$OUT/bench-$n.json"
    else
        echo "bench at $n tokens failed: $(tail -n 1 "$OUT/bench-$n.err")"
        failed+=("$n")
    fi
done
"$PY" - "$OUT" <<'PY'
import json
import pathlib
import sys

out = pathlib.Path(sys.argv[1])
files = sorted(out.glob("bench-*.json"), key=lambda p: int(p.stem.split("-")[1]))
rows = [row for f in files if f.stat().st_size for row in json.loads(f.read_text())]
(out / "bench.json").write_text(json.dumps(rows, indent=2) + "\n")
PY
if ((${#failed[@]})); then
    echo "gpu-check: bench failed at ${failed[*]} tokens (see $OUT/bench-*.err)" >&2
    exit 1
fi
echo "gpu-check: all passed; results in $OUT"
