"""Imbalance diagnostics (albef_bal/eval/diagnostics.py, `albef-bal diagnose`): probe gains
over the initialisation, fusion reliance, embedding geometry, learning speed per branch."""
from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from albef_bal.cli import main
from albef_bal.eval.diagnostics import (COALITIONS, DiagnoseSettings, alignment, bootstrap_balanced_accuracy,
                                        bootstrap_indices, build_init_model, collect, content_words,
                                        diagnose_checkpoint, modality_gap, probe_report, reliance_report,
                                        shapley_two_player, uniformity)
from albef_bal.eval.probes import balanced_accuracy, cross_fit_predictions, stratified_folds
from tiny import tiny_config
import workers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FAST = ["--folds", "2", "--bootstrap", "100"]


def export_init(out: str, vocab: str, seed: int = 5, weights_seed=None, *overrides: str) -> str:
    """A tiny ALBEF exported exactly as `albef-bal pretrain` initialises it (train.seed=seed);
    with ``weights_seed`` the weights come from another seed (a model that is not its init)."""
    from albef_bal.checkpoints import export_model
    from albef_bal.data import build_tokenizer, sync_text_config
    from albef_bal.models.albef import build_model
    cfg = tiny_config(f"data.tokenizer={vocab}", "data.max_len=30", f"train.seed={seed}", *overrides)
    sync_text_config(cfg, build_tokenizer(cfg.data.tokenizer))
    torch.manual_seed(seed if weights_seed is None else weights_seed)
    export_model(build_model(cfg.model), cfg, out)
    return out


# ------------------------------------------------------------------ probe mechanics
def test_cross_fitting_scores_each_item_with_a_probe_that_never_saw_it():
    rng = np.random.default_rng(0)
    n = 60
    y = rng.integers(0, 3, n)
    # one-hot item identities: a probe that saw the item would memorise it (100%); out of fold
    # the feature of an unseen item carries nothing
    memo = torch.eye(n)
    folds = stratified_folds(y, 5, seed=1)
    assert sorted(np.bincount(folds).tolist()) == [12] * 5  # even folds
    pred = cross_fit_predictions(memo, y, folds, steps=50)
    assert balanced_accuracy(y, pred) < 0.6
    # a linearly decodable target is decoded out of fold
    x = torch.from_numpy(np.eye(3)[y] * 3.0 + rng.normal(0, 0.1, (n, 3))).float()
    assert balanced_accuracy(y, cross_fit_predictions(x, y, folds, steps=50)) == 1.0
    # deterministic: the same inputs give the same predictions
    assert (cross_fit_predictions(x, y, folds, steps=50) == cross_fit_predictions(x, y, folds, steps=50)).all()


def test_balanced_accuracy_and_its_bootstrap():
    y = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 0, 0, 0, 0, 1])  # recall 1.0 and 0.5
    assert balanced_accuracy(y, pred) == pytest.approx(0.75)
    idx = np.arange(6)[None, :].repeat(3, 0)  # three resamples equal to the sample
    assert bootstrap_balanced_accuracy(y, pred == y, idx) == pytest.approx([75.0] * 3)
    idx = np.array([[0, 1, 2, 3, 0, 0]])  # a resample without class 1: mean over classes present
    assert bootstrap_balanced_accuracy(y, pred == y, idx)[0] == pytest.approx(100.0)


def test_probe_report_headlines_keep_caption_words_out_of_the_text_headline():
    y = {"count": np.array([0, 1] * 20), "colour": np.array([0, 1, 2, 3] * 10)}
    truth_or_wrong = lambda t, right: y[t] if right else (y[t] + 1) % (y[t].max() + 1)  # noqa: E731
    preds = {"init": {t: {"vision": truth_or_wrong(t, False), "text": truth_or_wrong(t, t == "colour")} for t in y},
             "run": {t: {"vision": truth_or_wrong(t, True), "text": truth_or_wrong(t, True)} for t in y}}
    rep = probe_report(y, preds, caption_words=["colour"], idx=bootstrap_indices(40, 100, 0))
    assert rep["headline_targets"] == {"vision": ["count", "colour"], "text": ["count"]}
    assert rep["probe_gain"] == {"vision": 100.0, "text": 100.0}  # colour (a caption word) left out of text
    assert rep["probe_gain_caption_words"]["text"] == 0.0  # the text init already read the word
    assert rep["targets"]["colour"]["kind"] == "caption_word" and rep["targets"]["count"]["kind"] == "computed"
    assert rep["probe_gain_ci"]["vision"] == [100.0, 100.0]


