# Sourced by the benchmark scripts. bench_venv DIR PACKAGES...: a virtual environment with these PyPI packages;
# prints DIR/bin/python. It counts as ready only once pip finished (the stamp DIR/.installed), so an interrupted
# install is made again instead of being used half-made.
bench_venv() {
  local v=$1; shift
  if [ ! -f "$v/.installed" ]; then
    rm -rf "$v"
    { python3 -m venv "$v" && "$v/bin/pip" install -q "$@"; } >&2 || { echo "bench_venv: cannot install $* into $v" >&2; return 1; }
    echo "$*" > "$v/.installed"
  fi
  echo "$v/bin/python"
}
