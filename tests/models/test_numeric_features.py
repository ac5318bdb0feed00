"""Numeric side features in the model (issue 14): a numeric feature's embedding is its normalised value times a
learned vector, read through the role tables like a categorical one (an item-level one joins [item; category],
a behaviour-level one is a score bias of a learned scalar times the value and, in the representation, a token
field); DARE reads it from both table sets and TWIN from one; a model that needs the value learns only with it;
prepare -> train -> score runs end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from darec.checkpoint import load_checkpoint, load_model_checkpoint
from darec.cli import main
from darec.data.batch import Batch
from darec.data.loader import BatchLoader, feature_fields
from darec.data.pipeline import prepare
from darec.data.protocol import ProtocolConfig
from darec.data.schema import load_schema
from darec.data.store import PreparedDataset
from darec.errors import ConfigError
from darec.models import PRESETS, build_model, preset_config
from darec.models.config import FeatureField, ModelConfig
from darec.models.search import DotScore
from darec.serve.history import History
from darec.serve.scorer import Scorer
from darec.train.config import TrainConfig
from darec.train.trainer import train

COLUMNS = {"user": "uid", "item": "iid", "category": "cid", "timestamp": "ts"}
PROTOCOL = ProtocolConfig(targets="dense", min_clicks=20, max_len=20)
# price: a property of the item (target: true); dwell: of the behaviour, in the score and the tokens
SCHEMA = """
numeric:
  - {name: price, column: price, target: true}
  - {name: dwell, column: dwell}
