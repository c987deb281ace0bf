"""`python -m tdpm_dip.cli` (as `accelerate launch -m tdpm_dip.cli` and `torchrun -m tdpm_dip.cli` start it) is
`tdpm-dip`."""

from . import main

main()
