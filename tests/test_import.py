"""Importing sparsedsl changes nothing else in the user's process."""

from __future__ import annotations

import subprocess
import sys


def test_import_changes_no_environment_variable():
    code = (
        "import os; before = dict(os.environ); import sparsedsl; "
        "changed = sorted(set(os.environ.items()) ^ set(before.items())); "
        "assert not changed, changed"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
