"""Hub ids (`org/name`) resolve through the local Hugging Face cache, offline; an id that is not
cached is one clear error that says how to fetch it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.errors import BadInputError
from moe_unlearn.loading import load_model, load_tokenizer, resolve_model_dir
from moe_unlearn.testing import save_to_hub_cache, tiny_model

REPO = "allenai/OLMoE-tiny-test"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_model("olmoe")
    snap = save_to_hub_cache(home / "hub", REPO, model, word_tokenizer())
    return model, snap


def test_hub_id_resolves_to_its_cached_snapshot(hub):
    model, snap = hub
    assert resolve_model_dir(REPO) == snap
    assert (snap / "config.json").is_symlink()  # the cache's layout: links into blobs/
    loaded = load_model(REPO)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert load_tokenizer(REPO)("w1 w2")["input_ids"] == word_tokenizer()("w1 w2")["input_ids"]


def test_revision_and_local_folder_win(hub, tmp_path, monkeypatch):
    _, snap = hub
    assert resolve_model_dir(REPO + "@main") == snap
    local = tmp_path / "allenai" / "OLMoE-tiny-test"  # a real folder of that name is taken as a folder
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir(REPO) == Path(REPO)


def test_missing_hub_id_says_how_to_fetch_it(hub):
    with pytest.raises(BadInputError, match=r"not in the local Hugging Face cache .*huggingface-cli download "
                                            r"org/absent-model"):
        resolve_model_dir("org/absent-model")
    with pytest.raises(BadInputError, match="does not exist"):
        resolve_model_dir("gpt2")  # a bare name is never a hub id here


def test_cli_takes_a_hub_id(hub):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-m", "moe_unlearn.cli", "inspect", REPO, "--json"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["family"] == "olmoe" and summary["model_class"] == "OlmoeForCausalLM"
    bad = subprocess.run([sys.executable, "-m", "moe_unlearn.cli", "inspect", "org/absent-model"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "huggingface-cli download org/absent-model" in bad.stderr
    assert "Traceback" not in bad.stderr
