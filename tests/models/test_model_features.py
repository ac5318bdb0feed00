"""Side features in the model (issue 14, step 3): the paper's model is unchanged bit for bit, the score and
tokens read every feature through the role tables, DARE keeps attention and representation tables apart per
feature, every preset trains on them, the Scorer serves them, and bad selections are one line."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from darec.checkpoint import load_checkpoint
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
from darec.models.embedding import RoleEmbeddings
from darec.models.search import DotScore
from darec.serve.export import export_model
from darec.serve.history import History
from darec.serve.scorer import Scorer
from darec.train.config import TrainConfig
from darec.train.trainer import train

SMALL = ProtocolConfig(min_clicks=10, n_train_targets=3, max_len=12)
COLUMNS = {"user": "uid", "item": "iid", "category": "cid", "timestamp": "ts", "behavior": "act"}
# item features brand and shop, the time gap in the score: the same samples as a prepare without a schema
ITEM_SCHEMA = """
features:
  - {name: item, column: item}
  - {name: category, column: category}
  - {name: brand, column: brand}
  - {name: shop, column: shop}
time: {gap: true, gap_buckets: 12}
"""
# everything: behaviour types in histories, time gap and hour in score and tokens, a user feature
FULL_SCHEMA = """
behaviors: [pv, buy, cart]
targets: [pv]
features:
  - {name: item, column: item}
  - {name: category, column: category}
  - {name: brand, column: brand}
