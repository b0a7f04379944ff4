"""Generation settings: sampling with seeds, top-k / top-p, eos and stop strings,
max_new_tokens, streamers, and the errors bad settings give."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import TextStreamer
from transformers.generation.streamers import BaseStreamer

from conftest import EOS, PAD, prompts, word_token
from distlayer import AutoModel, ConfigError
from distlayer.config import GenerationConfig
from distlayer.generate import pick_next, positions_from_mask


def settings(**kw) -> GenerationConfig:
    """Resolved settings without a model (transformers' defaults)."""
    kw.setdefault("max_new_tokens", 20)
    return GenerationConfig(**kw).resolved()

MAX_NEW = 10


@pytest.fixture(scope="module")
def model(tiny_dir):
    with AutoModel.from_pretrained(tiny_dir("llama"), stages=0, progress=False) as m:
        yield m


@pytest.fixture(scope="module")
def hf(hf_model):
    return hf_model("llama")


def first_new(seq: list[int], min_index: int = 2) -> int:
    """Index of the first token at or after ``min_index`` that did not occur before it."""
    return next(i for i in range(min_index, len(seq)) if seq[i] not in seq[:i])


# --------------------------------------------------------------------------- sampling


def test_sampling_is_reproducible_per_seed_and_differs_across_seeds(model):
    ids, mask = prompts(4)
    runs = {seed: model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=True, seed=seed)
            for seed in range(4)}
    again = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=True, seed=2)
    assert again.tolist() == runs[2].tolist()
    assert len({tuple(r.flatten().tolist()) for r in runs.values()}) == 4


def test_a_sampled_row_depends_on_its_seed_and_prompt_only(model):
    """Row r of a batch sampled with seed s is what that prompt gives alone with seed s + r."""
    ids, mask = prompts(4)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=True, seed=11, eos_token_id=[])
    for r in range(4):
        alone = model.generate(ids[r:r + 1, mask[r].argmax():], max_new_tokens=MAX_NEW, do_sample=True, seed=11 + r,
                               eos_token_id=[])
        assert alone[0, -MAX_NEW:].tolist() == batch[r, -MAX_NEW:].tolist()


def test_top_k_1_and_tiny_top_p_equal_greedy(model):
    ids, mask = prompts(4)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)
    top_k = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=True, top_k=1, seed=0)
    top_p = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=True, top_p=1e-6, seed=0)
    assert top_k.tolist() == greedy.tolist()
    assert top_p.tolist() == greedy.tolist()


def test_pick_next_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    gen = torch.Generator().manual_seed(0)
    s = settings(do_sample=True, top_k=2)
    assert {pick_next(logits, s, gen).item() for _ in range(200)} == {2, 3}
    # softmax of [0,1,2,3] is [.03,.09,.24,.64]: top_p=0.8 keeps the 2 most likely
    s = settings(do_sample=True, top_p=0.8)
    assert {pick_next(logits, s, gen).item() for _ in range(200)} == {2, 3}
    s = settings(do_sample=True, temperature=1e-3)
    assert {pick_next(logits, s, gen).item() for _ in range(50)} == {3}


# --------------------------------------------------------------------------- stopping


def test_max_new_tokens_respected(model):
    ids, mask = prompts(4)
    for n in (1, 5):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[], return_dict_in_generate=True)
        assert out.sequences.shape == (4, ids.shape[1] + n)
        assert out.finish_reasons == ["length"] * 4 and out.completion_tokens == [n] * 4


def test_eos_stops_rows_like_transformers(model, hf):
    """A row that emits eos stops; finished rows get pad tokens, exactly as transformers pads them."""
    ids, mask = prompts(4)
    full = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=[])
    row = full[0, ids.shape[1]:].tolist()
    k = first_new(row)
    eos = row[k]
    out = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=eos,
                         return_dict_in_generate=True)
    assert out.finish_reasons[0] == "stop" and out.completion_tokens[0] == k + 1
    new = out.sequences[:, ids.shape[1]:]
    assert new[0, :k + 1].tolist() == row[:k + 1]
    assert set(new[0, k + 1:].tolist()) <= {PAD}
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos,
                       pad_token_id=PAD)
    assert out.sequences.tolist() == want.tolist()


def test_default_eos_from_generation_config(model):
    s = model.generation_settings()
    assert s.eos_ids == [EOS] and s.pad_token_id == PAD


@pytest.mark.parametrize("kw", [
    dict(min_new_tokens=MAX_NEW),
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.7),
    dict(no_repeat_ngram_size=2),
    dict(no_repeat_ngram_size=1, repetition_penalty=1.5, min_new_tokens=3),
])
def test_history_settings_match_transformers(model, hf, kw):
    """Settings that read earlier tokens, as people pass them to transformers' generate."""
    changed = False
    for ids, mask in (prompts(4), (torch.tensor([[5, 6, 7] * 4]), None)):
        ours = model.generate(ids, attention_mask=mask, max_new_tokens=40, **kw)
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=PAD, **kw)
        assert ours.tolist() == want.tolist()
        changed |= ours.tolist() != model.generate(ids, attention_mask=mask, max_new_tokens=40).tolist()
    assert changed  # the setting made a difference, so this test can fail


