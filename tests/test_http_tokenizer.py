"""``--tokenizer PATH``: the HTTP front counts and hashes a prompt with the model's own
tokenizer, read from a local tokenizer.json (the test writes one; nothing is downloaded)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

tokenizers = pytest.importorskip("tokenizers")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from dpcore.errors import ConfigError
from dpcore.http.launch import launch
from dpcore.http.tokenizer import FileTokenizer, load

WORDS = ["[UNK]", "[BOS]", "hello", "dpcore", "world", "ranks", "serve"]


def write_tokenizer(directory: Path) -> Path:
    """A word-level tokenizer.json: one id per word of WORDS, a BOS token added in front."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


def test_file_tokenizer_encodes_like_the_model(tmp_path: Path) -> None:
    path = write_tokenizer(tmp_path / "model")
    for given in (path, path.parent):  # the file, or the model directory
        tok = FileTokenizer(str(given))
        assert tok.encode("hello dpcore world") == [1, 2, 3, 4]
        assert tok.decode([2, 3, 99999]) == "hello dpcore"  # ids past the vocabulary are skipped
        assert tok.name == str(path)
    assert load(None).name == "bytes"


def test_bad_tokenizer_paths_are_one_line_config_errors(tmp_path: Path, dpcore_exe: list[str]) -> None:
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        FileTokenizer(str(tmp_path / "missing"))
    broken = tmp_path / "broken.json"
    broken.write_text("{not a tokenizer")
    with pytest.raises(ConfigError, match="not a tokenizer.json"):
        FileTokenizer(str(broken))
    r = subprocess.run([*dpcore_exe, "serve", "--dp-size", "1", "--http-port", "0", "--tokenizer", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no tokenizer.json" in r.stderr, r.stderr


def test_front_counts_prompt_tokens_with_the_given_tokenizer(tmp_path: Path) -> None:
    path = write_tokenizer(tmp_path / "model")
    with launch(1, log_dir=tmp_path / "logs", front_args=("--tokenizer", str(path.parent))) as stack:
        with httpx.Client(base_url=stack.url, timeout=30) as c:
            r = c.post("/generate", json={"text": "hello dpcore ranks serve", "sampling_params": {"max_new_tokens": 2}})
            assert r.status_code == 200, r.text
            assert r.json()["meta_info"]["prompt_tokens"] == 5  # BOS + four words, not 24 bytes
            assert c.get("/server_info").json()["tokenizer"] == str(path)
            assert c.get("/model_info").json()["tokenizer_path"] == str(path)
