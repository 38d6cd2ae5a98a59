"""The saved tiny model both hardening test files probe: a qwen3_moe with a word tokenizer and a forget file."""

from __future__ import annotations

from pathlib import Path

from _tiny_tokenizer import word_tokenizer

from moe_unlearn.testing import tiny_model

FORGET = [" ".join(f"w{(3 * i + j) % 40}" for j in range(7)) for i in range(6)]
KW = dict(batch_size=3, max_length=16, progress=False, lr=1e-2)


def save_tiny(root: Path) -> tuple[Path, Path, Path]:
    """(root, model_dir, forget file) under `root`."""
    model_dir = root / "model"
    tiny_model("qwen3_moe").save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    forget = root / "forget.txt"
    forget.write_text("\n".join(FORGET) + "\n")
    return root, model_dir, forget


def stderr_without_traceback(capsys) -> str:
    """The CLI's stderr, asserting it holds one message, not a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def forbid_model_load(monkeypatch) -> None:
    """Make any model load fail the test: the inputs must be refused before it."""
    from moe_unlearn import loading

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")
    monkeypatch.setattr(loading, "load_model", boom)
