"""Shared fixtures: paths and a small synthetic corpus generated once per session."""

import os
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: Options of the tiny corpus used by unit tests (a few seconds to synthesise).
TINY_CORPUS = dict(seed=7, n_train=24, n_dev_sentences=4, n_test_sentences=5, closed_vocabulary=False,
                   n_train_speakers=6, n_unseen_speakers=2, n_unseen_variants=4)


@pytest.fixture(scope="session")
def repo_root():
    return ROOT


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """(folder, manifests) of a tiny synthetic corpus."""
    from earlyexit_brain.data.synthetic import prepare_synthetic

    folder = str(tmp_path_factory.mktemp("tiny_corpus"))
    manifests = prepare_synthetic(folder, num_workers=2, **TINY_CORPUS)
    return folder, manifests


@pytest.fixture
def free_port():
    """A TCP port free on this machine now (for a DDP rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
