@echo off
rem Set up the project's virtual environment (.venv) and run the test suite (CPU only) on Windows:
rem   installers\test.bat [pytest arguments]
rem The venv is created or repaired by installers\setup_env.py, as run.bat does. A torch already in .venv is kept
rem (CPU or CUDA build); otherwise torch 2.13.0, the tested lower bound, comes from pip's configured index (PyPI's
rem Windows build of torch is the CPU one). WAN_LOCAL_TORCH_SPEC / WAN_LOCAL_TORCH_INDEX_URL replace that
rem requirement / index; WAN_LOCAL_PYTHON picks the Python that creates .venv. installers/test.sh is the Linux twin.
setlocal EnableExtensions DisableDelayedExpansion
cd /d "%~dp0.."
set "VPY=%CD%\.venv\Scripts\python.exe"

call :find_python
if errorlevel 1 exit /b 1
%PY% installers\setup_env.py ensure-venv
if errorlevel 1 exit /b 1
"%VPY%" -m pip install --quiet --upgrade pip

"%VPY%" -c "import torch" >nul 2>nul
if not errorlevel 1 goto :torch_ready
set "SPEC=torch==2.13.0"
if defined WAN_LOCAL_TORCH_SPEC set "SPEC=%WAN_LOCAL_TORCH_SPEC%"
set "INDEX_ARGS="
if defined WAN_LOCAL_TORCH_INDEX_URL set "INDEX_ARGS=--index-url %WAN_LOCAL_TORCH_INDEX_URL%"
if /i "%WAN_LOCAL_TORCH_INDEX_URL%"=="default" set "INDEX_ARGS="
echo installing "%SPEC%"
"%VPY%" -m pip install --quiet %INDEX_ARGS% "%SPEC%"
if errorlevel 1 exit /b 1
:torch_ready

"%VPY%" -m pip install --quiet -e ".[test]"
if errorlevel 1 exit /b 1
"%VPY%" -m pytest %*
exit /b %errorlevel%

:find_python
rem Sets PY to a command that runs Python 3: WAN_LOCAL_PYTHON, else the py launcher, else python on PATH.
if not defined WAN_LOCAL_PYTHON goto :find_python_auto
set "PY=%WAN_LOCAL_PYTHON%"
exit /b 0
:find_python_auto
py -3 -c "import sys" >nul 2>nul
if not errorlevel 1 (set "PY=py -3" & exit /b 0)
python -c "import sys" >nul 2>nul
if not errorlevel 1 (set "PY=python" & exit /b 0)
echo ERROR: Python was not found. Install Python 3.12 ^(64-bit^) from https://www.python.org/downloads/windows/
exit /b 1
