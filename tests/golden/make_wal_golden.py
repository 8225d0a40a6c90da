"""Write ``tests/golden/wal-v1`` from ``GOLDEN_RECORDS`` in ``tests/test_wal.py``.

This is how the golden segment was made; ``test_wal.py`` checks that a fresh ``FileWal``
still writes it byte for byte. Never regenerate it to make that test pass: a changed format
gets a new magic and a new directory (``wal-v2``) next to this one, and ``wal-v1`` stays as
the record of what old logs look like. Run from the repository root::

    .venv/bin/python tests/golden/make_wal_golden.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for test_wal

from memcluster.core.config import Config
from memcluster.storage.wal import FileWal, segment_name
from test_wal import GOLDEN_DIR, GOLDEN_RECORDS


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wal = FileWal.open(Path(tmp), Config())
        for record in GOLDEN_RECORDS:
            wal.append(record)
        wal.close()
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / segment_name(1), GOLDEN_DIR / segment_name(1))
    print(f"wrote {GOLDEN_DIR / segment_name(1)}")


if __name__ == "__main__":
    main()