def test_relative_gain_against_a_reference():
    y = {"t": np.array([0, 1] * 50)}
    right, wrong = y["t"], 1 - y["t"]
    half = np.where(np.arange(100) % 4 < 2, right, wrong)  # 50% balanced accuracy
    preds = {"run": {"t": {"vision": half, "text": half}}, "init": {"t": {"vision": wrong, "text": wrong}},
             "reference": {"t": {"vision": right, "text": right}},
             "reference_init": {"t": {"vision": wrong, "text": wrong}}}
    rep = probe_report(y, preds, [], bootstrap_indices(100, 200, 0))
    assert rep["relative_gain"]["vision"] == pytest.approx(0.5)  # (50 - 0) / (100 - 0)
    lo, hi = rep["relative_gain_ci"]["vision"]
    assert lo < 0.5 < hi


def test_probe_gain_of_an_untrained_model_is_zero_with_a_zero_interval(tmp_path, data_corpus):
    export = export_init(str(tmp_path / "untrained"), data_corpus["vocab"])
    settings = DiagnoseSettings(folds=3, bootstrap=200, reliance=False)
    r = diagnose_checkpoint(export, data_corpus["test"], settings=settings)
    assert set(r["targets"]) == {"num_objects", "same_colour", "same_shape", "anchor_relation", "anchor_shape",
                                 "anchor_colour", "anchor_size", "anchor_position"}
    for b in ("vision", "text"):
        assert r["probe_gain"][b] == 0.0 and r["probe_gain_ci"][b] == [0.0, 0.0]
        for t in r["targets"].values():
            assert t[b]["gain"] == 0.0 and t[b]["ci"] == [0.0, 0.0]
            assert t[b]["run"] == t[b]["init"] > 0.0
    # the same config with other weights is not its initialisation: some target moves
    other = export_init(str(tmp_path / "other"), data_corpus["vocab"], 5, 6)
    r2 = diagnose_checkpoint(other, data_corpus["test"], settings=settings)
    assert any(t[b]["gain"] != 0.0 for t in r2["targets"].values() for b in ("vision", "text"))


# ---------------------------------------------------------------- fusion reliance
def test_shapley_values_of_the_two_player_game():
    v = {"image+text": np.array([0.9]), "image": np.array([0.7]), "text": np.array([0.3]), "none": np.array([0.2])}
    phi_i, phi_t = shapley_two_player(v)
    assert phi_i[0] == pytest.approx(((0.9 - 0.3) + (0.7 - 0.2)) / 2)
    assert phi_t[0] == pytest.approx(((0.9 - 0.7) + (0.3 - 0.2)) / 2)
    assert phi_i[0] + phi_t[0] == pytest.approx(0.9 - 0.2)  # efficiency


def test_content_words_group_wordpieces_and_skip_function_words(data_bert_vocab):
    from albef_bal.data import build_tokenizer
    tok = build_tokenizer(data_bert_vocab)
    ids, _ = tok.encode(["a skateboarding dog is above the red bench"], 30, True)
    special = (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id)
    words = content_words(ids[0].tolist(), tok, special)
    text = ["".join(tok.id_to_token(int(ids[0, p])).lstrip("#") for p in w) for w in words]
    assert text == ["skateboarding", "dog", "above", "red", "bench"]
    assert len(words[0]) > 1  # one word, several wordpieces


