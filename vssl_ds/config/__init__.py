from .loader import ConfigError, list_recipes, load_config, save_config, to_yaml
from .schema import Config

__all__ = ["Config", "ConfigError", "list_recipes", "load_config", "save_config", "to_yaml"]
