"""Config errors that name the key path and say what was expected.

Validation collects every problem before raising, so a user fixes a recipe in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a recipe: where (`key` path, optionally file:line) and what was expected."""

    key: str
    message: str
    location: str | None = None  # "recipe.yaml:12" when the loader knows it

    def __str__(self) -> str:
        where = f"{self.location}: " if self.location else ""
        return f"{where}{self.key}: {self.message}"


class ConfigError(ValueError):
    """All issues found in one recipe, reported together."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = list(issues)
        lines = "\n".join(f"  - {i}" for i in self.issues)
        super().__init__(f"{len(self.issues)} problem(s) in the configuration:\n{lines}")

    @classmethod
    def raise_if(cls, issues: list[ConfigIssue]) -> None:
        if issues:
            raise cls(issues)