def test_stop_strings_stop_early(model):
    ids, _ = prompts(1)
    full = model.generate(ids, max_new_tokens=MAX_NEW, eos_token_id=[])[0, ids.shape[1]:].tolist()
    k = first_new(full)
    out = model.generate(ids, max_new_tokens=MAX_NEW, eos_token_id=[], stop_strings=[word_token(full[k]), "never"],
                         return_dict_in_generate=True)
    assert out.finish_reasons == ["stop"]
    assert out.completion_tokens == [k + 1]
    assert out.sequences[0, ids.shape[1]:].tolist() == full[:k + 1]


def test_stop_strings_need_a_tokenizer(tiny_dir, tmp_path):
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_dir("llama"), bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    ids, _ = prompts(1)
    with AutoModel.from_pretrained(bare, stages=0, progress=False) as m:
        assert m.tokenizer is None
        with pytest.raises(ConfigError, match="tokenizer"):
            m.generate(ids, max_new_tokens=3, stop_strings=["x"])
        assert m.generate(ids, max_new_tokens=3).shape == (1, ids.shape[1] + 3)


# --------------------------------------------------------------------------- streamers


class Collect(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.flatten().tolist())

    def end(self):
        self.ended = True


class CollectText(TextStreamer):
    def __init__(self, tokenizer, **kw):
        super().__init__(tokenizer, **kw)
        self.text = ""

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.text += text


def test_streamer_gets_the_same_tokens_as_with_transformers(model, hf):
    ids, _ = prompts(1)
    ours, theirs = Collect(), Collect()
    out = model.generate(ids, max_new_tokens=MAX_NEW, streamer=ours)
    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False, streamer=theirs)
    assert ours.ended and ours.puts == theirs.puts
    assert sum(ours.puts[1:], []) == out[0, ids.shape[1]:].tolist()


def test_text_streamer_decodes_the_completion(model):
    ids, _ = prompts(1)
    streamer = CollectText(model.tokenizer, skip_prompt=True)
    out = model.generate(ids, max_new_tokens=MAX_NEW, eos_token_id=[], streamer=streamer)
    want = model.tokenizer.decode(out[0, ids.shape[1]:])
    assert streamer.text.strip() == want.strip() and len(want) > 0


def test_text_streamer_prints(model, capsys):
    ids, _ = prompts(1)
    out = model.generate(ids, max_new_tokens=4, eos_token_id=[], streamer=TextStreamer(model.tokenizer))
    printed = capsys.readouterr().out
    assert model.tokenizer.decode(out[0, ids.shape[1]:]) in printed


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("kw, field", [
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(do_sample=True, top_k=-1), "top_k"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(num_beams=4), "num_beams"),
])
def test_bad_settings_raise_config_error(model, kw, field):
    ids, _ = prompts(1)
    with pytest.raises(ConfigError, match=field):
        model.generate(ids, **kw)


def test_temperature_zero_is_fine_when_greedy(model):
    ids, _ = prompts(1)
    assert model.generate(ids, max_new_tokens=3, temperature=0.0).shape == (1, ids.shape[1] + 3)


def test_positions_follow_the_left_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[1, 1, 0, 1], [0, 1, 2, 3]]


def test_rows_that_stop_early_are_padded_and_their_logits_kept(model, hf):
    """Rows stop at different steps (eos is a token each row reaches at another step); the
    output is transformers' own: padding after a row's eos, and logits for every row at
    every step, the stopped rows fed padding as transformers feeds them."""
    ids, mask = prompts(4)
    full = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=[])[:, ids.shape[1]:]
    eos = full[0, first_new(full[0].tolist())].item()  # stops row 0 early; other rows wherever they meet it
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD,
                          output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos,
                           pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)
    assert ours.sequences.tolist() == want.sequences.tolist()
    assert ours.finish_reasons[0] == "stop" and ours.completion_tokens[0] < MAX_NEW
    assert len(ours.logits) == len(want.logits)
    for a, b in zip(ours.logits, want.logits):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD)
    assert plain.tolist() == want.sequences.tolist()  # rows that leave at once give the same tokens


def test_a_batch_larger_than_the_reservation_runs_whole(model):
    """The model reserves KV for max_rows 1; a batch of 4 still runs, as one group."""
    ids, mask = prompts(4)
    assert model.pipeline.cfg.max_rows == 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
    alone = [model.generate(ids[r:r + 1, mask[r].argmax():], max_new_tokens=4, eos_token_id=[])[0, -4:].tolist()
             for r in range(4)]
    assert out[:, -4:].tolist() == alone
    assert model.stats()[0]["kv_bytes"] == 0
