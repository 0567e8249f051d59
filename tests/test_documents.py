"""Packed documents kept apart (data.document_mask): each against running the documents one by one."""
import json

import pytest
import torch

from model.attention import MLA
from model.documents import split_documents
from model.loss import IGNORE_INDEX
from model.rope import RotaryEmbedding
from model.transformer import DeepseekV3
from tests.helpers import YARN, tiny_cfg
from tests.train_helpers import make_corpus, run_args, train

EOS = 0


def test_split_documents_numbers_and_positions():
    ids = torch.tensor([[5, EOS, 6, 7, EOS, 8], [EOS, EOS, 3, 4, 5, 6]])
    docs = split_documents(ids, EOS)
    assert docs.index.tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 2, 2, 2, 2]]
    assert docs.positions.tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 0, 1, 2, 3]]
    mask = docs.attention_mask()[0, 0]
    assert mask[3].tolist() == [False, False, True, True, False, False]   # token 7 sees 6 and itself
    assert mask[5].tolist() == [False] * 5 + [True]


def test_targets_leaving_the_document_are_ignored():
    ids = torch.tensor([[5, EOS, 6, 7, EOS, 8]])
    labels = torch.tensor([[EOS, 6, 7, EOS, 8, 9]])      # labels[:, i] = token i + 1
    docs = split_documents(ids, EOS)
    X = IGNORE_INDEX
    assert docs.keep_targets(labels, 0).tolist() == [[EOS, X, 7, EOS, X, 9]]
    depth1 = torch.cat([labels[:, 1:], torch.full((1, 1), X)], dim=1)   # t_{i+2}
    assert docs.keep_targets(depth1, 1).tolist() == [[X, X, EOS, X, X, X]]


def _packed(doc_lengths, vocab, seed=0):
    """Documents of the given lengths (EOS last), concatenated into one row of input ids."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.cat([torch.randint(1, vocab, (n - 1,), generator=g), torch.tensor([EOS])]) for n in doc_lengths]
    return docs, torch.cat(docs).unsqueeze(0)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_masked_attention_equals_each_document_alone(backend):
    cfg = tiny_cfg(rope_scaling=YARN)
    torch.manual_seed(0)
    attn = MLA(cfg).eval()
    attn.backend = backend
    rotary = RotaryEmbedding(cfg)
    lengths = [5, 1, 9, 4]
    ids = torch.cat([torch.cat([torch.full((n - 1,), 3), torch.tensor([EOS])]) for n in lengths]).unsqueeze(0)
    x = torch.randn(1, ids.shape[1], cfg.hidden_size)
    docs = split_documents(ids, EOS)
    packed = attn(x, rotary(ids.shape[1], x.device, x.dtype, docs.positions), docs.attention_mask())
    alone, lo = [], 0
    for n in lengths:                      # each document as its own sequence, positions from 0, causal
        alone.append(attn(x[:, lo:lo + n], rotary(n, x.device, x.dtype)))
        lo += n
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), rtol=1e-5, atol=1e-6)
    # and the mask matters: without it the later documents see the earlier ones
    assert not torch.allclose(attn(x, rotary(ids.shape[1], x.device, x.dtype)), packed, atol=1e-4)


def test_model_losses_equal_documents_trained_one_by_one():
    """Logits, next-token and MTP losses of a packed row with document masking equal those of each
    document run alone (dropless routing decides per token, so the experts see the same inputs)."""
    cfg = tiny_cfg(num_nextn_predict_layers=2, loss_impl="full")
    torch.manual_seed(0)
    model = DeepseekV3(cfg).eval()
    docs, row = _packed([7, 3, 11, 6], cfg.vocab_size)
    inputs, labels = row[:, :-1], row[:, 1:]          # the last document's EOS is only a label
    model.document_eos_id = EOS
    packed = model(inputs, labels)

    model.document_eos_id = None
    logits, sums = [], torch.zeros(3)
    counts = torch.zeros(3)
    for i, d in enumerate(docs):
        d_in = d.unsqueeze(0) if i < len(docs) - 1 else d[:-1].unsqueeze(0)
        d_lab = torch.cat([d[1:], torch.tensor([IGNORE_INDEX])]).unsqueeze(0)[:, :d_in.shape[1]]
        out = model(d_in, d_lab)
        logits.append(out.logits)
        for depth, loss in enumerate([out.lm_loss, *out.mtp_losses]):
            n = (d_lab[:, depth:] != IGNORE_INDEX).sum()        # depth k's targets in this document
            if n > 0:
                sums[depth] += loss * n
                counts[depth] += n
    torch.testing.assert_close(packed.logits, torch.cat(logits, dim=1), rtol=1e-5, atol=1e-5)
    expected = sums / counts
    got = torch.stack([packed.lm_loss, *packed.mtp_losses])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_row_without_eos_is_unchanged():
    cfg = tiny_cfg(num_nextn_predict_layers=1)
    torch.manual_seed(0)
    model = DeepseekV3(cfg).eval()
    row = torch.randint(1, cfg.vocab_size, (2, 13))
    plain = model(row[:, :-1], row[:, 1:])
    model.document_eos_id = EOS
    masked = model(row[:, :-1], row[:, 1:])
    torch.testing.assert_close(masked.loss, plain.loss, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_training_with_document_mask_changes_only_when_asked(tmp_path):
    """A real short run: the default run's losses do not depend on the new code path; turning the
    option on trains (finite losses) and changes them (each 32-token row holds parts of several documents)."""
    corpus = make_corpus(tmp_path)

    def losses(out, *extra):
        train(run_args(tmp_path, corpus, out, ["train.stop_at=3", "train.max_steps=3", *extra]))
        rows = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    plain = losses("a")
    masked = losses("b", "data.document_mask=true")
    assert len(plain) == len(masked) == 3
    assert all(torch.isfinite(torch.tensor(masked)))
    assert masked != plain
