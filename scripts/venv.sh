# Sourced by scripts/demo.sh and scripts/test.sh: create the project's virtual environment (.venv, or
# $RESERVED_KERNELS_VENV) on first use and put it first on PATH, so both README commands install into it
# and never into whatever interpreter happens to be active. pip inside a venv gives no root warning.
venv="${RESERVED_KERNELS_VENV:-$PWD/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "creating the project's virtual environment in $venv" >&2
  "${PYTHON:-python3}" -m venv "$venv"
fi
export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" PIP_DISABLE_PIP_VERSION_CHECK=1
unset PYTHONHOME