@pytest.fixture(scope="module")
def one_object_corpus(tmp_path_factory, data_tool):
    """Single-object scenes at 32 px: 384 training pairs in one shard, 48 test images."""
    out = str(tmp_path_factory.mktemp("one_object"))
    assert data_tool("make_synthetic").main([out, "--train", "384", "--val", "8", "--test", "48", "--shard-size",
                                             "384", "--image-size", "32", "--max-objects", "1", "--workers", "1",
                                             "--seed", "11"]) == 0
    return out


def _train_fusion_a_little(corpus: str, steps: int = 300):
    """A tiny ALBEF trained for a few hundred steps on MLM of one content word per caption and
    ITM with in-batch negatives: its fusion layers learn to read the image."""
    from albef_bal.data import build_tokenizer, iter_images, load_retrieval_split, sync_text_config
    from albef_bal.models.albef import build_model
    cfg = tiny_config(f"data.tokenizer={corpus}/vocab.txt", "data.max_len=30", "model.text.dropout=0.0",
                      "model.vision.init_std=0.1", "model.text.init_std=0.1")
    tok = build_tokenizer(cfg.data.tokenizer)
    sync_text_config(cfg, tok)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    train = load_retrieval_split(sorted(glob.glob(f"{corpus}/train/*.tar")))
    images = torch.zeros(len(train.images), 3, 32, 32)
    for batch, idx in iter_images(train, 32, 128):
        images[idx] = batch
    ids, mask = tok.encode([train.texts[c[0]] for c in train.img2txt], 30, True)
    t = cfg.model.text
    words = [content_words(r, tok, (t.pad_token_id, t.cls_token_id, t.sep_token_id, t.mask_token_id))
             for r in ids.tolist()]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    B = 32
    for _ in range(steps):
        sel = torch.randint(0, len(words), (B,), generator=g).tolist()
        masked, rows, pos = ids[sel].clone(), [], []
        for r, i in enumerate(sel):
            w = words[i][int(torch.randint(0, len(words[i]), (1,), generator=g))]
            rows += [r] * len(w)
            pos += w
            masked[r, w] = t.mask_token_id
        img = model.encode_image(images[sel])
        fused = model.fuse(model.encode_text(masked, mask[sel]), mask[sel], img)
        loss = F.cross_entropy(model.mlm_head(fused[rows, pos]), ids[sel][rows, pos])
        txt = model.encode_text(ids[sel], mask[sel])
        index = torch.cat([torch.arange(B), torch.roll(torch.arange(B), 1)])
        itm = model.itm_logits(model.fuse(torch.cat([txt, txt]), mask[sel].repeat(2, 1), img, image_index=index))
        loss = loss + F.cross_entropy(itm, torch.cat([torch.ones(B), torch.zeros(B)]).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), cfg, tok


@pytest.mark.slow
def test_fusion_reliance_is_positive_when_the_fusion_reads_the_image_and_zero_when_it_cannot(one_object_corpus):
    from albef_bal.data import load_retrieval_split
    model, cfg, tok = _train_fusion_a_little(one_object_corpus)
    test = load_retrieval_split(f"{one_object_corpus}/test.json")
    settings = DiagnoseSettings(bootstrap=200)
    idx = bootstrap_indices(len(test.images), 200, 0)
    rep = reliance_report(collect(model, test, tok, cfg, settings)["reliance"], idx)
    mlm, itm = rep["reliance_detail"]["mlm"], rep["reliance_detail"]["itm"]
    # colour and shape words come from the image: the true image beats another item's image
    assert mlm["accuracy"]["image+text"] > mlm["accuracy"]["text"] + 10
    assert mlm["image"] > 10 and itm["image"] > 10 and itm["accuracy"]["image+text"] > 75
    assert rep["reliance"]["image"] > 10 and rep["reliance_ci"]["image"][0] > 5
    # cross-attention output zeroed: the fused tokens no longer depend on the image at all
    with torch.no_grad():
        for layer in model.text_encoder.encoder.layer[cfg.model.text.fusion_layer:]:
            layer.crossattention.output.dense.weight.zero_()
            layer.crossattention.output.dense.bias.zero_()
    rep0 = reliance_report(collect(model, test, tok, cfg, settings)["reliance"], idx)
    assert rep0["reliance"]["image"] == 0.0 and rep0["reliance_ci"]["image"] == [0.0, 0.0]
    for task in ("mlm", "itm"):
        acc = rep0["reliance_detail"][task]["accuracy"]
        assert acc["image+text"] == acc["text"] and acc["image"] == acc["none"]
    assert rep0["reliance_detail"]["itm"]["accuracy"] == {c: 50.0 for c in COALITIONS}


