import pytest
import torch
from torch._dynamo.utils import counters


@pytest.fixture
def fresh_dynamo():
    """A clean Dynamo cache and clean counters around a compile test."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def pytest_report_header(config):
    import transformers
    return f"qjl-compile: torch {torch.__version__}, transformers {transformers.__version__}"
