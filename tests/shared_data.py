"""The real data in ../shared/data: tests that read it skip on a clone without it, and fail
in CI (CI=true), where it must be there."""

import functools
import os

import pytest

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def path(*parts: str) -> str:
  return os.path.join(SHARED_DATA, *parts)


def needs(required: str):
  """Decorator: run the test if `required` exists; else skip it, or fail it under CI=true."""
  def wrap(test):
    if os.path.exists(required):
      return test
    reason = f"{os.path.relpath(required, os.path.dirname(os.path.dirname(__file__)))} is not " \
             "beside this checkout"
    if os.environ.get("CI", "").lower() == "true":
      @functools.wraps(test)
      def failing(*args, **kwargs):
        pytest.fail(f"{reason}; CI (CI=true) runs with ../shared beside the clone")
      return failing
    return pytest.mark.skip(reason=reason)(test)
  return wrap
