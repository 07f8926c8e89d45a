"""Unimodal feature-space losses (model.unimodal): gradients stay in their branch, the two
image views differ and keep the scene, each loss is finite and learnable, everything off is
ALBEF as before, checkpoints round-trip with and without the heads, and a DeepSpeed run with
the losses on resumes exactly."""
import json
import math
import os

import pytest
import torch

from albef_bal.checkpoints import export_model, load_pretrained
from albef_bal.config import ConfigError
from albef_bal.data.transforms import CLIP_MEAN, CLIP_STD
from albef_bal.models import ALBEF
from albef_bal.models.unimodal import augment_view, simclr_loss, simcse_loss
from tiny import tiny_batch, tiny_config
import workers

HERE = os.path.dirname(__file__)
# small heads for the tiny model (the defaults are the authors' widths for ViT-B / BERT-base)
SMALL_HEADS = ["model.unimodal.simsiam.dim=32", "model.unimodal.simsiam.pred_dim=8",
               "model.unimodal.simclr.mlp_dim=32", "model.unimodal.simclr.dim=16"]
OPTIONS = [("image", "simsiam"), ("image", "simclr"), ("text", "mlm"), ("text", "simcse")]


def config(image="none", text="none", *extra):
    return tiny_config(f"model.unimodal.image={image}", f"model.unimodal.text={text}", *SMALL_HEADS, *extra)


def build(image="none", text="none", *extra, seed=0):
    torch.manual_seed(seed)
    return ALBEF(config(image, text, *extra).model)


def batch(seed=0, size=8):
    return tiny_batch(tiny_config(), batch=size, seed=seed)


# ------------------------------------------------------------- gradients
@pytest.mark.parametrize("tower, kind", OPTIONS)
def test_each_unimodal_loss_reaches_only_its_branch_and_its_head(tower, kind):
    model = build(**{tower: kind})
    out = model(*batch(), alpha=0.4)
    loss = out.loss_uni_image if tower == "image" else out.loss_uni_text
    other = out.loss_uni_text if tower == "image" else out.loss_uni_image
    assert other is None and loss is not None and torch.isfinite(loss)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    reached = {n for (n, _), g in zip(named, grads) if g is not None and g.abs().sum() > 0}
    branch = "vision" if tower == "image" else "text"
    own = {n for n, _ in model.branch_parameters()[branch]}
    head = {n for n, _ in named if n.startswith(f"uni_{tower}_head.")}
    assert head and head <= own  # the head belongs to its tower's branch
    assert reached <= own, sorted(reached - own)
    # it trains the encoder and the head, not one of them only
    assert reached & head and reached & (own - head)
    if tower == "image":  # every layer of the image encoder, up to the patch embedding
        assert "visual_encoder.patch_embed.proj.weight" in reached
    else:
        assert "text_encoder.embeddings.word_embeddings.weight" in reached
    # nothing of the other branch, the fusion layers, projections or ALBEF's heads
    assert not any(n.startswith(("text_encoder.encoder.layer.2", "vision_proj", "text_proj", "itm_head", "mlm_head",
                                 "temp")) for n in reached)


def test_branch_parameters_and_optimizer_groups_cover_the_heads():
    from albef_bal.engine.optim import param_groups
    model = build("simsiam", "simcse")
    groups = model.branch_parameters()
    names = {b: {n for n, _ in v} for b, v in groups.items()}
    assert any(n.startswith("uni_image_head.") for n in names["vision"])
    assert any(n.startswith("uni_text_head.") for n in names["text"])
    assert not any(n.startswith("uni_") for n in names["shared"])
    in_groups = {id(p) for g in param_groups(model, 0.02) for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}


