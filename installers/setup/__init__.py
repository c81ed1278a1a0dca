"""The decisions of the wan-local installers, one module per concept; installers/setup_env.py runs `cli.main`.

Standard library only: it runs before anything is installed, first under the Python that creates `.venv`, then
under the venv's own Python. Printed text is ASCII so a Windows console in any code page shows it.

- ``versions``         version numbers and simple requirements (pyproject.toml's torch requirement)
- ``drivers``          NVIDIA's table: which CUDA each driver runs
- ``gpus``             GPU detection with nvidia-smi
- ``torch_choice``     which PyTorch build fits the GPU and driver
- ``torch_installed``  the torch in the venv: what it is, whether it fits, whether it works
- ``kernels``          the optional kernels: which to try, trying them as prebuilt wheels
- ``plan``             every decision as one dict, described in words and passed to the shell scripts
- ``marker``           the plan and completed-install files in .venv, and whether the install still fits
- ``install_log``      .venv/install.log
- ``python_venv``      the Python that creates .venv, and the venv created or repaired
- ``errors``           SetupError, a problem the user must fix
- ``cli``              the subcommands the shell scripts call
"""