time: {enter: representation}
"""
PRICE = FeatureField("price", 1, "item", numeric=True)
DWELL = FeatureField("dwell", 1, "context", "both", numeric=True)


def write_price_log(path: Path, *, n_users: int = 80, n_events: int = 40, n_items: int = 3000, seed: int = 0) -> Path:
    """A log where clicks depend only on the price: even users click only items under 50, odd users only items
    from 50 on. Items are many and rarely repeated and their categories (item % 7) carry no preference, so a
    model that sees ids and categories only cannot tell a user's next click from a negative; the dwell time is
    noise."""
    rng = np.random.default_rng(seed)
    price = rng.uniform(1, 100, n_items).round(2)
    cheap, dear = np.flatnonzero(price < 50), np.flatnonzero(price >= 50)
    likes_dear = (np.arange(n_users) % 2 == 1)[:, None]
    items = np.where(likes_dear, rng.choice(dear, (n_users, n_events)), rng.choice(cheap, (n_users, n_events)))
    pl.DataFrame({"uid": np.repeat(np.arange(n_users), n_events), "iid": items.reshape(-1),
                  "cid": items.reshape(-1) % 7, "ts": np.tile(np.arange(n_events) * 60, n_users),
                  "price": price[items.reshape(-1)], "dwell": rng.exponential(30, n_users * n_events).round(1),
                  }).write_csv(path)
    return path


def prepare_price(tmp: Path, schema_text: str | None, name: str = "ds") -> PreparedDataset:
    log = tmp / "log.csv"
    if not log.exists():
        write_price_log(log)
    schema = None
    if schema_text is not None:
        (tmp / f"{name}.yaml").write_text(schema_text)
        schema = load_schema(tmp / f"{name}.yaml")
    return prepare(source="generic", input=log, out=tmp / name, columns=COLUMNS, config=PROTOCOL, schema=schema)


@pytest.fixture(scope="module")
def price_ds(tmp_path_factory) -> PreparedDataset:
    return prepare_price(tmp_path_factory.mktemp("price"), SCHEMA)


def test_feature_fields_read_numeric_features(price_ds):
    assert {f.name: f for f in feature_fields(price_ds)} == {"price": PRICE, "dwell": DWELL}
    assert feature_fields(price_ds, ("price",)) == (PRICE,)
    assert feature_fields(price_ds, "none") == ()
    with pytest.raises(ConfigError, match="unknown feature 'weight'"):
        feature_fields(price_ds, ("weight",))
    with pytest.raises(ConfigError, match="numeric feature 'price'"):
        ModelConfig(n_items=5, n_categories=3, features=(FeatureField("price", 4, "item", numeric=True),))


def _hand_embeddings(tables: str = "decoupled"):
    config = ModelConfig(n_items=6, n_categories=4, max_len=5, dim=2, tables=tables, features=(PRICE, DWELL))
    torch.manual_seed(0)
    return build_model(config).embeddings


def _hand_batch() -> Batch:
    return Batch(hist_items=torch.tensor([[0, 3, 5]]), hist_categories=torch.tensor([[0, 1, 2]]),
                 hist_positions=torch.tensor([[3, 2, 1]]), mask=torch.tensor([[False, True, True]]),
                 target_item=torch.tensor([4]), target_category=torch.tensor([3]), label=torch.ones(1),
                 user=torch.zeros(1, dtype=torch.long),
                 hist_features={"price": torch.tensor([[0.0, -1.5, 0.25]]), "dwell": torch.tensor([[0.0, 2.0, -0.5]])},
                 target_features={"price": torch.tensor([0.75])})


def test_numeric_embedding_by_hand():
    """Tokens [item; category; price; position; dwell] hold value x vector; the target's dwell field is 0 (value
    0); the score is <[item; category; x_t v_price]_q, [...; x_h v_price]_k> / sqrt(3 d_A) + position bias
    + x_dwell <T_q[1], T_k[0]> / sqrt(d_A)."""
    emb = _hand_embeddings()
    batch = _hand_batch()
    att, rep = emb.sets["attention"], emb.sets["representation"]
    w = {name: rep.table(name).weight.detach() for name in ("item", "category", "price", "position", "dwell")}
    a = {name: att.table(name).weight.detach() for name in ("item", "category", "price", "position", "dwell")}
    assert a["dwell"].shape == (2, 2) and w["dwell"].shape == (1, 2) and a["price"].shape == w["price"].shape == (1, 2)
    price, dwell = batch.hist_features["price"][0], batch.hist_features["dwell"][0]
    values = emb.values(batch.hist_items, batch.hist_categories, batch.hist_positions, batch.hist_features).detach()[0]
    for slot in range(3):
        expected = torch.cat([w["item"][batch.hist_items[0, slot]], w["category"][batch.hist_categories[0, slot]],
                              price[slot] * w["price"][0], w["position"][batch.hist_positions[0, slot]],
                              dwell[slot] * w["dwell"][0]])
        torch.testing.assert_close(values[slot], expected, rtol=0, atol=1e-7)
    target = emb.target(batch.target_item, batch.target_category, batch.target_features).detach()[0]
    torch.testing.assert_close(target, torch.cat([w["item"][4], w["category"][3], 0.75 * w["price"][0],
                                                  w["position"][0], torch.zeros(2)]), rtol=0, atol=1e-7)
    scores = DotScore()(emb, batch).detach()[0]
    slope = float(a["dwell"][1] @ a["dwell"][0]) / math.sqrt(2)
    for slot in range(3):
        query = torch.cat([a["item"][4], a["category"][3], 0.75 * a["price"][0]])
        key = torch.cat([a["item"][batch.hist_items[0, slot]], a["category"][batch.hist_categories[0, slot]],
                         price[slot] * a["price"][0]])
        position = float(a["position"][0] @ a["position"][batch.hist_positions[0, slot]]) / math.sqrt(2)
        expected = float(query @ key) / math.sqrt(6) + position + float(dwell[slot]) * slope
        assert scores[slot].item() == pytest.approx(expected, abs=1e-6)
    assert emb.context_bias("dwell").shape == (1,) and emb.context_bias("dwell").item() == pytest.approx(slope)
    assert emb.context_bias("price") is None


def _gradient_rows(emb, part: str) -> dict[str, dict[str, list[int]]]:
    """Per set and numeric feature, the table rows that get a non-zero gradient from the search score alone
    or from the representation tokens (history and target) alone."""
    batch = _hand_batch()
    emb.zero_grad()
    if part == "score":
        DotScore()(emb, batch).sum().backward()
    else:
        (emb.values(batch.hist_items, batch.hist_categories, batch.hist_positions, batch.hist_features).sum()
         + emb.target(batch.target_item, batch.target_category, batch.target_features).sum()).backward()
    return {name: {f: [] if t.weight.grad is None else t.weight.grad.abs().sum(1).nonzero().flatten().tolist()
                   for f, t in s.features.items()} for name, s in emb.sets.items()}


def test_dare_reads_both_sets_and_twin_one():
    """DARE: the score's gradient reaches the attention set's price vector and dwell rows (value vector, target
    query) only, the tokens' the representation set's vectors only. TWIN: one set takes both."""
    dare = _hand_embeddings("decoupled")
    assert _gradient_rows(dare, "score") == {"attention": {"price": [0], "dwell": [0, 1]},
                                             "representation": {"price": [], "dwell": []}}
    assert _gradient_rows(dare, "tokens") == {"attention": {"price": [], "dwell": []},
                                              "representation": {"price": [0], "dwell": [0]}}
    twin = _hand_embeddings("shared")
    assert _gradient_rows(twin, "score") == {"shared": {"price": [0], "dwell": [0, 1]}}
    assert _gradient_rows(twin, "tokens") == {"shared": {"price": [0], "dwell": [0]}}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_trains_on_numeric_features(price_ds, preset):
    config = preset_config(preset, n_items=price_ds.n_items, n_categories=price_ds.n_categories, dim=4,
                           max_len=PROTOCOL.max_len, features=feature_fields(price_ds))
    torch.manual_seed(0)
    model = build_model(config).train()
    batch = next(iter(BatchLoader(price_ds, "train", batch_size=24, group_sets=model.uses_candidate_sets)))
    out = model(batch)
    assert out.features.shape[1] == config.head_dim and torch.isfinite(out.logit).all()
    (out.logit.sum() + (out.aux_logit.sum() if out.aux_logit is not None else 0)).backward()
    assert any(s.features["price"].weight.grad is not None for s in model.embeddings.sets.values())


@pytest.mark.parametrize("preset", ["dare", "twin", "twin_hard", "eta", "sdim", "ifa_no_set", "twin_4e"])
def test_scorer_equals_training_forward_with_numeric_features(price_ds, preset):
    """The Scorer takes candidates' prices from the dataset's item table and history values from `History`."""
    config = preset_config(preset, n_items=price_ds.n_items, n_categories=price_ds.n_categories, dim=4,
                           max_len=PROTOCOL.max_len, features=feature_fields(price_ds), init_std=0.2)
    torch.manual_seed(1)
    model = build_model(config).eval()
    batch = next(iter(BatchLoader(price_ds, "test", batch_size=30)))
    with torch.no_grad():
        expected = model(batch).logit
    history = History(items=batch.hist_items, categories=batch.hist_categories, mask=batch.mask,
                      positions=batch.hist_positions, features=batch.hist_features)
    got = Scorer(model, item_features=price_ds.item_features).logits(history, batch.target_item[:, None],
                                                                      batch.target_category[:, None])[:, 0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _fit(dataset: PreparedDataset, features: str, out: Path) -> float:
    config = TrainConfig(epochs=3, batch_size=128, eval_batch_size=512, model={"dim": 8}, patience=None, threads=1,
                         features=features)
    return train(data=dataset, config=config, out_dir=out, progress=False)["test"]["auc"]


def test_model_needs_the_price_to_learn(price_ds, tmp_path):
    """A model that must fail: clicks depend on the price alone. Without it DARE is at chance; with it (the
    target's price against the history's) it ranks the user's next click clearly above the negatives."""
    without, with_price = _fit(price_ds, "none", tmp_path / "none"), _fit(price_ds, "price", tmp_path / "price")
    assert without < 0.6 and with_price > 0.68 and with_price - without > 0.15, (without, with_price)


