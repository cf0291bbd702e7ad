"""The simulated NVMe controller and its fault plans: the embedded default source."""