behavior_type: true
time: {gap: true, gap_buckets: 12, hour: true, enter: representation}
user_features: [{name: segment, column: seg}]
"""


def write_feature_log(path: Path, *, n_users: int = 14, n_events: int = 36, seed: int = 0) -> Path:
    """A CSV log with string ids, two item columns (brand, shop: functions of the item), behaviour types,
    a user segment and irregular timestamps."""
    rng = np.random.default_rng(seed)
    items = rng.integers(1, 50, size=n_users * n_events)
    gaps = rng.integers(0, 20_000, size=(n_users, n_events))
    pl.DataFrame({
        "uid": [f"u{u}" for u in range(n_users) for _ in range(n_events)],
        "iid": [f"item-{i}" for i in items], "cid": [f"c{i % 6}" for i in items],
        "brand": [f"b{i % 5}" for i in items], "shop": [f"s{i % 3}" for i in items],
        "act": rng.choice(["pv", "buy", "cart"], size=n_users * n_events, p=[0.7, 0.15, 0.15]),
        "seg": [f"g{u % 3}" for u in range(n_users) for _ in range(n_events)],
        "ts": (np.cumsum(gaps, axis=1) + 1_600_000_000).reshape(-1),
    }).write_csv(path)
    return path


def prepare_features(tmp: Path, schema_text: str | None, name: str = "ds") -> PreparedDataset:
    log = tmp / "log.csv"
    if not log.exists():
        write_feature_log(log)
    schema = None
    if schema_text is not None:
        (tmp / f"{name}.yaml").write_text(schema_text)
        schema = load_schema(tmp / f"{name}.yaml")
    columns = COLUMNS if schema_text is not None else {k: v for k, v in COLUMNS.items() if k != "behavior"}
    return prepare(source="generic", input=log, out=tmp / name, columns=columns, config=SMALL, schema=schema)


@pytest.fixture(scope="module")
def full_ds(tmp_path_factory) -> PreparedDataset:
    return prepare_features(tmp_path_factory.mktemp("full"), FULL_SCHEMA)


def _state_bytes(path: Path) -> dict[str, bytes]:
    return {k: v.numpy().tobytes() for k, v in load_checkpoint(path, keys=("model",))["model"].items()}


def test_featureless_model_unchanged_by_feature_data(tmp_path):
    """Data prepared with item features and a time gap, trained with --features none, gives exactly the
    logits and weights of the same log prepared without a schema (the model reads what it always read)."""
    with_features = prepare_features(tmp_path, ITEM_SCHEMA, "with")
    plain = prepare_features(tmp_path, None, "plain")
    assert with_features.item_features and not plain.feature_specs
    config = TrainConfig(epochs=1, batch_size=32, eval_batch_size=64, model={"dim": 4}, patience=None, threads=1)
    a = train(data=with_features, config=config.replace(features="none"), out_dir=tmp_path / "a", progress=False)
    b = train(data=plain, config=config, out_dir=tmp_path / "b", progress=False)  # "all" of nothing
    assert list(a["model_config"]["features"]) == list(b["model_config"]["features"]) == []
    assert (tmp_path / "a/test_logits.npy").read_bytes() == (tmp_path / "b/test_logits.npy").read_bytes()
    assert _state_bytes(tmp_path / "a/best.pt") == _state_bytes(tmp_path / "b/best.pt")
    assert a["test"]["auc"] == b["test"]["auc"]


def test_feature_fields_from_the_schema(full_ds):
    fields = {f.name: f for f in feature_fields(full_ds)}
    assert fields["brand"] == FeatureField("brand", 6, "item")
    assert fields["behavior"] == FeatureField("behavior", 4, "context", "both")     # pv, buy, cart + 0
    assert fields["time_gap"] == FeatureField("time_gap", 13, "context", "both")    # gap_buckets + 1
    assert fields["hour"] == FeatureField("hour", 25, "context", "both")
    assert fields["segment"] == FeatureField("segment", 4, "user")
    assert feature_fields(full_ds, "none") == ()
    assert [f.name for f in feature_fields(full_ds, ("time_gap", "brand"))] == ["time_gap", "brand"]
    with pytest.raises(ConfigError, match="unknown feature 'price'"):
        feature_fields(full_ds, ("price",))


def _hand_model() -> RoleEmbeddings:
    config = ModelConfig(n_items=6, n_categories=4, max_len=5, dim=2, tables="decoupled",
                         features=(FeatureField("brand", 4, "item"), FeatureField("time_gap", 5, "context", "score")))
    torch.manual_seed(0)
    return build_model(config).embeddings


def test_dot_score_by_hand():
    """<[item; category; brand]_q, [...]_k> / sqrt(3 d_A) + position bias + time-gap bias, brute force."""
    emb = _hand_model()
    batch = Batch(hist_items=torch.tensor([[0, 3, 5]]), hist_categories=torch.tensor([[0, 1, 2]]),
                  hist_positions=torch.tensor([[3, 2, 1]]), mask=torch.tensor([[False, True, True]]),
                  target_item=torch.tensor([4]), target_category=torch.tensor([3]), label=torch.ones(1),
                  user=torch.zeros(1, dtype=torch.long), hist_features={"brand": torch.tensor([[0, 2, 1]]),
                                                                      "time_gap": torch.tensor([[0, 4, 2]])},
                  target_features={"brand": torch.tensor([3])})
    att = emb.sets["attention"]
    w = {name: att.table(name).weight.detach() for name in ("item", "category", "brand", "position", "time_gap")}
    scores = DotScore()(emb, batch).detach()[0]
    for slot in range(3):
        query = torch.cat([w["item"][4], w["category"][3], w["brand"][3]])
        key = torch.cat([w["item"][batch.hist_items[0, slot]], w["category"][batch.hist_categories[0, slot]],
                         w["brand"][batch.hist_features["brand"][0, slot]]])
        position = float(w["position"][0] @ w["position"][batch.hist_positions[0, slot]]) / math.sqrt(2)
        gap = float(w["time_gap"][0] @ w["time_gap"][batch.hist_features["time_gap"][0, slot]]) / math.sqrt(2)
        expected = float(query @ key) / math.sqrt(6) + position + gap
        assert scores[slot].item() == pytest.approx(expected, abs=1e-6)
    bias = emb.context_bias("time_gap")
    assert bias.shape == (5,) and emb.context_bias("brand") is None and emb.context_bias("hour") is None
    assert bias[4].item() == pytest.approx(float(w["time_gap"][0] @ w["time_gap"][4]) / math.sqrt(2), abs=1e-7)
    # a score-only context feature has no representation table; the item feature has one in each set
    assert set(emb.sets["representation"].features) == {"brand"} and set(att.features) == {"brand", "time_gap"}


@pytest.mark.parametrize("projection", [False, True])
def test_weighted_values_equal_the_weighted_sum_of_value_tokens(projection):
    """The serving path's field-by-field reduction equals summing the built (U, C, K, E) tokens."""
    torch.manual_seed(0)
    config = ModelConfig(n_items=9, n_categories=5, dim=4, tables="shared" if projection else "decoupled",
                         projection=projection,
                         features=(FeatureField(name="brand", vocabulary=4, kind="item"),
                                   FeatureField(name="time_gap", vocabulary=5, kind="context", enter="both")))
    emb = RoleEmbeddings(config)
    shape = (2, 3, 6)  # U, C, K
    items, cats = torch.randint(0, 9, shape), torch.randint(0, 5, shape)
    positions = torch.randint(0, 13, shape)
    codes = {"brand": torch.randint(0, 4, shape), "time_gap": torch.randint(0, 5, shape)}
    weights = torch.softmax(torch.randn(shape), -1)
    expected = torch.einsum("uck,ucke->uce", weights, emb.values(items, cats, positions, codes))
    got = emb.weighted_values(weights, items, cats, positions, codes)
    assert got.shape == expected.shape == (2, 3, config.token_dim)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def _feature_batch(ds: PreparedDataset, rows: int = 24, split: str = "train", group_sets: bool = False) -> Batch:
    return next(iter(BatchLoader(ds, split, batch_size=rows, group_sets=group_sets)))


