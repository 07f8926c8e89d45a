"""ITM re-ranking projects each image's cross-attention keys/values once per fusion batch:
the scores equal those of fusing every pair with its own copy of the image tokens."""
import torch

from albef_bal.eval.retrieval import itm_scores
from albef_bal.models import ALBEF
from tiny import tiny_config


def test_rerank_scores_equal_fusing_each_pair_with_its_image():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = ALBEF(cfg.model).eval()
    n, t, length = 7, 11, 9
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        image_tokens = model.encode_image(torch.randn(n, 3, 32, 32, generator=g))
        ids = torch.randint(4, cfg.model.text.vocab_size, (t, length), generator=g)
        mask = torch.ones_like(ids)
        mask[3, 5:] = 0  # a shorter caption
        text_tokens = model.encode_text(ids, mask)
        codes = torch.randperm(n * t, generator=g)[:40].sort().values  # pairs image * T + text
        # small batches and chunks: batches that span several images and chunk borders
        got = itm_scores(model, codes, t, torch.arange(n), image_tokens, text_tokens, mask, torch.device("cpu"),
                         None, rerank_batch=6, image_chunk=3)
        img, txt = codes // t, codes % t
        want = model.itm_logits(model.fuse(text_tokens[txt], mask[txt], image_tokens[img]))[:, 1]
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
