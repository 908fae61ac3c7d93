"""Rewrite the asserts of the shared checks in helpers.py (pytest's detailed failure messages)."""

import pytest

pytest.register_assert_rewrite("tests.models.helpers")
