"""The demo and the imbalance study: chance levels, the study's summary, and one short
demo run end to end (corpus -> pretraining under torchrun -> retrieval -> plots)."""
import json
import os

import pytest

from albef_bal import demo, study
from albef_bal.cli import main


def test_chance_recall_by_hand():
    # 2 images with 2 captions each: a random ranking of 4 texts puts one of the 2 right
    # ones first with probability 1/2, in the top 2 with 1 - C(2,2)/C(4,2) = 5/6
    img2txt = [[0, 1], [2, 3]]
    assert demo.chance_recall(img2txt, 4, 1) == pytest.approx((50.0, 50.0))
    assert demo.chance_recall(img2txt, 4, 2) == pytest.approx((100 * 5 / 6, 100.0))
    # one caption per image: k / N both ways
    txt, img = demo.chance_recall([[i] for i in range(1000)], 1000, 10)
    assert txt == pytest.approx(1.0) and img == pytest.approx(1.0)


def _result(r_mean, seed, itm=None):
    return {"seed": seed, "retrieval_itc": {k: r_mean for k in study.RETRIEVAL_KEYS},
            "retrieval_itm": {k: (itm if itm is not None else r_mean - 1) for k in study.RETRIEVAL_KEYS},
            "diagnostics": {"probe_gain": {"vision": r_mean / 2, "text": 1.0}, "reliance": {"image": 0.1, "text": 0.2},
                            "modality_gap": 0.5},
            "signals": {"rho_v": 0.9}}


def test_study_paired_statistics_by_hand():
    arms = study.build_arms("vision-medium", ["ogm_ge", "mmpareto"])
    assert [a.name for a in arms] == ["balanced", "imbalanced", "ogm_ge", "mmpareto"]
    assert arms[0].preset == "none" and arms[2].preset == "vision-medium" and arms[2].configs[0].endswith("ogm_ge.yaml")
    results = {"balanced": [_result(30.0, 0), _result(32.0, 1), _result(31.0, 2)],
               "imbalanced": [_result(20.0, 0), _result(21.0, 1), _result(22.0, 2)],
               "ogm_ge": [_result(25.0, 0), _result(26.0, 1), _result(27.5, 2)],  # +5, +5, +5.5
               "mmpareto": [_result(19.0, 0), _result(23.0, 1), _result(21.0, 2)]}  # -1, +2, -1
    a = study.analyse(arms, results, [0, 1, 2])
    rows = {r["name"]: r for r in a["arms"]}
    assert rows["imbalanced"]["r_mean"] == [20.0, 21.0, 22.0] and rows["imbalanced"]["seeds"] == [0, 1, 2]
    assert rows["balanced"]["mean"] == pytest.approx(31.0) and rows["balanced"]["sd"] == pytest.approx(1.0)
    assert rows["ogm_ge"]["probe_gain_vision"][0] == pytest.approx((12.5 + 13 + 13.75) / 3)
    assert a["gate"]["passed"] and a["gate"]["gap"]["mean_diff"] == pytest.approx(10.0)
    ogm, mmp = a["paired"]["ogm_ge"], a["paired"]["mmpareto"]
    assert ogm["per_seed"] == pytest.approx([5.0, 5.0, 5.5]) and ogm["mean_diff"] == pytest.approx(31 / 6)
    assert ogm["gap_closed"] == pytest.approx(31 / 60)
    assert ogm["ci"][0] > 0 and mmp["ci"][0] < 0 < mmp["ci"][1]
    # Holm over two methods: the smaller p doubled
    assert ogm["p_holm"] == pytest.approx(min(1.0, 2 * ogm["p"]))
    assert ogm["verdict"] == "helps" and mmp["verdict"].startswith("no detectable effect at this power")
    assert a["mde"]["mde"] > 0 and a["mde"]["mde_holm_first"] > a["mde"]["mde"]
    table = study.markdown_report(a)
    assert "| ogm_ge | +5.17 |" in table and "gate passed" in table and "Minimum detectable effect" in table
    # a baseline pair that is not imbalanced fails the gate
    results["imbalanced"][1] = _result(33.0, 1)
    assert not study.analyse(arms, results, [0, 1, 2])["gate"]["passed"]


def test_signal_summary_second_half_means(tmp_path):
    """The run's signals: second-half means of the scores, the losses (unimodal ones included
    when logged) and the method diagnostics; eval rows and other keys are left out."""
    rows = [{"step": 10 * i, "loss": 1.0, "loss_i2t": float(i), "loss_uni_image": -0.1 * i, "ogm/k_v": 1.0,
             "lr/vision": 0.1, "pairs_per_s": 5.0} for i in range(1, 5)]
    rows.append({"step": 40, "eval/r_mean": 3.0})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = study.signal_summary(str(path))
    assert set(out) == {"loss_i2t", "loss_uni_image", "ogm/k_v"}
    assert out["loss_i2t"] == pytest.approx(3.5) and out["loss_uni_image"] == pytest.approx(-0.35)