# ------------------------------------------------------------------ views
def test_views_differ_are_reproducible_and_stay_in_range():
    aug = config("simsiam").model.unimodal.augment
    images = batch()[0]
    a = augment_view(images, aug, torch.Generator().manual_seed(1))
    b = augment_view(images, aug, torch.Generator().manual_seed(1))
    c = augment_view(images, aug, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)  # a pure function of the seed
    assert not torch.equal(a, c) and not torch.equal(a, images)
    # the images of a batch get different strengths: their changes differ in size
    change = (a - images).flatten(1).norm(dim=1)
    assert change.std() > 0.05 * change.mean()
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    pixels = a * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_views_keep_what_the_caption_says():
    """A red square on the left stays a red square on the left: no flip, crop, move or
    recolouring (captions name positions, sizes and colours)."""
    aug = config("simsiam").model.unimodal.augment
    pix = torch.full((8, 3, 64, 64), 0.5)
    pix[:, 0, 24:40, 6:22] = 0.86
    pix[:, 1:, 24:40, 6:22] = 0.16
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    view = augment_view((pix - mean) / std, aug, torch.Generator().manual_seed(0)) * std + mean
    for img in view:
        red = (img[0] - img[1:].mean(0)) > 0.35
        ys, xs = torch.nonzero(red, as_tuple=True)
        assert abs(ys.float().mean() - 31.5) < 1.0 and abs(xs.float().mean() - 13.5) < 1.0  # same place
        assert red.sum().item() == pytest.approx(16 * 16, rel=0.25)  # same size
        inside = img[:, 26:38, 8:20].mean(dim=(1, 2))
        assert inside[0] > 0.7 and inside[1] < 0.3 and inside[2] < 0.3  # still red


def test_resumed_views_need_only_the_training_rng():
    """The views are drawn from a generator seeded by the global RNG (which checkpoints
    save): the same RNG state gives the same image loss, another state another one."""
    model = build("simclr")
    images, ids, mask = batch()
    state = torch.get_rng_state()
    a = model(images, ids, mask, update=False).loss_uni_image
    torch.set_rng_state(state)
    b = model(images, ids, mask, update=False).loss_uni_image
    c = model(images, ids, mask, update=False).loss_uni_image
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------- loss values
def test_simclr_loss_by_hand():
    q = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    t = 0.1
    total = 0.0
    for a, b in ((q, k), (k, q)):
        for i in range(3):
            pos = math.exp(float(a[i] @ b[i]) / t)
            den = sum(math.exp(float(a[i] @ b[j]) / t) for j in range(3))
            den += sum(math.exp(float(a[i] @ a[j]) / t) for j in range(3) if j != i)
            total += -math.log(pos / den)
    assert float(simclr_loss(q, k, t)) == pytest.approx(total / 6, rel=1e-5)
    # SimCSE: row i of view 1 against every row of view 2, cosine / temperature
    z1, z2 = torch.randn(3, 5), torch.randn(3, 5)
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    want = sum(-math.log(math.exp(cos(z1[i], z2[i]) / 0.05) / sum(math.exp(cos(z1[i], z2[j]) / 0.05)
                                                                 for j in range(3))) for i in range(3)) / 3
    assert float(simcse_loss(z1, z2, 0.05)) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("image, text", [("simsiam", "mlm"), ("simclr", "simcse")])
def test_each_loss_is_finite_and_decreases_on_a_tiny_run(image, text):
    # text init 0.1, as the demo: at BERT's 0.02 every caption starts with nearly the same
    # CLS feature (DESIGN.md section 8) and SimCSE sits at chance for longer than this run
    model = build(image, text, "model.text.init_std=0.1")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    images, ids, mask = batch(size=8)
    values = {"image": [], "text": []}
    # 30 steps, means of five: the MLM loss draws new masked positions and dropout masks every
    # step, and over 15 steps its decrease at one seed ranged 2-17% across seeds
    for _ in range(30):
        out = model(images, ids, mask, alpha=0.0)
        for tower, loss in (("image", out.loss_uni_image), ("text", out.loss_uni_text)):
            assert torch.isfinite(loss)
            values[tower].append(float(loss.detach()))
        opt.zero_grad()
        out.total().backward()
        opt.step()
    for tower, v in values.items():
        first, last = sum(v[:5]) / 5, sum(v[-5:]) / 5
        assert last < first - 0.05 * abs(first) - 0.01, (tower, v)


