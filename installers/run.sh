#!/usr/bin/env bash
# wan-local launcher for Linux. The first run sets up .venv in this folder (PyTorch matching the NVIDIA driver,
# the app, optional prebuilt kernels) and starts the app; later runs start it at once.
#
#   installers/run.sh [--cpu] [--repair] [--no-launch] [app options, e.g. --port 7861 --listen --no-browser]
#
#   --cpu        install the CPU build of PyTorch even if an NVIDIA GPU is present (generation takes hours)
#   --repair     run the set-up again even if the recorded install looks complete
#   --no-launch  stop after the set-up (tests, CI)
#
# Every decision (which PyTorch, which kernels, why) is made by installers/setup_env.py, shared with run.bat,
# printed once and appended to .venv/install.log. A completed set-up is recorded in .venv/wan-local-install.json;
# a changed NVIDIA driver, a changed pyproject.toml or an interrupted set-up makes the next run repeat it.
# Environment: WAN_LOCAL_PYTHON (the Python that creates .venv), WAN_LOCAL_TORCH_SPEC / WAN_LOCAL_TORCH_INDEX_URL
# (replace the torch requirement / wheel index; "default" = pip's configured index), WAN_LOCAL_NVIDIA_SMI.
set -euo pipefail

die() {
    echo "" >&2
    echo "ERROR: $*" >&2
    exit 1
}

find_python() {
    if [ -n "${WAN_LOCAL_PYTHON:-}" ]; then
        echo "$WAN_LOCAL_PYTHON"
        return
    fi
    local candidate
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null 2>&1; then
            echo "$candidate"
            return
        fi
    done
    die "Python 3 was not found. Install Python 3.10 to 3.14 with its venv module (Debian/Ubuntu: sudo apt install python3 python3-venv), then run this again."
}

set_up() {
    local plan_env="$VENV/wan-local-plan.env" status=0
    "$VPY" "$SETUP" start $cpu_flag --env-file "$plan_env" || status=$?
    [ "$status" -eq 0 ] || die "The set-up cannot continue (see above). Nothing was installed."

    local key value torch_tag="" torch_index="" torch_requirement="" torch_action=""
    while IFS='=' read -r key value; do
        case "$key" in
            TORCH_TAG) torch_tag=$value ;;
            TORCH_INDEX_URL) torch_index=$value ;;
            TORCH_REQUIREMENT) torch_requirement=$value ;;
            TORCH_ACTION) torch_action=$value ;;
        esac
    done <"$plan_env"

    echo ""
    echo "== Updating pip"
    "$VPY" -m pip install --upgrade pip || echo "(pip could not be updated; continuing with the one in .venv)"

    local index_args=()
    [ -n "$torch_index" ] && index_args=(--index-url "$torch_index")
    if [ "$torch_action" = keep ]; then
        echo ""
        echo "== PyTorch: keeping the installed build"
    else
        if [ "$torch_action" = reinstall ]; then
            echo ""
            echo "== Removing the PyTorch build that does not fit"
            "$VPY" -m pip uninstall -y torch
        fi
        echo ""
        echo "== Installing PyTorch ($torch_tag build): a CUDA build is a download of several GB"
        if ! "$VPY" -m pip install ${index_args[@]+"${index_args[@]}"} "$torch_requirement"; then
            "$VPY" "$SETUP" log "PyTorch install failed: $torch_requirement from ${torch_index:-pip's index}"
            die "PyTorch could not be installed ($torch_requirement from ${torch_index:-pip's configured index}). Check the internet connection and the free disk space (a CUDA build needs about 6 GB), then run this again: it continues where it stopped."
        fi
    fi

    echo ""
    echo "== Installing wan-local and its dependencies"
    if ! "$VPY" -m pip install -e .; then
        "$VPY" "$SETUP" log "pip install -e . failed"
        die "wan-local's dependencies could not be installed (see pip's message above). Run this again to retry."
    fi

    echo ""
    echo "== Checking PyTorch"
    "$VPY" "$SETUP" verify || die "PyTorch is installed but does not work (see above)."

    echo ""
    "$VPY" "$SETUP" kernels || true # optional: never fails the set-up
    "$VPY" "$SETUP" mark
}

main() {
    cd "$(dirname "$0")/.."
    ROOT=$PWD
    VENV="$ROOT/.venv"
    VPY="$VENV/bin/python"
    SETUP="$ROOT/installers/setup_env.py"

    cpu_flag=""
    local repair=0 launch=1 arg
    app_args=()
    for arg in "$@"; do
        case "$arg" in
            --cpu) cpu_flag=--cpu ;;
            --repair) repair=1 ;;
            --no-launch) launch=0 ;;
            *) app_args+=("$arg") ;;
        esac
    done

    local python
    python=$(find_python)
    "$python" "$SETUP" ensure-venv ||
        die "Could not prepare $VENV with $python (see above). wan-local needs Python 3.10 to 3.14; WAN_LOCAL_PYTHON=/path/to/python picks another one."

    if [ "$repair" -eq 1 ] || ! "$VPY" "$SETUP" check $cpu_flag; then
        set_up
    fi

    if [ "$launch" -eq 1 ]; then
        [ -f "$ROOT/app.py" ] || die "app.py is missing in $ROOT: is this a complete copy of wan-local?"
        echo ""
        echo "== Starting wan-local (stop it with Ctrl+C)"
        exec "$VPY" "$ROOT/app.py" ${app_args[@]+"${app_args[@]}"}
    fi
}

# On one line, so bash has read the whole script before it runs (an update may rewrite this file).
main "$@"; exit $?
