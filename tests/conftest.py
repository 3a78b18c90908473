import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# FEDRLHF_DATA_DIR (as the README exports it) or ../shared/datasets beside the checkout
SHARED_DATASETS = Path(os.environ.get("FEDRLHF_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "datasets").resolve()


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The real datasets beside the checkout ($FEDRLHF_DATA_DIR or ../shared/datasets); integration tests skip without them."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATASETS}")
    return SHARED_DATASETS