def test_batch_of_one_gives_a_zero_image_loss_instead_of_a_batch_norm_error():
    model = build("simsiam")
    out = model(*batch(size=1))
    assert float(out.loss_uni_image.detach()) == 0.0
    out.total().backward()


# ------------------------------------------------------- everything off
def test_every_unimodal_loss_off_reproduces_albef_exactly():
    """Off: no head, no extra random draw, the same weights. On: the same weights for every
    other part, and ALBEF's losses and their gradients unchanged (the unimodal part is
    computed last and only adds its own terms)."""
    off = build()
    assert not any(k.startswith("uni_") for k in off.state_dict())
    assert off.uni_image_head is None and off.uni_text_head is None
    on = build("simsiam", "mlm")
    on_state = on.state_dict()
    for k, v in off.state_dict().items():
        assert torch.equal(v, on_state[k]), k
    images, ids, mask = batch()
    torch.manual_seed(5)
    out_off = off(images, ids, mask, alpha=0.4)
    after_off = torch.get_rng_state()
    torch.manual_seed(5)
    out_on = on(images, ids, mask, alpha=0.4)
    for k in ("loss_itc", "loss_i2t", "loss_t2i", "loss_itm", "loss_mlm", "score_v", "score_t"):
        assert torch.equal(getattr(out_off, k), getattr(out_on, k)), k
    assert out_off.loss_uni_image is None and out_off.loss_uni_text is None
    assert set(out_off.scalars()) == {"loss_itc", "loss_i2t", "loss_t2i", "loss_itm", "loss_mlm", "score_v",
                                      "score_t", "itm_acc", "temp", "mlm_acc"}
    # weight 0 on the unimodal losses: ALBEF's total and every gradient, bit for bit
    assert torch.equal(out_on.total(uni_image=0.0, uni_text=0.0), out_off.total())
    out_off.total().backward()
    out_on.total(uni_image=0.0, uni_text=0.0).backward()
    on_params = dict(on.named_parameters())
    for n, p in off.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, on_params[n].grad), n
    # and the forward without unimodal losses draws exactly what it drew before: the
    # image loss's single extra draw is the only difference in the random stream
    torch.manual_seed(5)
    on_image = build("simsiam")
    torch.manual_seed(5)
    on_image(images, ids, mask, alpha=0.4)
    assert not torch.equal(torch.get_rng_state(), after_off)
    torch.manual_seed(5)
    off(images, ids, mask, alpha=0.4)
    assert torch.equal(torch.get_rng_state(), after_off)


def test_weights_and_total():
    out = build("simclr", "simcse")(*batch(), alpha=0.4)
    base = out.loss_itc + out.loss_itm + out.loss_mlm
    expected = base + 0.5 * out.loss_uni_image + 2.0 * out.loss_uni_text
    assert torch.allclose(out.total(uni_image=0.5, uni_text=2.0), expected)
    assert set(out.scalars()) >= {"loss_uni_image", "loss_uni_text"}


