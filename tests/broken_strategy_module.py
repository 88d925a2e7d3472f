"""A strategy module that cannot be imported (see broken_strategy.py)."""

import a_framework_that_is_not_installed  # noqa: F401
