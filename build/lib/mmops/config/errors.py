"""The one error type of the config package."""


class ConfigError(ValueError):
    """A params file or override that does not fit the config schema."""
