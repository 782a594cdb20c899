import pytest
import torch

from tests.distributed._helpers import save_tiny_glide, save_tiny_sd


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: intra-op threads only wait for each other (see tests/pipelines/test_glide.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory):
    """A folder holding a tiny SD pipeline folder at sd/ (and its tokenizer at tok/)."""
    pytest.importorskip("diffusers")
    d = tmp_path_factory.mktemp("tiny_sd")
    save_tiny_sd(d)
    return d


@pytest.fixture(scope="session")
def glide_files(tmp_path_factory):
    """(base.pt, tokenizer folder, base options) of a tiny GLIDE."""
    return save_tiny_glide(tmp_path_factory.mktemp("tiny_glide"))
