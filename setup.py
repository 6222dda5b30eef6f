"""megarl: Megatron-core based RL post-training. The tested CPU stack is installed by `make setup`
(see requirements/cpu.in for why it cannot be a plain resolver install); the extras below state the
same top-level pins for users who manage their own environment."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def requirement_lines(name: str) -> list[str]:
    lines = []
    for line in (HERE / "requirements" / name).read_text().splitlines():
        line = re.sub(r"\s*#.*", "", line).strip()
        if line:
            lines.append(line)
    return lines


setup(
    name="megarl",
    version=re.search(r'__version__ = "(.+)"', (HERE / "megarl/__init__.py").read_text()).group(1),
    description="Megatron-core based trainer for RL post-training of large language models",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megarl", "megarl.*"]),
    package_data={"megarl.report": ["templates/*"]},   # the report page's template, style and viewer script
    install_requires=["pyyaml", "numpy"],
    extras_require={"cpu": requirement_lines("cpu.in"), "gpu": requirement_lines("gpu.txt")},
    entry_points={"console_scripts": ["megarl=megarl.cli:main"]},
)
