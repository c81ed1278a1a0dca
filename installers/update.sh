#!/usr/bin/env bash
# Update wan-local: fetch the newest version with git (fast-forward only), then redo the set-up in the existing
# .venv (run.sh --repair --no-launch: the project is reinstalled; PyTorch is kept unless the driver now needs
# another build). Extra arguments go to run.sh (e.g. --cpu).
#
# Your data is safe: the job queue, settings and presets live in the per-user folders platformdirs picks (e.g.
# ~/.local/share/wan-local, ~/.config/wan-local, or $WAN_LOCAL_HOME), models wherever you downloaded them, and
# `git pull` only changes files git tracks - it never deletes untracked or ignored ones such as outputs/ or .venv/.
set -euo pipefail

die() {
    echo "" >&2
    echo "ERROR: $*" >&2
    exit 1
}

main() {
    cd "$(dirname "$0")/.."
    command -v git >/dev/null 2>&1 || die "git is not installed (Debian/Ubuntu: sudo apt install git)."
    git rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
        die "$PWD is not a git checkout (it was probably downloaded as a ZIP), so it cannot update itself. Download the new version into a new folder instead; your queue, outputs and models are not in this folder."
    if ! git diff --quiet || ! git diff --cached --quiet; then
        git status --short --untracked-files=no
        die "You changed the files listed above, and updating would mix them with the new version. Keep them aside with 'git stash' (get them back later with 'git stash pop') or discard them with 'git checkout -- .', then run the update again."
    fi

    echo "== Fetching the newest version"
    local before
    before=$(git rev-parse HEAD)
    if ! git pull --ff-only; then
        die "git pull failed (see its message above). Usual causes: no internet connection, or this copy has commits of its own that are not on the server (git pull --ff-only never merges; run 'git status' to see)."
    fi
    if [ "$(git rev-parse HEAD)" = "$before" ]; then
        echo "Already up to date."
    fi

    echo ""
    echo "== Reinstalling wan-local into .venv"
    exec "$PWD/installers/run.sh" --repair --no-launch "$@"
}

# On one line, so bash has read the whole script before it runs: the pull may rewrite this very file.
main "$@"; exit $?