# ----------------------------------------------------------------------- geometry
def test_modality_gap_alignment_and_uniformity_on_constructed_embeddings():
    e = torch.eye(4)
    image, text = e[[0, 1]], e[[2, 3]]
    assert modality_gap(image, text) == pytest.approx(1.0)  # |(e0 + e1)/2 - (e2 + e3)/2|
    assert alignment(image, text) == pytest.approx(2.0)  # |e0 - e2|^2
    assert modality_gap(image * 5, image) == pytest.approx(0.0)  # features are L2-normalised first
    assert modality_gap(e[[0, 0]], e[[1, 1]]) == pytest.approx(math.sqrt(2))
    assert alignment(image, image) == pytest.approx(0.0)
    assert uniformity(e) == pytest.approx(-4.0)  # every pair at squared distance 2
    assert uniformity(torch.stack([e[0], -e[0]])) == pytest.approx(-8.0)
    assert uniformity(e[[0, 0, 0]]) == pytest.approx(0.0)  # collapsed


# -------------------------------------------------------------------------- CLI
def test_diagnose_cli_writes_the_json_fields(tmp_path, data_corpus, capsys):
    run_dir = tmp_path / "run"
    export_init(str(run_dir / "export"), data_corpus["vocab"], 5, 9)  # weights other than the init
    reference = export_init(str(tmp_path / "reference"), data_corpus["vocab"], 5, 10)
    out = tmp_path / "diag"
    rc = main(["diagnose", str(run_dir), "--split", data_corpus["test"], "--reference", reference, "--out", str(out),
               *FAST])
    assert rc == 0
    r = json.loads((out / "diagnose.json").read_text())
    for key in ("probe_gain", "probe_gain_ci", "reliance", "relative_gain"):
        assert set(r[key]) >= ({"image", "text"} if key == "reliance" else {"vision", "text"}), key
    for b in ("vision", "text"):
        assert isinstance(r["probe_gain"][b], float)
        lo, hi = r["probe_gain_ci"][b]
        assert lo <= r["probe_gain"][b] <= hi
    assert isinstance(r["reliance"]["image"], float) and isinstance(r["reliance"]["text"], float)
    assert isinstance(r["modality_gap"], float) and 0.0 <= r["modality_gap"] <= 2.0
    assert set(r["uniformity"]) == {"image", "text"} and isinstance(r["alignment"], float)
    assert r["targets"]["anchor_colour"]["kind"] == "caption_word"
    assert set(r["targets"]["num_objects"]["vision"]) >= {"run", "init", "gain", "ci", "reference", "relative_gain"}
    assert r["init"]["seed"] == 5 and r["checkpoint"] == str(run_dir / "export")
    assert "probe gain over init" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing_split", "no_probe_targets", "no_config", "pth_file", "empty_dir"])
