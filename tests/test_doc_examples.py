"""The documentation's examples run: the README's Python quick start and every command and
Python block of docs/using-a-model.md (in this process, through the `albef-bal` entry point), on a demo-size model (configs/demo/tiny.yaml's
architecture) and a small synthetic corpus laid out where `make demo` puts its own."""
import json
import os
import re
import shlex

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"(?:<!--\s*no-test:(?P<why>[^>]*)-->\s*\n)?^```(?P<lang>\w*)[^\n]*\n(?P<code>.*?)^```\s*$",
                   re.M | re.S)


def code_blocks(path: str, langs=("python", "bash")) -> list[tuple[str, str, str]]:
    """``(language, code, reason not to run or "")`` of each fenced block in ``path``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [(m["lang"], m["code"], (m["why"] or "").strip()) for m in BLOCK.finditer(text) if m["lang"] in langs]


@pytest.fixture(scope="module")
def demo_site(data_tool, tmp_path_factory):
    """A working directory holding data/synthetic (the demo's corpus layout, 16 test images)
    and runs/demo/export (an untrained model of the demo's size and configuration)."""
    import torch
    from albef_bal.checkpoints import export_model
    from albef_bal.config import load_config
    from albef_bal.data import build_tokenizer, sync_text_config
    from albef_bal.demo import DEFAULT_CONFIG, corpus_overrides
    from albef_bal.models import ALBEF
    site = tmp_path_factory.mktemp("demo_site")
    data = site / "data" / "synthetic"
    assert data_tool("make_synthetic").main([str(data), "--train", "32", "--val", "8", "--test", "16",
                                             "--shard-size", "16", "--max-objects", "2", "--workers", "1"]) == 0
    cwd = os.getcwd()
    os.chdir(site)  # the config's corpus paths are relative, as in the demo
    try:
        cfg = load_config(DEFAULT_CONFIG, corpus_overrides("data/synthetic") + ["eval.num_workers=0"])
        sync_text_config(cfg, build_tokenizer(cfg.data.tokenizer))
        torch.manual_seed(0)
        export_model(ALBEF(cfg.model), cfg, "runs/demo/export")
    finally:
        os.chdir(cwd)
    return site


def commands(code: str) -> list[list[str]]:
    """The command lines of a shell block (continuations joined, comments dropped)."""
    lines = code.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def run(lang: str, code: str, cwd, capsys, monkeypatch) -> str:
    """Run a block in this process, in ``cwd``: Python as a script, shell commands through the
    ``albef-bal`` entry point (the only program the page's commands may call). Returns stdout."""
    from albef_bal.cli import main
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    if lang == "python":
        exec(compile(code, "<doc block>", "exec"), {"__name__": "__main__"})
        return capsys.readouterr().out
    out = []
    for argv in commands(code):
        assert argv[0] == "albef-bal", f"a documented command the test cannot run: {' '.join(argv)}"
        rc = main(argv[1:])
        captured = capsys.readouterr()
        assert rc == 0, f"{' '.join(argv)} failed ({rc}):\n{captured.err[-3000:]}"
        out.append(captured.out)
    return "\n".join(out)


def test_readme_python_quick_start_runs(demo_site, capsys, monkeypatch):
    blocks = code_blocks(os.path.join(REPO, "README.md"), ("python",))
    assert blocks, "the README has a Python quick start"
    for lang, code, why in blocks:
        assert not why
        run(lang, code, demo_site, capsys, monkeypatch)


def test_using_a_model_page_runs(demo_site, capsys, monkeypatch):
    blocks = code_blocks(os.path.join(REPO, "docs", "using-a-model.md"))
    runnable = [b for b in blocks if not b[2]]
    assert len(runnable) >= 4, "the page shows Python and command-line use"
    outputs = []
    for lang, code, _ in runnable:
        out = run(lang, code, demo_site, capsys, monkeypatch)
        outputs.append(out)
        if lang == "bash" and any("--json" in argv for argv in commands(code)):
            hits = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
            assert [h["rank"] for h in hits] == [1, 2, 3]
            assert all(isinstance(h["score"], float) and h["id"] for h in hits)
    text = "\n".join(outputs)
    assert "16 image(s)" in text and "re-ranked by ITM" in text
    assert os.path.isfile(demo_site / "runs" / "demo" / "gallery" / "index.json")
    assert json.load(open(demo_site / "runs" / "demo" / "gallery_captions" / "index.json"))["texts"] >= 32
