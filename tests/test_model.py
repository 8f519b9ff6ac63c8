import pytest
import torch

from mtkit import objectives
from mtkit.config import ModelConfig, TaskConfig
from mtkit.data.dataset import collate
from mtkit.model import DECODERS, MultiTaskModel
from mtkit.model.encoder import Encoder

TINY = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}


def tiny_encoder(pooling="mean", seed=0):
    torch.manual_seed(seed)
    return Encoder(ModelConfig(random_init=True, arch=TINY, pooling=pooling))


def tasks():
    return [TaskConfig(name="sst", kind="classification", num_labels=5, dropout=0.0),
            TaskConfig(name="quora", kind="pair_classification", num_labels=2, decoder="sbert", dropout=0.0),
            TaskConfig(name="sts", kind="pair_regression", label_range=[0, 5], decoder="cosine")]


def batch(n_texts, b=4, length=7, labels=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    toks = [tuple(torch.randint(1000, 2000, (length - i % 3,), generator=g).tolist() for _ in range(n_texts))
            for i in range(b)]
    return collate(toks, labels or [None] * b, 0, torch.long if labels and isinstance(labels[0], int)
                   else torch.float32)


@pytest.mark.parametrize("name,dim", [("concat", 32), ("product", 16), ("sbert", 64), ("cosine", 1)])
def test_decoders(name, dim):
    u, v = torch.randn(3, 16), torch.randn(3, 16)
    d = DECODERS[name]()
    f = d(u, v)
    assert f.shape == (3, dim) == (3, d.dim(16))
    if name == "cosine":
        assert torch.allclose(f[:, 0], torch.nn.functional.cosine_similarity(u, v))
    if name == "sbert":
        assert torch.allclose(f[:, 32:48], (u - v).abs())


@pytest.mark.parametrize("pooling", ["cls", "mean", "pooler"])
def test_pooling_shapes_and_mean_ignores_padding(pooling):
    enc = tiny_encoder(pooling).eval()
    ids = torch.tensor([[101, 2000, 2001, 102, 0, 0], [101, 2000, 2001, 102, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
    out = enc(ids, mask)
    assert out.shape == (2, 16)
    if pooling == "mean":
        short = enc(ids[:, :4], mask[:, :4])
        assert torch.allclose(out, short, atol=1e-6)


def test_cosine_classification_head_starts_at_threshold_half():
    ts = tasks()
    ts[1].decoder = "cosine"
    head = MultiTaskModel(tiny_encoder(), ts).heads["quora"]
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cos 1 and cos 0
    logits = head(torch.stack([u, v]))
    assert torch.allclose(logits[:, 1] - logits[:, 0], torch.tensor([10.0, -10.0]))


def test_forward_each_kind_and_cosine_head_init():
    model = MultiTaskModel(tiny_encoder(), tasks()).eval()
    assert model.heads["sts"].out.weight.item() == 5.0 and model.heads["sts"].out.bias.item() == 0.0
    assert model("sst", batch(1, labels=[0, 1, 2, 3])).shape == ()
    assert model("quora", batch(2, labels=[0, 1, 0, 1])).shape == ()
    b = batch(2, labels=[1.0, 2.0, 3.0, 4.0])
    emb = model.embed(b)
    pred = model.predict("sts", emb)
    cos = torch.nn.functional.cosine_similarity(emb[0], emb[1])
    assert torch.allclose(pred, 5 * cos, atol=1e-6)


def test_param_groups_cover_every_parameter_once():
    from mtkit.config import Config
    model = MultiTaskModel(tiny_encoder(), tasks())
    cfg = Config(tasks=tasks())
    groups = model.param_groups(cfg)
    names = [g["name"] for g in groups]
    assert names == ["encoder", "encoder.no_decay", "head.sst", "head.quora", "head.sts"]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len([p for p in model.parameters() if p.requires_grad])
    assert groups[1]["weight_decay"] == 0.0 and groups[2]["lr"] == cfg.task("sst").lr


def test_leave_out_task_trains_head_but_not_encoder():
    ts = tasks()
    ts[0].leave_out = True
    model = MultiTaskModel(tiny_encoder(), ts)
    model("sst", batch(1, labels=[0, 1, 2, 3])).backward()
    assert all(p.grad is None for _, p in model.shared_parameters())
    assert all(p.grad is not None for _, p in model.head_parameters("sst"))


def test_frozen_encoder_gets_no_grad_and_no_dropout():
    model = MultiTaskModel(tiny_encoder(), tasks())
    model.freeze_encoder(True)
    model.train()
    assert not model.encoder.training and model.heads["sst"].training
    model("sst", batch(1, labels=[0, 1, 2, 3])).backward()
    assert all(p.grad is None for _, p in model.shared_parameters())


def test_cosent_matches_brute_force():
    torch.manual_seed(0)
    pred, target = torch.randn(6), torch.tensor([0.0, 1.0, 1.0, 3.0, 2.5, 5.0])
    terms = [20 * (pred[j] - pred[i]) for i in range(6) for j in range(6) if target[i] > target[j]]
    expected = torch.log(1 + torch.exp(torch.stack(terms)).sum())
    assert torch.allclose(objectives.cosent(pred, target), expected, atol=1e-5)


def test_cosent_on_a_cosine_head_ranks_the_cosine_at_scale_20():
    ts = tasks()
    ts[2].loss = "cosent"
    model = MultiTaskModel(tiny_encoder(), ts).eval()
    labels = [0.0, 1.0, 1.0, 3.0, 2.5, 5.0]
    b = batch(2, b=6, labels=labels)
    emb = model.embed(b)
    cos = model.heads["sts"].decoder(emb[0], emb[1])[:, 0]                 # the decoder's cosine [B]
    # Su (2022): log(1 + sum over pairs with s_i > s_j of exp(20 (cos_j - cos_i))), written out.
    terms = [20 * (cos[j] - cos[i]) for i in range(6) for j in range(6) if labels[i] > labels[j]]
    expected = torch.log(1 + torch.exp(torch.stack(terms)).sum())
    loss = model("sts", b)
    assert torch.allclose(loss, expected, atol=1e-5)
    # The head's score 5 cos would be CoSENT at scale 100: a different loss.
    assert not torch.allclose(objectives.cosent(model.predict("sts", emb), b["labels"]), expected, atol=1e-2)
    loss.backward()  # the head's scale and shift do not enter the loss; the encoder learns
    assert all(p.grad is None for _, p in model.head_parameters("sts"))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in model.shared_parameters())


def test_cosent_on_other_decoders_ranks_the_head_score():
    ts = tasks()
    ts[2].loss, ts[2].decoder = "cosent", "sbert"
    model = MultiTaskModel(tiny_encoder(), ts).eval()
    b = batch(2, b=6, labels=[0.0, 1.0, 1.0, 3.0, 2.5, 5.0])
    score = model.predict("sts", model.embed(b))
    assert torch.allclose(model("sts", b), objectives.cosent(score, b["labels"]))


def test_info_nce_matches_brute_force():
    torch.manual_seed(0)
    a, p, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    cos = lambda x, y: torch.nn.functional.cosine_similarity(x, y, dim=0)  # noqa: E731
    total = 0.0
    for i in range(4):
        logits = torch.stack([cos(a[i], c) for c in torch.cat([p, n])]) / 0.05
        total += -torch.log_softmax(logits, 0)[i]
    assert torch.allclose(objectives.info_nce(a, p, n, 0.05), total / 4, atol=1e-5)


def test_loading_reports_only_weights_that_matter(tmp_path, caplog, capfd):
    # A pre-training checkpoint: a pooler, which a mean-pooling encoder drops on purpose (not worth a word),
    # and MLM / next-sentence heads, which no encoder uses (reported once, by mtkit's logger). transformers'
    # own load report table stays off the console.
    from transformers import BertConfig, BertForPreTraining, BertModel

    from mtkit.config import BUNDLED_MODEL
    from mtkit.model.encoder import resolve_model_path
    config = BertConfig.from_pretrained(resolve_model_path(BUNDLED_MODEL), hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64)
    BertForPreTraining(config).save_pretrained(tmp_path / "pretraining")
    BertModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "no_pooler")
    for pooling in ("mean", "pooler"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="mtkit.model"):
            Encoder(ModelConfig(name_or_path=str(tmp_path / "pretraining"), pooling=pooling))
        assert "LOAD REPORT" not in capfd.readouterr().err
        (record,) = caplog.records
        assert "checkpoint weights are not used" in record.message and "cls.predictions" in record.message
        assert "pooler" not in record.message
    caplog.clear()
    with caplog.at_level("WARNING", logger="mtkit.model"):
        Encoder(ModelConfig(name_or_path=str(tmp_path / "no_pooler"), pooling="pooler"))
    assert ["no pooler weights" in r.message for r in caplog.records] == [True]
