"""DeepFlow platform: deeply supervised flow-based image generators, trained at scale.

The command line is ``deepflow`` (:mod:`deepflow.cli`); the layout and contracts are in docs/architecture.md.
"""

#: the package version (pyproject.toml reads it from here: ``[tool.setuptools.dynamic]``)
__version__ = "0.1.0"
