"""Model definitions: math only (no file I/O, no device policy, no quantization branches)."""
