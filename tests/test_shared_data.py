"""tests/shared_data.py: a test of ../shared/data skips on a clone without it, fails in CI."""

import pytest

import shared_data


def _a_test():
  """A fresh test function (pytest's marks are set on the function they decorate)."""
  @pytest.mark.parametrize("k", [1])
  def reads_the_data(k):
    return f"ran {k}"
  return reads_the_data


def test_a_missing_path_skips_here_and_fails_under_ci(tmp_path, monkeypatch):
  missing = str(tmp_path / "absent")
  monkeypatch.delenv("CI", raising=False)
  skipped = shared_data.needs(missing)(_a_test())
  assert [m.name for m in skipped.pytestmark] == ["parametrize", "skip"]
  assert skipped.pytestmark[1].kwargs["reason"].endswith("absent is not beside this checkout")
  monkeypatch.setenv("CI", "true")
  failing = shared_data.needs(missing)(_a_test())
  assert [m.name for m in failing.pytestmark] == ["parametrize"]  # not skipped: it runs...
  with pytest.raises(pytest.fail.Exception, match=r"absent is not beside this checkout; CI "
                                                  r"\(CI=true\) runs with \.\./shared"):
    failing(1)  # ... and fails
  # Present: the test runs as it is, in CI or not.
  assert shared_data.needs(str(tmp_path))(_a_test())(1) == "ran 1"
