import copy

import pytest
import torch

from albef_bal.models import ALBEF, resize_pos_embed
from tiny import tiny_batch, tiny_config


def build(*overrides, seed=0):
    torch.manual_seed(seed)
    return ALBEF(tiny_config(*overrides).model)


def grads_of(module):
    return [p.grad for p in module.parameters() if p.requires_grad]


def nonzero(grads):
    return any(g is not None and g.abs().sum() > 0 for g in grads)


def text_branch_params(model):
    t = model.text_encoder
    return list(t.embeddings.parameters()) + [p for layer in t.encoder.layer[:t.fusion_layer]
                                              for p in layer.parameters()]


def test_feature_api_shapes_with_different_vision_and_text_widths():
    model = build().eval()
    cfg = model.cfg
    images, ids, mask = tiny_batch(tiny_config())
    img_tokens = model.encode_image(images)
    assert img_tokens.shape == (4, 1 + (32 // 8) ** 2, 64)  # vision width 64
    txt_tokens = model.encode_text(ids, mask)
    assert txt_tokens.shape == (4, 10, 48)  # text width 48
    for feat in (model.image_feat(img_tokens), model.text_feat(txt_tokens)):
        assert feat.shape == (4, cfg.embed_dim)
        assert torch.allclose(feat.norm(dim=-1), torch.ones(4), atol=1e-5)
    fused = model.fuse(txt_tokens, mask, img_tokens)
    assert fused.shape == (4, 10, 48)
    assert model.itm_head(fused[:, 0]).shape == (4, 2)
    assert model.mlm_head(fused).shape == (4, 10, cfg.text.vocab_size)


def test_mlm_decoder_is_tied_to_word_embeddings():
    model = build()
    names = dict(model.named_parameters())
    assert not any("decoder" in n for n in names)  # stored once, in the embeddings
    hidden = torch.randn(2, 48)
    with torch.no_grad():
        model.text_encoder.embeddings.word_embeddings.weight[5] += 1.0
    h = model.mlm_head.transform(hidden)
    expected = h @ model.text_encoder.embeddings.word_embeddings.weight.T + model.mlm_head.bias
    assert torch.allclose(model.mlm_head(hidden), expected, atol=1e-6)


def test_forward_returns_every_loss_and_trains_all_online_weights():
    model = build()
    images, ids, mask = tiny_batch(tiny_config())
    out = model(images, ids, mask, alpha=0.4)
    for name in ("loss_itc", "loss_i2t", "loss_t2i", "loss_itm", "loss_mlm"):
        v = getattr(out, name)
        assert v.ndim == 0 and torch.isfinite(v), name
    assert torch.allclose(out.loss_itc, (out.loss_i2t + out.loss_t2i) / 2)
    assert 0 < out.score_v < 1 and 0 < out.score_t < 1
    out.total().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_itc_halves_train_one_branch_each():
    model = build()
    images, ids, mask = tiny_batch(tiny_config())
    out = model(images, ids, mask, alpha=0.4)
    vision = list(model.visual_encoder.parameters())
    text = text_branch_params(model)
    g_i2t = torch.autograd.grad(out.loss_i2t, vision + text, retain_graph=True, allow_unused=True)
    assert nonzero(g_i2t[:len(vision)])
    assert all(g is None or g.abs().sum() == 0 for g in g_i2t[len(vision):])
    g_t2i = torch.autograd.grad(out.loss_t2i, vision + text, retain_graph=True, allow_unused=True)
    assert nonzero(g_t2i[len(vision):])
    assert all(g is None or g.abs().sum() == 0 for g in g_t2i[:len(vision)])
    # the multimodal losses reach both branches through the fusion layers
    g_mm = torch.autograd.grad(out.multimodal(), vision + text, allow_unused=True)
    assert nonzero(g_mm[:len(vision)]) and nonzero(g_mm[len(vision):])


def test_momentum_update_is_the_ema_and_happens_once_per_forward():
    model = build()
    with torch.no_grad():
        for p in model.visual_encoder.parameters():
            p.add_(0.5)
    before = [p.clone() for p in model.visual_encoder_m.parameters()]
    online = [p.clone() for p in model.visual_encoder.parameters()]
    images, ids, mask = tiny_batch(tiny_config())
    model(images, ids, mask)
    m = model.cfg.momentum
    for b, o, after in zip(before, online, model.visual_encoder_m.parameters()):
        assert torch.allclose(after, m * b + (1 - m) * o, atol=1e-6)
    assert all(not p.requires_grad for p in model.visual_encoder_m.parameters())


def test_queue_holds_momentum_features_and_wraps_around():
    model = build("model.queue_size=8")
    cfg = tiny_config()
    feats = []
    for step in range(3):
        images, ids, mask = tiny_batch(cfg, seed=step)
        with torch.no_grad():
            model(images, ids, mask)
            # the momentum features this step enqueued (momentum weights are now updated)
            f = torch.nn.functional.normalize(model.vision_proj_m(model.visual_encoder_m(images)[:, 0]), dim=-1)
        feats.append(f)
        assert int(model.queue_ptr) == (step + 1) * 4 % 8
    # after 3 batches of 4 in a queue of 8: slots 0-3 hold step 2, slots 4-7 step 1
    assert torch.allclose(model.image_queue[:, :4].T, feats[2], atol=1e-5)
    assert torch.allclose(model.image_queue[:, 4:].T, feats[1], atol=1e-5)


def test_queue_size_must_divide_by_the_global_batch():
    model = build("model.queue_size=6")
    images, ids, mask = tiny_batch(tiny_config())
    with pytest.raises(ValueError, match=r"model.queue_size \(6\) must be a multiple"):
        model(images, ids, mask)


def test_update_false_leaves_momentum_and_queues_alone():
    model = build()
    state = copy.deepcopy(model.state_dict())
    images, ids, mask = tiny_batch(tiny_config())
    model(images, ids, mask, update=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_retrieval_model_uses_image_ids():
    model = build("model.retrieval=true")
    assert model.mlm_head is None and hasattr(model, "idx_queue")
    images, ids, mask = tiny_batch(tiny_config())
    with pytest.raises(ValueError, match="image ids"):
        model(images, ids, mask)
    idx = torch.tensor([3, 3, 9, 4])
    out = model(images, ids, mask, alpha=0.4, idx=idx)
    assert out.loss_mlm is None and torch.isfinite(out.total())
    assert model.idx_queue[0, :4].tolist() == [3, 3, 9, 4]


def test_batch_of_one_has_no_itm_negatives_but_trains():
    model = build("model.queue_size=8")
    images, ids, mask = tiny_batch(tiny_config(), batch=1)
    out = model(images, ids, mask)
    assert out.loss_itm.item() == 0.0
    out.total().backward()
    assert torch.isfinite(out.total())


def test_branch_hook_sees_both_branches_and_can_scale_gradients():
    model = build()
    images, ids, mask = tiny_batch(tiny_config())
    seen = []

    def hook(branch, x):
        seen.append((branch, tuple(x.shape)))
        return x

    model.branch_hook = hook
    model(images, ids, mask)
    assert ("vision", (4, 17, 64)) in seen
    assert ("text", (8, 10, 48)) in seen  # text and masked text in one pass


def test_position_embedding_resize_keeps_cls_and_interpolates():
    pe = torch.randn(1, 1 + 16, 8)
    out = resize_pos_embed(pe, 64)
    assert out.shape == (1, 65, 8)
    assert torch.equal(out[:, 0], pe[:, 0])
    assert torch.equal(resize_pos_embed(pe, 16), pe)
    # a constant grid stays constant under bicubic interpolation
    const = torch.cat([pe[:, :1], torch.ones(1, 16, 8)], dim=1)
    assert torch.allclose(resize_pos_embed(const, 36)[:, 1:], torch.ones(1, 36, 8), atol=1e-5)


def test_vit_runs_at_another_resolution():
    model = build().eval()
    tokens = model.encode_image(torch.randn(2, 3, 48, 48))
    assert tokens.shape == (2, 1 + 36, 64)


def test_gradient_checkpointing_gives_the_same_gradients():
    images, ids, mask = tiny_batch(tiny_config())
    results = []
    for ckpt in (False, True):
        model = build(f"model.grad_checkpointing={str(ckpt).lower()}", "model.text.dropout=0.0")
        torch.manual_seed(5)
        out = model(images, ids, mask, alpha=0.4)
        out.total().backward()
        results.append((out.total().detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=1e-6)


def test_distill_off_uses_one_hot_targets():
    model = build("model.distill=false", "model.text.dropout=0.0").eval()
    images, ids, mask = tiny_batch(tiny_config())
    out = model(images, ids, mask, alpha=0.4, update=False)
    img = model.image_feat(model.encode_image(images))
    txt_m = torch.nn.functional.normalize(model.text_proj_m(model.text_encoder_m.forward_text(ids, mask)[:, 0]), dim=-1)
    logits = img @ torch.cat([txt_m.T, model.text_queue], dim=1) / model.temp
    expected = torch.nn.functional.cross_entropy(logits, torch.arange(4))
    assert torch.allclose(out.loss_i2t, expected, atol=1e-5)


def test_fusion_with_image_index_equals_fusion_on_gathered_images():
    model = build("model.text.dropout=0.0").eval()
    images, ids, mask = tiny_batch(tiny_config())
    img = model.encode_image(images)
    txt = model.encode_text(ids, mask)
    index = torch.tensor([0, 2, 2, 1])
    shared = model.fuse(txt, mask, img, image_index=index)
    gathered = model.fuse(txt, mask, img[index])
    assert torch.allclose(shared, gathered, atol=1e-6)


def test_train_switches_keep_parameter_names():
    from albef_bal.models.albef import prepare_for_training
    cfg = tiny_config("model.grad_checkpointing=true", "train.compile=true")
    torch.manual_seed(0)
    model = ALBEF(cfg.model)
    names = list(model.state_dict())
    prepare_for_training(model, cfg.train)  # compile is lazy: nothing is compiled until a forward
    assert model.visual_encoder.grad_checkpointing and model.text_encoder.grad_checkpointing
    assert list(model.state_dict()) == names


# ------------------------------------------------- online-only inputs (data-side balancing)
def _forward_recording(model, images, ids, mask, **kw):
    """Forward with seed 7; returns the output and the inputs each encoder received."""
    seen = {}

    def spy(name):
        def hook(module, args):
            seen.setdefault(name, []).append(args[0].detach().clone())
        return hook

    handles = [model.visual_encoder.patch_embed.register_forward_pre_hook(spy("vision")),
               model.visual_encoder_m.patch_embed.register_forward_pre_hook(spy("vision_m")),
               model.text_encoder.embeddings.register_forward_pre_hook(spy("text")),
               model.text_encoder_m.embeddings.register_forward_pre_hook(spy("text_m"))]
    torch.manual_seed(7)
    out = model(images, ids, mask, alpha=0.4, **kw)
    for h in handles:
        h.remove()
    return out, seen


def test_online_inputs_reach_the_online_encoders_only():
    cfg = tiny_config("model.text.dropout=0.0")
    images, ids, mask = tiny_batch(cfg)
    torch.manual_seed(0)
    model = ALBEF(cfg.model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    clean, seen_clean = _forward_recording(model, images, ids, mask)
    queues = (model.image_queue.clone(), model.text_queue.clone())

    weak_images = images.flip(-1)
    weak_ids = ids.clone()
    weak_ids[:, 2:4] = cfg.model.text.mask_token_id
    model.load_state_dict(state)
    weak, seen = _forward_recording(model, images, ids, mask, online={"image": weak_images, "input_ids": weak_ids})
    # the online encoders saw the weakened inputs (text: [weakened ; weakened then MLM-masked])
    assert torch.equal(seen["vision"][0], weak_images)
    assert torch.equal(seen["text"][0][:4], weak_ids)
    assert (seen["text"][0][4:, 2:4] == cfg.model.text.mask_token_id).all()
    # the momentum encoders (targets, queues, MLM distillation) saw exactly the clean batch
    for key in ("vision_m", "text_m"):
        assert len(seen[key]) == len(seen_clean[key])
        for a, b in zip(seen[key], seen_clean[key]):
            assert torch.equal(a, b), key
    assert torch.equal(model.image_queue, queues[0]) and torch.equal(model.text_queue, queues[1])
    assert not torch.equal(weak.loss_i2t, clean.loss_i2t) and not torch.equal(weak.loss_t2i, clean.loss_t2i)
    # online inputs equal to the clean ones change nothing, to the bit
    model.load_state_dict(state)
    same, _ = _forward_recording(model, images, ids, mask, online={"image": images.clone(), "input_ids": ids.clone(),
                                                                   "attention_mask": mask.clone()})
    for name in ("loss_i2t", "loss_t2i", "loss_itm", "loss_mlm"):
        assert torch.equal(getattr(same, name), getattr(clean, name)), name


def test_patch_keep_runs_the_online_vit_on_the_kept_tokens():
    cfg = tiny_config("model.text.dropout=0.0")
    images, ids, mask = tiny_batch(cfg)
    torch.manual_seed(0)
    model = ALBEF(cfg.model).eval()
    vit = model.visual_encoder
    patches = (cfg.model.image_res // cfg.model.vision.patch_size) ** 2
    full = vit.forward_features(images)
    all_kept = vit.forward_features(images, torch.arange(patches).expand(4, -1))
    assert torch.equal(all_kept, full)  # keeping every patch in order is the plain forward
    keep = torch.stack([torch.randperm(patches, generator=torch.Generator().manual_seed(i))[:5] for i in range(4)])
    part = vit.forward_features(images, keep)
    assert part.shape == (4, 1 + 5, cfg.model.vision.width)
    # a depth-0 view of the same thing: the kept tokens carry their own position embeddings
    x = vit.patch_embed(images) + vit.pos_embed[:, 1:]
    torch.testing.assert_close(torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1])),
                               _tokens_before_blocks(vit, images, keep)[:, 1:])
    out = model(images, ids, mask, update=False, online={"patch_keep": keep})
    assert torch.isfinite(out.total())
    with pytest.raises(ValueError, match=r"online patch_keep must be \[B=4, K\]"):
        model(images, ids, mask, update=False, online={"patch_keep": keep[0]})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['images'\]"):
        model(images, ids, mask, update=False, online={"images": images})


def _tokens_before_blocks(vit, images, keep):
    blocks, vit.blocks = vit.blocks, torch.nn.ModuleList()
    norm, vit.norm = vit.norm, torch.nn.Identity()
    try:
        return vit.forward_features(images, keep)
    finally:
        vit.blocks, vit.norm = blocks, norm


def _losses_and_grads(cfg, state, images, ids, mask):
    model = ALBEF(cfg.model)
    model.load_state_dict(state)
    torch.manual_seed(5)  # the MLM masks and hard negatives
    out = model(images, ids, mask, alpha=0.4)
    out.total().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_packed_text_layers_compute_what_the_padded_ones_do():
    """``model.text.pack``: the per-token work on the real tokens only gives the same losses
    and gradients (dropout off), and the text encoder the same real-token states."""
    cfg = tiny_config("model.text.dropout=0.0")
    packed_cfg = tiny_config("model.text.dropout=0.0", "model.text.pack=true")
    torch.manual_seed(0)
    state = ALBEF(cfg.model).state_dict()
    images, ids, mask = tiny_batch(cfg, batch=8, length=12)
    for i, n in enumerate((12, 4, 9, 7, 12, 6, 5, 10)):  # captions of several lengths
        mask[i, n:] = 0
        ids[i, n:] = cfg.model.text.pad_token_id
        ids[i, n - 1] = cfg.model.text.sep_token_id
    out, grads = _losses_and_grads(cfg, state, images, ids, mask)
    out_p, grads_p = _losses_and_grads(packed_cfg, state, images, ids, mask)
    for k in ("loss_itc", "loss_itm", "loss_mlm"):
        assert torch.allclose(getattr(out, k), getattr(out_p, k), rtol=1e-5, atol=1e-6), k
    assert grads.keys() == grads_p.keys()
    for n in grads:
        assert torch.allclose(grads[n], grads_p[n], rtol=1e-4, atol=1e-6), n
    enc = ALBEF(packed_cfg.model).text_encoder.eval()
    with torch.no_grad():
        packed_states = enc.forward_text(ids, mask)
        enc.config.pack = False
        padded_states = enc.forward_text(ids, mask)
    real = mask.bool()
    assert torch.allclose(packed_states[real], padded_states[real], atol=1e-5)
    assert packed_states[~real].abs().max() == 0  # padded positions are zeros, not computed
