"""Communication transports for the M2N exchange between attention and expert roles."""
