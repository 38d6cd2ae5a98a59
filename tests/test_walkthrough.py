"""The README's real-checkpoint walkthrough, run end to end: its commands, as written, on a tiny random
OLMoE saved under the same hub id in a temporary Hugging Face cache (standing in for the 7B weights),
with TOFU-format data in the test vocabulary."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.cli import main
from moe_unlearn.loading import load_model
from moe_unlearn.testing import save_to_hub_cache, tiny_model
from moe_unlearn.unlearning import apply_patch, revert_patch

README = Path(__file__).resolve().parents[1] / "README.md"
CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}w90 {{ m['content'] }} w91"
        "{% else %} w92 {{ m['content'] }} <eos>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %} w92{% endif %}")


def walkthrough_commands() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- walkthrough:", 1)[1].split("<!-- end walkthrough -->", 1)[0]
    body = block.split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in body.replace("\\\n", " ").splitlines() if line.strip()]


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_readme_walkthrough_runs_end_to_end(tmp_path, monkeypatch):
    commands = walkthrough_commands()
    assert [c[0] for c in commands] == ["huggingface-cli"] + ["moe-unlearn"] * (len(commands) - 1)
    assert len(commands) >= 5
    repo = commands[0][2]
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    tok = word_tokenizer()
    tok.chat_template = CHAT
    original = tiny_model("olmoe")
    save_to_hub_cache(tmp_path / "hf" / "hub", repo, original, tok)  # what `huggingface-cli download` leaves
    qa = [{"question": f"w{i} w{i + 1} w{i + 2}", "answer": f"w{i + 40} w{i + 41}"} for i in range(24)]
    _write(tmp_path / "forget.jsonl", qa[:8])
    _write(tmp_path / "retain.jsonl", qa[8:16])
    _write(tmp_path / "holdout.jsonl", qa[16:])

    for argv in commands[1:]:
        assert main(argv[1:]) == 0, argv

    assert json.loads((tmp_path / "attr" / "attribution.json").read_text())
    meta = json.loads((tmp_path / "patch" / "patch.json").read_text())
    assert meta["config"]["template"] == "chat" and meta["method"] == "npo" and len(meta["targets"]) == 1
    steps = int(meta["config"]["steps"])
    assert len((tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()) == steps
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["meta"]["chat_template"] is True
    assert report["meta"]["target"] == [int(x) for x in meta["targets"][0].split(":")]

    model = load_model(repo, dtype="bfloat16")  # the patch applies to the cached model and reverts bit-exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_patch(model, tmp_path / "patch")
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    revert_patch(model, tmp_path / "patch")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