@pytest.mark.parametrize("overrides, pattern", [
    (["model.unimodal.image=byol"], r"model\.unimodal\.image: expected one of \['none', 'simsiam', 'simclr'\]"),
    (["model.unimodal.text=mlm", "model.retrieval=true"], r"model\.unimodal\.text=mlm needs the masked captions"),
    (["model.unimodal.text=simcse", "model.text.dropout=0"], r"model\.text\.dropout is 0"),
    (["model.unimodal.image=simsiam", "model.unimodal.augment.noise=0", "model.unimodal.augment.blur=0",
      "model.unimodal.augment.brightness=0", "model.unimodal.augment.contrast=0"],
     r"model\.unimodal\.augment: every augmentation strength is 0"),
    (["model.unimodal.image=simsiam", "model.unimodal.augment.brightness=1.5"], r"model\.unimodal\.augment\.brightness"),
    (["model.unimodal.simclr.temperature=0"], r"model\.unimodal\.simclr\.temperature must be > 0"),
])
def test_config_errors_name_the_key(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        tiny_config(*overrides)


# ------------------------------------------------------------ checkpoints
def _same(a, b):
    sb = b.state_dict()
    for k, v in a.state_dict().items():
        assert torch.equal(v, sb[k]), k


def test_export_and_load_round_trip_with_heads(tmp_path):
    cfg = config("simsiam", "mlm")
    torch.manual_seed(0)
    model = ALBEF(cfg.model)
    model(*batch())  # BN running statistics, queue pointer and momentum weights off their init
    export_model(model, cfg, str(tmp_path / "e"))
    loaded = load_pretrained(str(tmp_path / "e"))
    _same(model, loaded)
    r = loaded.load_report
    assert r.missing == [] and r.unexpected == [] and r.new == []
    assert loaded.cfg.unimodal.image == "simsiam" and loaded.uni_image_head is not None


def test_heads_are_reported_new_or_unused_never_dropped_silently(tmp_path):
    # exported without heads, loaded into a model with them: the heads are new, the rest loads
    plain_cfg = config()
    torch.manual_seed(0)
    plain = ALBEF(plain_cfg.model)
    export_model(plain, plain_cfg, str(tmp_path / "plain"))
    with_heads = load_pretrained(str(tmp_path / "plain"), overrides=["model.unimodal.image=simclr",
                                                                     "model.unimodal.text=simcse"])
    r = with_heads.load_report
    assert r.missing == [] and r.unexpected == []
    assert r.new and all(k.startswith(("uni_image_head.", "uni_text_head.")) for k in r.new)
    assert "new (" in str(r)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, with_heads.state_dict()[k]), k
    # exported with heads, loaded with the losses off: the heads are listed as unexpected
    heads_cfg = config("simsiam", "simcse")
    torch.manual_seed(0)
    export_model(ALBEF(heads_cfg.model), heads_cfg, str(tmp_path / "heads"))
    no_heads = load_pretrained(str(tmp_path / "heads"), overrides=["model.unimodal.image=none",
                                                                   "model.unimodal.text=none"])
    assert no_heads.load_report.unexpected and all(k.startswith(("uni_image_head.", "uni_text_head."))
                                                   for k in no_heads.load_report.unexpected)
    assert no_heads.load_report.missing == []


def test_official_checkpoint_loads_into_a_model_with_heads(tmp_path):
    from test_checkpoints import NOT_IN_SHAPES, to_official
    torch.manual_seed(0)
    plain = ALBEF(config().model)
    torch.save({"model": to_official(plain)}, tmp_path / "ALBEF.pth")
    model = load_pretrained(str(tmp_path / "ALBEF.pth"), overrides=NOT_IN_SHAPES + SMALL_HEADS + [
        "model.unimodal.image=simsiam", "model.unimodal.text=mlm"])
    r = model.load_report
    assert r.missing == [] and r.skipped == []
    assert {k.split(".")[0] for k in r.new} == {"uni_image_head", "uni_text_head"}
    for k, v in plain.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    # a text MLM head has no place in a retrieval model: turned off there, reported unused
    heads_cfg = config("simsiam", "mlm")
    torch.manual_seed(0)
    export_model(ALBEF(heads_cfg.model), heads_cfg, str(tmp_path / "heads"))
    ret = load_pretrained(str(tmp_path / "heads"), retrieval=True)
    assert ret.uni_text_head is None and ret.uni_image_head is not None
    assert any(k.startswith("uni_text_head.") for k in ret.load_report.unexpected)


# ------------------------------------------------ DeepSpeed, two ranks, resume
@pytest.mark.slow
def test_two_rank_run_with_unimodal_losses_resumes_exactly(tmp_path):
    workers.run_worker(os.path.join(HERE, "unimodal_worker.py"), "resume", tmp_path, 2, [])
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["first"] == "preempted" and r["resumed_from"] == r["first_step"] < 8 and r["final_step"] == 8
    assert r["max_diff"] < 1e-6, r  # every weight, head, momentum copy and queue entry
    assert r["logged"] == ["loss_uni_image", "loss_uni_text"]
    assert all(math.isfinite(x) for x in r["uni_image"] + r["uni_text"])
    # balance.score=unimodal (score_every 2): 0 until step 2, then moves; same on both ranks
    # (it is all-reduced; the log is rank 0's) and the same after the resume
    scores = {step: (v, t) for step, v, t in r["scores"]}
    assert all(scores[s] == (0.0, 0.0) for s in scores if s <= 3) and any(scores[s] != (0.0, 0.0) for s in scores)
    resumed = {step: (v, t) for step, v, t in r["scores_resumed"]}
    assert sorted(resumed) == sorted(scores)
    assert all(resumed[s] == pytest.approx(scores[s], abs=1e-6) for s in scores), (resumed, scores)