def _state_bytes(path: Path) -> dict[str, bytes]:
    return {k: v.numpy().tobytes() for k, v in load_checkpoint(path, keys=("model",))["model"].items()}


def test_featureless_model_unchanged_by_numeric_data(price_ds, tmp_path):
    """The log prepared with numeric features and trained with --features none gives exactly the logits and
    weights of the same log prepared without a schema."""
    plain = prepare_price(price_ds.path.parent, None, "plain")
    config = TrainConfig(epochs=1, batch_size=256, eval_batch_size=512, model={"dim": 4}, patience=None, threads=1)
    train(data=price_ds, config=config.replace(features="none"), out_dir=tmp_path / "a", progress=False)
    train(data=plain, config=config, out_dir=tmp_path / "b", progress=False)
    assert (tmp_path / "a/test_logits.npy").read_bytes() == (tmp_path / "b/test_logits.npy").read_bytes()
    assert _state_bytes(tmp_path / "a/best.pt") == _state_bytes(tmp_path / "b/best.pt")


def test_prepare_train_score_with_numeric_columns(tmp_path, capsys):
    """CLI end to end; `darec score` gives the model's probabilities for the user's whole history with its
    prices and dwell times, and the candidates' prices from the item table."""
    write_price_log(tmp_path / "log.csv", n_users=30, n_items=400)
    (tmp_path / "s.yaml").write_text(SCHEMA)
    columns = ",".join(f"{k}={v}" for k, v in COLUMNS.items())
    assert main(["prepare", "--source", "generic", "--input", str(tmp_path / "log.csv"), "--columns", columns,
                 "--schema", str(tmp_path / "s.yaml"), "--targets", "dense", "--min-clicks", "20", "--max-len", "20",
                 "--out", str(tmp_path / "ds")]) == 0
    assert main(["train", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "run"), "--dim", "4",
                 "--epochs", "1", "--batch-size", "128", "--features", "price,dwell", "--no-progress"]) == 0
    result = json.loads((tmp_path / "run/result.json").read_text())
    features = result["model_config"]["features"]
    assert [(f["name"], f["numeric"]) for f in features] == [("price", True), ("dwell", True)]  # as named
    capsys.readouterr()
    assert main(["score", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "ds"), "--user", "3",
                 "--candidates", "5", "7", "11", "--json", str(tmp_path / "s.json")]) == 0
    ranking = json.loads((tmp_path / "s.json").read_text())["ranking"]
    assert sorted(r["item"] for r in ranking) == [5, 7, 11]

    ds = PreparedDataset.open(tmp_path / "ds")
    ids = ds.id_maps()
    user = int(np.asarray(ids.encode("user", pl.Series([3])))[0])
    items = torch.from_numpy(np.asarray(ids.encode("item", pl.Series([r["item"] for r in ranking]))).astype(np.int64))
    seq = slice(int(ds.offsets[user]), int(ds.offsets[user + 1]))
    length, b = min(20, seq.stop - seq.start), len(items)

    def last(values: np.ndarray) -> torch.Tensor:  # the user's last `length` behaviours, one row per candidate
        return torch.from_numpy(np.array(values[seq][-length:])).expand(b, -1)

    batch = Batch(hist_items=last(ds.items).long(), hist_categories=last(ds.categories).long(),
                  hist_positions=torch.arange(length, 0, -1).expand(b, -1), mask=torch.ones(b, length).bool(),
                  target_item=items, target_category=torch.from_numpy(np.asarray(ds.item_categories)[items]).long(),
                  label=torch.zeros(b), user=torch.full((b,), user),
                  hist_features={n: last(ds.event_features[n]) for n in ("price", "dwell")},
                  target_features={"price": torch.from_numpy(np.asarray(ds.item_features["price"])[items])})
    model = load_model_checkpoint(tmp_path / "run/best.pt", device="cpu").eval()
    with torch.no_grad():
        expected = torch.sigmoid(model(batch).logit)
    np.testing.assert_allclose([r["probability"] for r in ranking], expected.numpy(), rtol=1e-5, atol=1e-7)
