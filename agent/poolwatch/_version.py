"""The release of poolwatch (also in pyproject.toml). A module of its own so that the modules
which label their series with it (``poolwatch_build_info``, the OTLP scope) need not import the
package's ``__init__``, which imports the whole agent: that would be an import cycle."""

__version__ = "0.1.0"
