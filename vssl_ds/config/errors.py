"""The one error type of configuration problems (pretrain.py prints it as `config error: …` and exits 2)."""


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the recipe or the override."""
