@echo off
rem wan-local launcher for Windows 10/11 with Python from python.org. Double-click it: the first run sets up
rem .venv in this folder (PyTorch matching the NVIDIA driver, the app, optional prebuilt kernels) and starts the
rem app; later runs start it at once.
rem
rem   installers\run.bat [--cpu] [--repair] [--no-launch] [app options, e.g. --port 7861 --listen --no-browser]
rem
rem   --cpu        install the CPU build of PyTorch even if an NVIDIA GPU is present (generation takes hours)
rem   --repair     run the set-up again even if the recorded install looks complete
rem   --no-launch  stop after the set-up (tests, CI)
rem
rem Every decision (which PyTorch, which kernels, why) is made by installers\setup_env.py, shared with run.sh,
rem printed once and appended to .venv\install.log. A completed set-up is recorded in .venv\wan-local-install.json;
rem a changed NVIDIA driver, a changed pyproject.toml or an interrupted set-up makes the next run repeat it.
rem Python: the py launcher (py -3) when present, else python on PATH; WAN_LOCAL_PYTHON overrides both (quote a
rem path with spaces). App options are passed on as given; write them as "--port 7861", not "--port=7861" (cmd
rem splits arguments at "=").
rem WAN_LOCAL_TORCH_SPEC / WAN_LOCAL_TORCH_INDEX_URL replace the torch requirement / wheel index ("default" =
rem pip's configured index). Paths may contain spaces and parentheses: they are only used quoted and never
rem inside a parenthesized block.
setlocal EnableExtensions DisableDelayedExpansion
cd /d "%~dp0.."
set "ROOT=%CD%"
set "VENV=%ROOT%\.venv"
set "VPY=%ROOT%\.venv\Scripts\python.exe"
set "SETUP=%ROOT%\installers\setup_env.py"
set "PLAN_ENV=%ROOT%\.venv\wan-local-plan.env"

set "CPU_FLAG="
set "REPAIR=0"
set "LAUNCH=1"
set "APP_ARGS="
:parse_args
if "%~1"=="" goto :args_done
if /i "%~1"=="--cpu" (set "CPU_FLAG=--cpu" & goto :next_arg)
if /i "%~1"=="--repair" (set "REPAIR=1" & goto :next_arg)
if /i "%~1"=="--no-launch" (set "LAUNCH=0" & goto :next_arg)
set "APP_ARGS=%APP_ARGS% %1"
:next_arg
shift
goto :parse_args
:args_done

call :find_python
if errorlevel 1 goto :pause_exit
%PY% "%SETUP%" ensure-venv
if errorlevel 1 goto :venv_failed

if "%REPAIR%"=="1" goto :setup
"%VPY%" "%SETUP%" check %CPU_FLAG%
if errorlevel 1 goto :setup
goto :launch

:setup
rem Detect the GPU and driver, choose PyTorch, forget the old marker; exit 3 = no build can work (message above).
"%VPY%" "%SETUP%" start %CPU_FLAG% --env-file "%PLAN_ENV%"
if errorlevel 1 goto :fail
set "WAN_TORCH_TAG="
set "WAN_TORCH_INDEX_URL="
set "WAN_TORCH_REQUIREMENT="
set "WAN_TORCH_ACTION="
for /f "usebackq tokens=1,* delims==" %%A in ("%PLAN_ENV%") do set "WAN_%%A=%%B"

echo.
echo == Updating pip
"%VPY%" -m pip install --upgrade pip
if errorlevel 1 echo pip could not be updated; continuing with the one in .venv

set "INDEX_ARGS="
if defined WAN_TORCH_INDEX_URL set "INDEX_ARGS=--index-url %WAN_TORCH_INDEX_URL%"
if "%WAN_TORCH_ACTION%"=="keep" goto :torch_kept
if not "%WAN_TORCH_ACTION%"=="reinstall" goto :torch_install
echo.
echo == Removing the PyTorch build that does not fit
"%VPY%" -m pip uninstall -y torch
:torch_install
echo.
echo == Installing PyTorch ^(%WAN_TORCH_TAG% build^): a CUDA build is a download of several GB
"%VPY%" -m pip install %INDEX_ARGS% "%WAN_TORCH_REQUIREMENT%"
if errorlevel 1 goto :torch_failed
goto :install_project
:torch_kept
echo.
echo == PyTorch: keeping the installed build

:install_project
echo.
echo == Installing wan-local and its dependencies
"%VPY%" -m pip install -e .
if errorlevel 1 goto :project_failed

echo.
echo == Checking PyTorch
"%VPY%" "%SETUP%" verify
if errorlevel 1 goto :fail

echo.
rem Optional kernels: prebuilt wheels only, never fails the set-up.
"%VPY%" "%SETUP%" kernels
"%VPY%" "%SETUP%" mark
if errorlevel 1 goto :fail

:launch
if "%LAUNCH%"=="0" goto :done
if not exist "%ROOT%\app.py" goto :no_app
echo.
echo == Starting wan-local ^(close this window or press Ctrl+C to stop it^)
"%VPY%" "%ROOT%\app.py" %APP_ARGS%
if errorlevel 1 goto :app_failed
goto :done

rem ---------------------------------------------------------------------------------------------- messages

:torch_failed
"%VPY%" "%SETUP%" log PyTorch install failed
echo.
echo ERROR: PyTorch could not be installed. Check the internet connection and the free disk space
echo ^(a CUDA build needs about 6 GB^), then run this again: it continues where it stopped.
goto :fail

:project_failed
"%VPY%" "%SETUP%" log pip install -e . failed
echo.
echo ERROR: wan-local's dependencies could not be installed ^(see pip's message above^). Run this again to retry.
goto :fail

:venv_failed
echo.
echo ERROR: could not prepare .venv with %PY% ^(see above^). wan-local needs Python 3.10 to 3.14, 64-bit;
echo if you have several, pick one with WAN_LOCAL_PYTHON, e.g. set WAN_LOCAL_PYTHON=py -3.12
goto :pause_exit

:no_app
echo.
echo ERROR: app.py is missing in "%ROOT%": is this a complete copy of wan-local?
goto :fail

:app_failed
echo.
echo wan-local stopped with an error ^(see above^).
goto :pause_exit

:fail
echo.
echo The set-up did not finish. The details are above and in .venv\install.log.
echo Fix the problem and run this again: it continues where it stopped.
:pause_exit
rem A double-clicked window would close at once: keep it open so the message can be read.
if "%LAUNCH%"=="1" pause
endlocal
exit /b 1

:done
endlocal
exit /b 0

rem ------------------------------------------------------------------------------------------- subroutines

:find_python
rem Sets PY to a command that runs Python 3: WAN_LOCAL_PYTHON, else the py launcher, else python on PATH.
rem Running it (not just finding it) skips the Microsoft Store alias, which only opens the Store.
if not defined WAN_LOCAL_PYTHON goto :find_python_auto
set "PY=%WAN_LOCAL_PYTHON%"
exit /b 0
:find_python_auto
py -3 -c "import sys" >nul 2>nul
if not errorlevel 1 (set "PY=py -3" & exit /b 0)
python -c "import sys" >nul 2>nul
if not errorlevel 1 (set "PY=python" & exit /b 0)
echo.
echo ERROR: Python was not found. Install Python 3.12 ^(64-bit^) from https://www.python.org/downloads/windows/
echo and tick "Add python.exe to PATH" in its installer, then run this again.
exit /b 1