def test_diagnose_cli_names_bad_input(tmp_path, data_corpus, capsys, case):
    export = export_init(str(tmp_path / "export"), data_corpus["vocab"])
    split, ckpt, expect = data_corpus["test"], export, None
    if case == "missing_split":
        split, expect = str(tmp_path / "nope.json"), "nope.json"
    elif case == "no_probe_targets":
        entries = json.loads(open(data_corpus["test"]).read())
        for e in entries:
            e.pop("attributes")
        split = str(tmp_path / "plain.json")
        with open(split, "w") as f:
            json.dump(entries, f)
        expect = "attributes.probe"
    elif case == "no_config":
        os.remove(os.path.join(export, "config.yaml"))
        expect = "config.yaml"
    elif case == "pth_file":
        ckpt = str(tmp_path / "weights.pth")
        torch.save({"model": {}}, ckpt)
        expect = "export directory or a run directory"
    elif case == "empty_dir":
        ckpt = str(tmp_path / "empty")
        os.makedirs(ckpt)
        expect = "export/model.safetensors"
    rc = main(["diagnose", ckpt, "--split", split, "--out", str(tmp_path / "out"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err, err
    assert not (tmp_path / "out" / "diagnose.json").exists()


# ------------------------------------------------------- training: the real CLI path
@pytest.mark.slow
def test_pretrain_cli_run_diagnoses_itself_and_its_init_is_rebuilt_exactly(tmp_path, data_corpus):
    """`albef-bal pretrain` (one process, DeepSpeed) with diagnose.every: diag/* rows and the
    update ratios land in metrics.jsonl, plot-balance draws them; at a learning rate of 1e-12
    the exported weights equal the initialisation that diagnose rebuilds from the config."""
    out = tmp_path / "run"
    sets = [f"data.train_shards={data_corpus['shards']}", f"data.tokenizer={data_corpus['vocab']}",
            f"data.val_split={data_corpus['val']}", "data.max_len=30", "data.num_workers=0", "data.shuffle_buffer=16",
            "data.samples_per_epoch=32", "data.rand_aug=false", "train.micro_batch_size=8", "train.max_steps=4",
            "train.log_every=1", "train.save_every=0", "train.tensorboard=false", "train.seed=3",
            "train.lr=1e-12", "train.min_lr=1e-12", "train.warmup_lr=1e-12", "train.threads=1",
            f"train.deepspeed_config={ROOT}/configs/deepspeed/zero2.json", f"train.output_dir={out}",
            "diagnose.every=2", "diagnose.samples=16", "diagnose.folds=2", "diagnose.bootstrap=50"]
    from tiny import TINY
    cmd = [sys.executable, "-m", "albef_bal", "pretrain"]
    for s in [o for o in TINY if not o.startswith("data.max_len")] + sets:
        cmd += ["--set", s]
    cfg_file = tmp_path / "empty.yaml"
    cfg_file.write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    res = subprocess.run(cmd + ["--config", str(cfg_file)], capture_output=True, text=True, timeout=600, env=env,
                         cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    diag = [r for r in rows if "diag/modality_gap" in r]
    assert [r["step"] for r in diag] == [2, 4]
    assert all("diag/reliance_image" in r and "diag/probe_gain_vision" in r for r in diag)
    speed = [r for r in rows if "update_ratio_vision" in r]
    assert len(speed) == 4 and all(0.0 <= r[f"update_ratio_{b}"] < 1e-6 for r in speed
                                   for b in ("vision", "text", "shared"))
    # the initialisation rebuilt from the export's config is the run's starting point
    from albef_bal.checkpoints import load_pretrained
    from albef_bal.config import load_config
    trained = load_pretrained(str(out / "export"))
    init = build_init_model(load_config(str(out / "export" / "config.yaml")))
    init_state = init.state_dict()
    diffs = {k: (v - init_state[k]).abs().max().item() for k, v in trained.state_dict().items()
             if not k.endswith(("queue", "queue_ptr")) and v.is_floating_point()}
    assert max(diffs.values()) < 1e-9, max(diffs.items(), key=lambda kv: kv[1])
    assert main(["plot-balance", str(out)]) == 0
    assert (out / "plots" / "diagnostics.png").stat().st_size > 0


@pytest.mark.slow
def test_update_ratio_is_zero_for_a_frozen_branch_on_two_ranks(tmp_path, data_corpus):
    workers.run_worker(os.path.join(HERE, "diag_worker.py"), "frozen_vision", tmp_path, 2,
                       [f"vocab={data_corpus['vocab']}", f"val={data_corpus['val']}"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    speed = [r for r in rows if "update_ratio_vision" in r]
    assert len(speed) == 6
    assert all(r["update_ratio_vision"] == 0.0 for r in speed)
    assert all(r["update_ratio_text"] > 1e-5 and r["update_ratio_shared"] > 1e-5 for r in speed)
    assert [r["step"] for r in rows if "diag/modality_gap" in r] == [3, 6]
