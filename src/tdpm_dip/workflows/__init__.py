"""What each command does, without click: `tdpm-dip denoise`, `generate`, `bench` and `demo` as functions of
their options. The CLI and the app only parse input and call these (or the Python API, `tdpm_dip.api`)."""