def _grads(model, batch: Batch, part: str) -> dict[str, set[str]]:
    """Which sets' feature tables get a gradient from the attention scores or the representation alone."""
    model.zero_grad()
    emb = model.embeddings
    if part == "attention":
        DotScore()(emb, batch).sum().backward()
    else:
        (emb.values(batch.hist_items, batch.hist_categories, batch.hist_positions, batch.hist_features).sum()
         + emb.target(batch.target_item, batch.target_category, batch.target_features).sum()).backward()
    return {name: {f for f, t in s.features.items() if t.weight.grad is not None and t.weight.grad.abs().sum() > 0}
            for name, s in emb.sets.items()}


@pytest.mark.parametrize("preset", ["dare", "twin"])
def test_role_tables_of_every_feature(full_ds, preset):
    """DARE: a feature's attention tables get gradient only from the score, its representation tables only
    from the tokens; TWIN: one table per feature takes both."""
    config = preset_config(preset, n_items=full_ds.n_items, n_categories=full_ds.n_categories, dim=4,
                           max_len=SMALL.max_len, features=feature_fields(full_ds))
    model = build_model(config)
    batch = _feature_batch(full_ds)
    attention, representation = _grads(model, batch, "attention"), _grads(model, batch, "representation")
    context = {"behavior", "time_gap", "hour"}
    if preset == "dare":
        assert attention == {"attention": {"brand"} | context, "representation": set()}
        assert representation == {"attention": set(), "representation": {"brand"} | context}
    else:
        assert attention == {"shared": {"brand"} | context} == representation


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_trains_on_features(full_ds, preset):
    """Forward + backward of every preset on a batch carrying every kind of feature; the head reads the user
    feature and each search's output depends on the item feature."""
    config = preset_config(preset, n_items=full_ds.n_items, n_categories=full_ds.n_categories, dim=4,
                           max_len=SMALL.max_len, features=feature_fields(full_ds))
    torch.manual_seed(0)
    model = build_model(config).train()
    batch = _feature_batch(full_ds, group_sets=model.uses_candidate_sets)
    out = model(batch)
    assert out.features.shape[1] == config.head_dim
    loss = out.logit.sum() + (out.aux_logit.sum() if out.aux_logit is not None else 0)
    loss.backward()
    assert torch.isfinite(out.logit).all()
    tables = model.embeddings.sets
    user_set = tables[model.embeddings.layout["target"]]
    assert user_set.features["segment"].weight.grad is not None
    assert any(s.features["brand"].weight.grad is not None for s in tables.values())


@pytest.mark.parametrize("preset", ["dare", "twin_hard", "eta", "sdim", "ifa_no_set", "twin_4e"])
def test_scorer_equals_training_forward_with_features(full_ds, preset):
    """Serving a (history, candidate) pair with its features = the eval-mode training forward on it."""
    config = preset_config(preset, n_items=full_ds.n_items, n_categories=full_ds.n_categories, dim=4,
                           max_len=SMALL.max_len, features=feature_fields(full_ds))
    torch.manual_seed(1)
    model = build_model(config).eval()
    batch = _feature_batch(full_ds, rows=30, split="test")
    with torch.no_grad():
        expected = model(batch).logit
    history = History(items=batch.hist_items, categories=batch.hist_categories, mask=batch.mask,
                      positions=batch.hist_positions, features=batch.hist_features, user_features=batch.user_features)
    scorer = Scorer(model, item_features=full_ds.item_features)
    got = scorer.logits(history, batch.target_item[:, None], batch.target_category[:, None])[:, 0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="item feature"):
        Scorer(model).logits(history, batch.target_item[:, None], batch.target_category[:, None])


def test_explicit_history_without_features_is_refused(full_ds):
    model = build_model(preset_config("dare", n_items=full_ds.n_items, n_categories=full_ds.n_categories, dim=4,
                                      features=feature_fields(full_ds, ("time_gap",))))
    history = History.left_pad([np.array([1, 2, 3])], [np.array([1, 1, 2])])
    with pytest.raises(ConfigError, match="side feature 'time_gap'") as info:
        Scorer(model).logits(history, torch.tensor([[4]]), torch.tensor([[1]]))
    assert "\n" not in str(info.value)


