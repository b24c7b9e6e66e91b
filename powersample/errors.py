"""The one exception type users see: a bad input, explained in one line."""


class PowerSampleError(ValueError):
    """A user error (bad option, bad file, bad prompt). The CLI prints it as one line and exits with code 2."""
