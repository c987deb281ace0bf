"""Training: Algorithm 1 (`ddpm.py`) and TDPM's generator G_psi (`generator.py`) on one shared loop (`loop.py`);
their options are torch-free data (`options.py`), so the CLI's --help never loads a network library."""
