"""Recipe configuration: typed dataclasses, validated once at load. Never imports torch."""

from megarl.config.errors import ConfigError, ConfigIssue
from megarl.config.parallel import ParallelConfig

__all__ = ["ConfigError", "ConfigIssue", "ParallelConfig"]