# ------------------------------------------- balancing methods: balance.unimodal_loss
def test_unimodal_loss_ssl_needs_mmpareto_or_gblend_and_both_losses():
    with pytest.raises(ConfigError, match=r"balance\.unimodal_loss=ssl is read by balance\.method mmpareto and "
                                          r"gblend only, not 'ogm_ge'"):
        config("simsiam", "mlm", "balance.method=ogm_ge", "balance.unimodal_loss=ssl")
    with pytest.raises(ConfigError, match=r"set model\.unimodal\.image \(now 'simsiam'\) and "
                                          r"model\.unimodal\.text \(now 'none'\)"):
        config("simsiam", "none", "balance.method=mmpareto", "balance.unimodal_loss=ssl")
    assert config("simsiam", "mlm", "balance.method=gblend", "balance.unimodal_loss=ssl").balance.unimodal_loss == "ssl"


@pytest.fixture(scope="module")
def mmpareto_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("mmpareto_uni")
    workers.run_worker(os.path.join(HERE, "unimodal_worker.py"), "mmpareto", out, 1, [])
    return out


@pytest.mark.parametrize("source", ["itc", "ssl"])
def test_mmpareto_takes_its_unimodal_gradient_from_the_chosen_loss(mmpareto_runs, source):
    """g_uni is the gradient of the branch's ITC half (itc) or of its weighted feature-space
    loss (ssl): the unimodal head, which only that loss reaches, shows which one; and the
    step's gradient is the Pareto combination of g_uni and the rest."""
    from albef_bal.balance import mmpareto_combine_with_stats
    r = torch.load(mmpareto_runs / source / "grads.pt", weights_only=False)
    assert r["records"]
    for rec in r["records"]:
        for b, head in (("vision", "uni_image_head."), ("text", "uni_text_head.")):
            names = r["branches"][b]
            heads = [n for n in names if n.startswith(head)]
            assert heads
            for n in heads:
                if source == "ssl":  # only the unimodal loss reaches the head: g_uni is all of it
                    torch.testing.assert_close(rec["uni"][n], rec["before"][n], rtol=1e-5, atol=1e-8)
                    assert rec["before"][n].abs().sum() > 0
                else:  # the ITC half does not reach the head
                    assert rec["uni"][n].abs().sum() == 0 and rec["before"][n].abs().sum() > 0
            g_uni = [rec["uni"][n].double() for n in names]
            g_mm = [rec["before"][n].double() - u for n, u in zip(names, g_uni)]
            want, _ = mmpareto_combine_with_stats(g_mm, g_uni, gamma=1.5, rescale="tensor")
            for n, w in zip(names, want):
                torch.testing.assert_close(rec["after"][n].double(), w, rtol=1e-4,
                                           atol=1e-6 * float(w.abs().max()) + 1e-9)