def test_service_serves_feature_models_for_stored_users(full_ds, tmp_path):
    """`darec serve` with a feature model: a stored user's reply equals the Scorer on the dataset history with
    its features (as `darec predict` builds it); an explicit history, which carries no features, is a 422."""
    from fastapi.testclient import TestClient

    from darec.checkpoint import save_checkpoint
    from darec.data.id_maps import IdMaps
    from darec.serve.app import create_app
    from darec.serve.predict import load_scorer, user_histories

    config = preset_config("dare", n_items=full_ds.n_items, n_categories=full_ds.n_categories, dim=4,
                           max_len=SMALL.max_len, features=feature_fields(full_ds), init_std=0.2)
    torch.manual_seed(2)
    save_checkpoint(tmp_path / "best.pt", {"model_config": config.to_dict(), "model": build_model(config).state_dict(),
                                           "step": 1})
    ids = IdMaps.open(full_ds.path)
    user, items = ids.decode("user", [3])[0], ids.decode("item", [1, 2, 5]).to_list()
    scorer = load_scorer(tmp_path / "best.pt", full_ds)
    cand = torch.tensor([[1, 2, 5]])
    expected = scorer.score(user_histories(full_ds, np.array([3]), SMALL.max_len), cand,
                            torch.from_numpy(np.asarray(full_ds.item_categories, dtype=np.int64))[cand])[0]
    with TestClient(create_app(tmp_path / "best.pt", full_ds.path)) as client:
        reply = client.post("/score", json={"user": user, "candidates": {"items": items}})
        assert reply.status_code == 200, reply.text
        assert reply.json()["scores"] == pytest.approx(expected.tolist(), abs=1e-6)
        refused = client.post("/score", json={"history": {"items": items}, "candidates": {"items": items}})
        assert refused.status_code == 422 and "side features" in refused.json()["detail"]


def test_export_refuses_item_feature_models_without_their_item_tables(full_ds, tmp_path):
    model = build_model(preset_config("dare", n_items=full_ds.n_items, n_categories=full_ds.n_categories, dim=4,
                                      features=feature_fields(full_ds, ("brand",))))
    with pytest.raises(ConfigError, match=r"item feature\(s\) \['brand'\]") as info:
        export_model(model, tmp_path / "export", progress=False)
    assert "\n" not in str(info.value) and not (tmp_path / "export").exists()


def test_unknown_feature_is_one_line_exit_2(tmp_path, capsys):
    plain = prepare_features(tmp_path, None, "plain")
    rc = main(["train", "--data", str(plain.path), "--out", str(tmp_path / "run"), "--features", "brand",
               "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "unknown feature 'brand'" in err
    assert not (tmp_path / "run").exists()


def test_prepare_train_score_with_string_ids_and_features(tmp_path, capsys):
    """The issue's 'done when': a CSV with string ids and extra columns, a schema, one epoch, raw-id scoring."""
    write_feature_log(tmp_path / "log.csv")
    (tmp_path / "s.yaml").write_text(FULL_SCHEMA)
    columns = ",".join(f"{k}={v}" for k, v in {**COLUMNS, "brand": "brand", "segment": "seg"}.items())
    assert main(["prepare", "--source", "generic", "--input", str(tmp_path / "log.csv"), "--columns", columns,
                 "--schema", str(tmp_path / "s.yaml"), "--min-clicks", "10", "--n-train-targets", "3",
                 "--max-len", "12", "--out", str(tmp_path / "ds")]) == 0
    assert main(["train", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "run"), "--dim", "4",
                 "--epochs", "1", "--batch-size", "64", "--features", "brand,time_gap,behavior",
                 "--no-progress"]) == 0
    result = json.loads((tmp_path / "run/result.json").read_text())
    assert result["config"]["features"] == ["brand", "time_gap", "behavior"]
    assert [f["name"] for f in result["model_config"]["features"]] == ["brand", "time_gap", "behavior"]
    capsys.readouterr()
    assert main(["score", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "ds"), "--user", "u3",
                 "--candidates", "item-5", "item-7", "item-11", "--json", str(tmp_path / "s.json")]) == 0
    ranking = json.loads((tmp_path / "s.json").read_text())["ranking"]
    assert sorted(r["item"] for r in ranking) == ["item-11", "item-5", "item-7"]
    assert all(0 < r["probability"] < 1 for r in ranking)
