@echo off
rem Update wan-local: fetch the newest version with git (fast-forward only), then redo the set-up in the existing
rem .venv (run.bat --repair --no-launch: the project is reinstalled; PyTorch is kept unless the driver now needs
rem another build). Extra arguments go to run.bat (e.g. --cpu).
rem
rem Your data is safe: the job queue, settings and presets live in the per-user folder platformdirs picks
rem (AppData\Local\wan-local, or WAN_LOCAL_HOME), models wherever you downloaded them, and git pull only changes
rem files git tracks - it never deletes untracked or ignored ones such as outputs\ or .venv\.
setlocal EnableExtensions DisableDelayedExpansion
cd /d "%~dp0.."
where git >nul 2>nul
if errorlevel 1 goto :no_git
git rev-parse --is-inside-work-tree >nul 2>nul
if errorlevel 1 goto :not_checkout
git diff --quiet
if errorlevel 1 goto :local_changes
git diff --cached --quiet
if errorlevel 1 goto :local_changes

echo == Fetching the newest version
rem cmd reads a running script line by line and the pull may rewrite this file, so both outcomes jump to a label
rem on the pull's own line: nothing is read from a stale position. Keep the labels :pulled and :pull_failed.
git pull --ff-only & if errorlevel 1 (goto :pull_failed) else (goto :pulled)

:pulled
echo.
echo == Reinstalling wan-local into .venv
call "%~dp0run.bat" --repair --no-launch %*
if errorlevel 1 goto :failed
echo.
echo wan-local is up to date. Start it with installers\run.bat.
goto :end

:no_git
echo ERROR: git is not installed. Get it from https://git-scm.com/download/win and run this again.
goto :failed

:not_checkout
echo ERROR: this folder is not a git checkout ^(it was probably downloaded as a ZIP^), so it cannot update
echo itself. Download the new version into a new folder instead; your queue, outputs and models are not in
echo this folder.
goto :failed

:local_changes
git status --short --untracked-files=no
echo.
echo ERROR: you changed the files listed above, and updating would mix them with the new version. Keep them
echo aside with "git stash" ^(get them back later with "git stash pop"^) or discard them with
echo "git checkout -- .", then run the update again.
goto :failed

:pull_failed
echo.
echo ERROR: git pull failed ^(see its message above^). Usual causes: no internet connection, or this copy has
echo commits of its own that are not on the server ^(git pull --ff-only never merges; run "git status" to see^).
goto :failed

:failed
echo.
echo The update did not finish.
pause
endlocal
exit /b 1

:end
pause
endlocal
exit /b 0