def test_gblend_blends_the_chosen_unimodal_losses():
    from albef_bal.balance.common import PairSet, measure_losses
    from albef_bal.balance.gblend import GBlendHooks
    cfg = config("simsiam", "mlm", "model.loss_weights.uni_image=0.5", "model.loss_weights.uni_text=2.0")
    torch.manual_seed(0)
    model = ALBEF(cfg.model).eval()
    images, ids, mask = batch()
    out = model(images, ids, mask, update=False)
    lw = cfg.model.loss_weights
    h = GBlendHooks()
    h.weights = dict(itc=lw.itc, itm=lw.itm, mlm=lw.mlm, uni_image=lw.uni_image, uni_text=lw.uni_text)
    h.gcfg = cfg.balance.gblend
    h.w = h._normalise([1.0, 1.0, 1.0])
    for source in ("itc", "ssl"):  # equal weights: the trainer's own total either way
        h.unimodal_loss = source
        torch.testing.assert_close(h.loss(out, None), out.total(**h.weights))
    h.w = h._normalise([3.0, 0.0, 0.0])
    h.unimodal_loss = "itc"  # the unimodal feature-space losses stay in, unblended
    torch.testing.assert_close(h.loss(out, None), 1.5 * out.loss_i2t + 0.5 * out.loss_uni_image
                               + 2.0 * out.loss_uni_text)
    h.unimodal_loss = "ssl"
    torch.testing.assert_close(h.loss(out, None), 3 * 0.5 * out.loss_uni_image)
    h.w = h._normalise([0.0, 0.0, 3.0])
    torch.testing.assert_close(h.loss(out, None), 3 * (out.loss_itc + out.loss_itm + out.loss_mlm))
    # held-out measurements: [image SSL, text SSL, ITC + ITM + MLM] (unweighted)
    pairs = PairSet(images, ids, mask)
    m = measure_losses(model, pairs, 8, 0.0, seed=3, unimodal="ssl")
    torch.manual_seed(3)
    ref = model(images, ids, mask, alpha=0.0, update=False)
    expected = [ref.loss_uni_image, ref.loss_uni_text, ref.loss_itc + ref.loss_itm + ref.loss_mlm]
    torch.testing.assert_close(m.float(), torch.stack(expected).float().detach(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- presets
def test_init_scale_presets_change_only_their_encoders_init_std():
    """configs/init_scale/ (the equal-compute reference of meta-init): each preset halves or
    doubles one encoder's init_std on top of the study config and is a study arm by name."""
    from albef_bal import study
    from albef_bal.config import load_config
    root = os.path.dirname(HERE)
    base = load_config(os.path.join(root, "configs", "study", "tiny.yaml")).model
    for enc in ("vision", "text"):
        for name, factor in (("half", 0.5), ("double", 2.0)):
            path = study.method_config(f"init_scale/{enc}_{name}")
            model = load_config([os.path.join(root, "configs", "study", "tiny.yaml"), path]).model
            other = "text" if enc == "vision" else "vision"
            assert getattr(model, enc).init_std == pytest.approx(factor * getattr(base, enc).init_std), path
            assert getattr(model, other).init_std == getattr(base, other).init_std, path


def test_presets_load_on_top_of_the_study_config_and_the_study_finds_them():
    import glob
    from albef_bal import study
    from albef_bal.config import load_config
    root = os.path.dirname(HERE)
    presets = sorted(glob.glob(os.path.join(root, "configs", "unimodal", "*.yaml")))
    assert {os.path.basename(p) for p in presets} >= {"image_simsiam.yaml", "image_simclr.yaml", "text_mlm.yaml",
                                                      "text_simcse.yaml", "both.yaml"}
    study_cfg = os.path.join(root, "configs", "study", "tiny.yaml")
    for path in presets:
        cfg = load_config([study_cfg, path])
        assert cfg.model.unimodal.enabled, path
        name = os.path.basename(path)[:-5]
        assert os.path.samefile(study.method_config(f"unimodal/{name}"), path)  # a study arm: --methods unimodal/NAME
    both = load_config([study_cfg, os.path.join(root, "configs", "unimodal", "both.yaml")])
    assert (both.model.unimodal.image, both.model.unimodal.text) == ("simsiam", "mlm")
    ssl = load_config([study_cfg, study.method_config("mmpareto_ssl")])
    assert ssl.balance.method == "mmpareto" and ssl.balance.unimodal_loss == "ssl"
    meta = load_config([study_cfg, os.path.join(root, "configs", "meta_init", "tiny.yaml")])
    from albef_bal.meta_init import compute_accounting
    assert compute_accounting(meta, world_size=2)["pretrain_step_equivalents"] == 100
    with pytest.raises(FileNotFoundError, match="config of method 'byol' not found"):
        study.method_config("byol")