def test_study_refuses_bad_arguments_before_training(tmp_path, capsys):
    for args, word in ((["--methods", "ogm_ge,bogus"], "bogus"), (["--preset", "vision-shift-mild"], "every split"),
                       (["--seeds", "0"], "at least 2")):
        rc = main(["study", *args, "--output-dir", str(tmp_path / "s"), "--data-root", str(tmp_path / "d")])
        assert rc == 2
        assert word in capsys.readouterr().err
        assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_study_end_to_end_gate_and_resume(tmp_path, monkeypatch):
    """A tiny real study (torchrun runs through the CLI's code path): the baselines, one method,
    two seeds; study.json has the fields scripts rely on; a second call reuses every run."""
    monkeypatch.setitem(demo.CORPUS, "train", 300)
    monkeypatch.setitem(demo.CORPUS, "val", 40)
    monkeypatch.setitem(demo.CORPUS, "test", 40)
    sets = ["train.max_steps=3", "train.micro_batch_size=8", "data.samples_per_epoch=64", "model.queue_size=64",
            "train.log_every=1", "train.tensorboard=false", "eval.k_test=4", "train.wandb_project=p{seed}"]
    out = tmp_path / "study"
    # diagnostics off here (tests/test_diagnostics.py runs diagnose_checkpoint end to end)
    analysis = study.run_study(str(out), str(tmp_path / "data"), "vision-strong", ["ogm_ge"], [0, 1],
                               overrides=sets, ranks=1, gate=False, max_minutes=None, diagnose=False)
    saved = json.loads((out / "study.json").read_text())
    assert [a["name"] for a in saved["arms"]] == ["balanced", "imbalanced", "ogm_ge"]
    for a in saved["arms"]:
        assert a["seeds"] == [0, 1] and len(a["r_mean"]) == 2 and {"name", "corpus", "method"} <= set(a)
    p = saved["paired"]["ogm_ge"]
    assert {"mean_diff", "ci", "gap_closed", "per_seed"} <= set(p) and len(p["per_seed"]) == 2
    assert (out / "study.md").is_file() and (out / "study.png").is_file()
    r = json.loads((out / "ogm_ge" / "seed1" / "result.json").read_text())
    assert r["corpus"] == "vision-strong" and "ogm/k_v" in r["signals"]
    assert "wandb_project: p1" in (out / "ogm_ge" / "seed1" / "config.yaml").read_text()  # {seed} per run

    def no_training(*_):
        raise AssertionError("a finished run was trained again")
    again = study.run_study(str(out), str(tmp_path / "data"), "vision-strong", ["ogm_ge"], [0, 1], overrides=sets,
                            ranks=1, gate=False, max_minutes=None, train_fn=no_training, diagnose=False)
    assert again["paired"]["ogm_ge"]["per_seed"] == p["per_seed"]


def test_demo_end_to_end(tmp_path, monkeypatch):
    """A few steps of the real demo on a small corpus and one rank: every artefact the
    README promises is written, and the summary's numbers are consistent."""
    monkeypatch.setitem(demo.CORPUS, "train", 400)
    monkeypatch.setitem(demo.CORPUS, "val", 40)
    monkeypatch.setitem(demo.CORPUS, "test", 60)
    out, data = tmp_path / "run", tmp_path / "data"
    summary = demo.run_demo(str(out), str(data), overrides=["train.max_steps=4", "train.micro_batch_size=8",
                                                            "data.samples_per_epoch=64", "train.save_every=0",
                                                            "model.queue_size=64", "train.log_every=1"], ranks=1)
    for rel in ("demo_config.yaml", "metrics.jsonl", "export/model.safetensors", "export/config.yaml",
                "demo_summary.json"):
        assert (out / rel).is_file(), rel
    assert any(name.endswith(".png") for _, _, files in os.walk(out / "plots") for name in files)
    assert any(name.endswith(".json") for name in os.listdir(out / "retrieval"))
    saved = json.loads((out / "demo_summary.json").read_text())
    m = saved["metrics"]
    assert saved["mean_r1"] == pytest.approx((m["txt_r1"] + m["img_r1"]) / 2)
    assert saved["chance_mean_r1"] == pytest.approx(100 / 60)  # 2 captions of 120 texts; 1 image of 60
    assert summary["ranks"] == 1
    # a second run reuses the corpus instead of writing it again
    stamp = os.path.getmtime(data / "manifest.json")
    demo.ensure_corpus(str(data), lambda msg: None)
    assert os.path.getmtime(data / "manifest.json") == stamp
