"""The tune stage: the tuner LLM over HTTP (the simulated teacher through the real SDK and
gateway), and real trials in a real Prefect flow with a real MLflow store (tiny model,
`accelerate launch` of TRL). Both share one simulated teacher for the module. (The clamp gate
and the seeded search: tests/test_tuning_search.py.)"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from mlflow.tracking import MlflowClient

from agents.skills import load_skill
from agents.teacher import TeacherConfig, TeacherServer
from agents.tuner import configs_schema, propose, tune_block
from tests.tuning_helpers import BOUNDS, GOOD, _inside

DEMO = Path(__file__).resolve().parent.parent / "examples" / "news_topics" / "spec.yaml"


# ── the tuner LLM: the simulated teacher over HTTP, through the real SDK and gateway ────────
LABELS = ["business", "entertainment", "politics", "sports", "tech"]


@pytest.fixture(scope="module")
def teacher(small_warehouse_url):
    server = TeacherServer(TeacherConfig(small_warehouse_url, "articles", "id", "topic", LABELS))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["openai", "anthropic"])
def gateway(request, teacher):
    from agents.gateway import LLMGateway, MemoryCache
    from agents.provider_factory import make_provider

    url = teacher.base_url if request.param == "openai" else teacher.url
    calls: list[dict] = []
    gw = LLMGateway(make_provider(request.param, base_url=url, api_key="k", timeout=10),
                    role="tuner", cache=MemoryCache(), on_call=calls.append)
    gw.calls = calls
    return gw


def test_tune_block_is_the_skill_contract():
    block = tune_block(2, {**BOUNDS, "lora_r": (0.0, 16.0)}, {"n": 80},
                       [{"config": GOOD, "eval_loss": 1.5}])
    body = json.loads(block[len("<tune>"):-len("</tune>")])
    assert body["bounds"] == {"batch_size": [8, 32], "learning_rate": [2e-4, 3e-3],
                              "lora_r": [0, 16], "warmup_ratio": [0.0, 0.1]}
    assert body["past_trials"] == [{"config": GOOD, "eval_loss": 1.5, "score": -1.5}]
    assert configs_schema(BOUNDS)["properties"]["configs"]["items"]["required"] == sorted(BOUNDS)


def test_propose_through_the_real_sdk(gateway):
    skill = load_skill("propose-training-config")
    default = {"learning_rate": 1e-3, "batch_size": 16, "warmup_ratio": 0.03}
    out = propose(gateway, "simulated-tuner", skill, 3, BOUNDS, {"n": 80}, [], seen=[default])
    kept = [o["config"] for o in out if o["config"] is not None]
    assert len(kept) == 3 and all(_inside(c, BOUNDS) for c in kept)
    assert all(isinstance(c["batch_size"], int) for c in kept)
    assert default not in kept
    assert [c["status"] for c in gateway.calls] == ["ok"]
    # with a past trial the teacher refines near the best one; past configs are never repeated
    past = [{"config": kept[0], "eval_loss": 1.2}, {"config": kept[1], "eval_loss": 2.0}]
    again = propose(gateway, "simulated-tuner", skill, 3, BOUNDS, {"n": 80}, past)
    assert len(again) == 3 and kept[0] not in [a["config"] for a in again]
    # the same request again is served by the call cache
    propose(gateway, "simulated-tuner", skill, 3, BOUNDS, {"n": 80}, past)
    assert gateway.calls[-1]["cached"] is True


def test_a_failed_tuner_call_is_retried_by_the_gateway(small_warehouse_url):
    """The teacher answers the first attempt of every request 500: the gateway retries."""
    from agents.gateway import LLMGateway, MemoryCache
    from agents.provider_factory import make_provider
    from agents.teacher import TeacherKnobs

    server = TeacherServer(TeacherConfig(small_warehouse_url, "articles", "id", "topic", LABELS,
                                         knobs=TeacherKnobs(fault_500_rate=1.0)))
    server.start()
    try:
        calls: list[dict] = []
        gw = LLMGateway(make_provider("openai", base_url=server.base_url, api_key="k",
                                      timeout=10),
                        role="tuner", cache=MemoryCache(), on_call=calls.append,
                        backoff_base=0.01)
        out = propose(gw, "simulated-tuner", load_skill("propose-training-config"), 2, BOUNDS,
                      {"n": 80}, [])
    finally:
        server.stop()
    assert len([o for o in out if o["config"]]) == 2
    assert [(c["status"], c["attempt"]) for c in calls] == [("error", 1), ("ok", 2)]


def test_propose_gates_a_bad_reply():
    """The simulated teacher has no knob for out-of-bounds configs: a scripted gateway
    returns them, and every one is clamped, rejected or dropped, each with a note."""
    class Scripted:
        def complete_json(self, **kw):
            self.kw = kw
            return {"configs": [
                {"learning_rate": 0.5, "batch_size": 12.4, "warmup_ratio": 0.05},   # clamped
                {"learning_rate": "fast", "batch_size": 16, "warmup_ratio": 0.05},  # rejected
                {"learning_rate": 3e-3, "batch_size": 12, "warmup_ratio": 0.05},    # duplicate
                {**GOOD, "epochs": 2},                                              # unknown
                {"learning_rate": 1e-3, "batch_size": 20, "warmup_ratio": 0.0},     # kept
                {"learning_rate": 2e-3, "batch_size": 20, "warmup_ratio": 0.0},     # beyond k
            ]}

    gw = Scripted()
    out = propose(gw, "m", load_skill("propose-training-config"), 2, BOUNDS, {}, [])
    assert [o["config"] is not None for o in out] == [True, False, False, False, True, False]
    assert out[0]["config"] == {"learning_rate": 3e-3, "batch_size": 12, "warmup_ratio": 0.05}
    assert "not a finite number" in out[1]["notes"][0]
    assert "duplicate" in out[2]["notes"][-1]
    assert "unknown" in out[3]["notes"][0] and "beyond" in out[5]["notes"][0]
    assert gw.kw["messages"][0]["content"].startswith("# Propose training configurations")
    assert gw.kw["schema_name"] == "configs"
    assert propose(type("G", (), {"complete_json": lambda self, **kw: {"x": 1}})(), "m",
                   load_skill("propose-training-config"), 2, BOUNDS, {}, [])[0]["config"] is None


def test_a_failed_or_short_tuner_is_filled_by_the_search_and_recorded(
        small_warehouse_url, tmp_path, monkeypatch):
    from agents.providers import ProviderError
    from flows import tuning
    from flows.spec import load_spec

    spec = load_spec(tune_spec(small_warehouse_url, tmp_path, tuner=True))
    spec.tuning.trials = 4
    monkeypatch.setattr(tuning, "get_runtime", lambda settings: type(
        "R", (), {"gateways": {"tuner": None}})())

    def failing(*a, **kw):
        raise ProviderError("server", "HTTP 500 after 5 attempts", status=500)

    monkeypatch.setattr(tuning, "propose", failing)
    out = tuning.propose_trials.fn(spec, None, {"n": 80}, [])
    assert [c["source"] for c in out["configs"]] == ["search"] * 3
    assert out["fill_reason"].startswith("tuner call failed: ProviderError")
    # a tuner that gives one valid and one rejected proposal: two places filled, and said so
    good = {"learning_rate": 1e-3, "batch_size": 8, "warmup_ratio": 0.05, "lora_r": 2}
    monkeypatch.setattr(tuning, "propose", lambda *a, **kw: [
        {"config": good, "notes": [], "proposal": good},
        {"config": None, "notes": ["rejected: x"], "proposal": {"x": 1}}])
    out = tuning.propose_trials.fn(spec, None, {"n": 80}, [])
    assert [c["source"] for c in out["configs"]] == ["tuner", "search", "search"]
    assert out["fill_reason"] == "tuner gave 1 valid proposals of 3 (1 rejected)"
    assert out["rejected"] == [{"proposal": {"x": 1}, "notes": ["rejected: x"]}]


# ── real trials in a real flow ───────────────────────────────────────────────────────────────
def tune_spec(warehouse_url: str, tmp: Path, tuner: bool) -> Path:
    data = copy.deepcopy(yaml.safe_load(DEMO.read_text()))
    data["name"] = "tune-test"
    data["warehouse"]["url"] = warehouse_url
    data["student"]["tiny"] = {"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                               "intermediate_size": 64, "vocab_size": 300}
    data["training"].update({"max_steps": 20, "batch_size": 8, "learning_rate": 0.003,
                             "max_length": 128})
    data["tuning"] = {"enabled": True, "trials": 3, "max_steps": 20, "concurrency": 2,
                      "validation_fraction": 0.2, "seed": 0,
                      "bounds": {"learning_rate": [1e-4, 1e-2], "batch_size": [4, 16],
                                 "warmup_ratio": [0.0, 0.1], "lora_r": [0, 8]}}
    if tuner:
        data["llm"]["tuner"] = {"api": "openai", "model": "simulated-tuner",
                                "endpoint": "simulated", "temperature": 0.0}
    else:  # the seeded search (no tuner role at all, not one without an endpoint)
        data["llm"].pop("tuner", None)
    data["tracking"]["uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    path = tmp / f"spec-{'tuner' if tuner else 'search'}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def curated(engine, path: Path, n: int = 80) -> dict:
    """A curate-stage result: n real articles as {"prompt", "completion"} JSONL."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT title, body, topic FROM articles ORDER BY id "
                                    "LIMIT :n"), {"n": n}).all()
    path.write_text("".join(json.dumps({"prompt": f"Title: {t}\nLead: {b[:120]}\nTopic:",
                                        "completion": f" {topic}"}) + "\n"
                            for t, b, topic in rows))
    return {"path": str(path), "n": len(rows), "sha256": "test"}


@pytest.fixture(scope="module")
def two_tunes(small_warehouse_url, engine, tmp_path_factory, prefect_api, teacher):
    """tune() twice in real flows on one MLflow store: first with the tuner LLM, then the
    same spec name without one (the seeded search), which must see the first's trials."""
    from prefect import flow

    from flows import tracking
    from flows.runtime import RuntimeSettings
    from flows.spec import load_spec
    from flows.store import shared_store
    from flows.tuning import tune

    tmp = tmp_path_factory.mktemp("tune")
    dataset = curated(engine, tmp / "curated.jsonl")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)

    @flow(name="tune-test")
    def run(spec_path: str, out: str, endpoints: tuple) -> dict:
        spec = load_spec(spec_path)
        exp = tracking.ensure_experiment(client, spec.tracking.experiment, Path(out))
        parent = tracking.start_parent_run(client, exp, run_name=Path(out).name, params={},
                                           tags={})
        store_url = f"sqlite:///{out}/store.db"
        run_id = shared_store(store_url).start_run(spec.name, spec.content_hash(), "{}")
        settings = RuntimeSettings(spec_path, run_id, store_url, out, endpoints)
        result = tune(spec, dataset, settings, Path(out), uri, parent, "")
        client.set_terminated(parent)
        calls = shared_store(store_url).call_totals(run_id)
        return {**result, "parent": parent, "tuner_calls": calls["calls"]}

    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    first = run(str(tune_spec(small_warehouse_url, tmp, tuner=True)), str(tmp / "a"),
                (("generator", teacher.base_url), ("judge", teacher.url),
                 ("tuner", teacher.base_url)))
    second = run(str(tune_spec(small_warehouse_url, tmp, tuner=False)), str(tmp / "b"),
                 (("generator", teacher.base_url), ("judge", teacher.url)))
    return client, first, second


def test_trials_are_child_runs_and_the_best_is_chosen(two_tunes):
    client, first, _ = two_tunes
    trials = first["trials"]
    assert [t["trial"] for t in trials] == [0, 1, 2]
    assert [t["source"] for t in trials] == ["default", "tuner", "tuner"]
    assert first["fill_reason"] is None and first["proposer"] == "tuner"
    assert first["tuner_calls"] == 1  # one LLM call, recorded in the run's store
    assert trials[0]["config"] == {"learning_rate": 0.003, "batch_size": 8,
                                   "warmup_ratio": 0.03, "lora_r": 0}
    assert all(t["status"] == "ok" and math.isfinite(t["eval_loss"]) for t in trials)
    # a trial with lora_r > 0 trained a LoRA adapter (spec.training.lora with the trial's r)
    tune_dir = Path(first["validation_path"]).parent
    for t in trials:
        assert (tune_dir / f"trial-{t['trial']}" / "adapter").is_dir() == (
            t["config"]["lora_r"] > 0)
    best = min(trials, key=lambda t: t["eval_loss"])
    assert first["chosen_config"] == best["config"]
    assert first["best_eval_loss"] == best["eval_loss"]
    assert first["default_eval_loss"] == trials[0]["eval_loss"]
    assert first["beats_default"] == (best["trial"] != 0)
    # three child runs under the parent, tagged as trials, each with its eval loss
    children = client.search_runs(
        [client.get_run(first["parent"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{first['parent']}'")
    assert len(children) == 3
    by_id = {r.info.run_id: r for r in children}
    for t in trials:
        run = by_id[t["mlflow_run_id"]]
        assert run.data.tags["posttrain.stage"] == "trial"
        assert run.data.tags["posttrain.trial"] == str(t["trial"])
        assert json.loads(run.data.tags["posttrain.trial_config"]) == t["config"]
        assert run.data.metrics["result/eval_loss"] == pytest.approx(t["eval_loss"])
    parent = client.get_run(first["parent"])
    assert parent.data.metrics["tune/best_eval_loss"] == pytest.approx(first["best_eval_loss"])
    assert parent.data.metrics["tune/default_eval_loss"] == pytest.approx(
        first["default_eval_loss"])
    assert {a.path for a in client.list_artifacts(first["parent"], "tune")} == {
        "tune/trials.json", "tune/trials.md"}


def test_validation_split_is_by_prompt_and_disjoint(two_tunes):
    _, first, second = two_tunes
    train = [json.loads(x)["prompt"] for x in Path(first["train_path"]).read_text().splitlines()]
    val = [json.loads(x)["prompt"] for x in Path(first["validation_path"]).read_text().splitlines()]
    assert len(train) + len(val) == 80 and first["n_validation"] == len(val) > 0
    assert not set(train) & set(val)
    # the same data splits the same way in another run
    assert Path(second["validation_path"]).read_text() == Path(first["validation_path"]).read_text()


def test_a_second_tune_sees_the_first_trials(two_tunes):
    _, first, second = two_tunes
    assert first["past_trials"] == 0
    assert second["past_trials"] == 3
    assert set(second["past_trial_run_ids"]) == {t["mlflow_run_id"] for t in first["trials"]}
    assert [t["source"] for t in second["trials"]] == ["default", "search", "search"]
    seen = [json.dumps(t["config"], sort_keys=True) for t in first["trials"]]
    for t in second["trials"][1:]:
        assert json.dumps(t["config"], sort_keys=True) not in seen
        assert 1e-4 <= t["config"]["learning_rate"] <= 1e-2
        assert 4 <= t["config"]["batch_size"] <= 16
        assert 0 <= t["config"]["lora_r"] <= 8


def test_a_failed_trial_is_recorded_and_all_failing_stops_the_stage(
        small_warehouse_url, engine, tmp_path, monkeypatch, prefect_api):
    """The trials' training is replaced by a stub (the real one is exercised above): one
    trial fails and is recorded with its reason; when all fail the stage raises."""
    from prefect import flow

    from flows import tracking, tuning
    from flows.spec import load_spec
    from training.launch import TrainingFailed

    spec_path = tune_spec(small_warehouse_url, tmp_path, tuner=False)
    spec = load_spec(spec_path)
    dataset = curated(engine, tmp_path / "curated.jsonl", n=40)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    broken: set[int] = set()

    def fake_launch(config, run_dir, profile):
        trial = int(config["mlflow"]["tags"]["posttrain.trial"])
        if trial in broken:
            raise TrainingFailed(1, ["RuntimeError: out of memory"], Path(run_dir) / "train.log")
        return {"eval_loss": 3.0 - config["learning_rate"] * 100, "mlflow_run_id": None}

    monkeypatch.setattr(tuning, "launch_sft", fake_launch)

    @flow(name="tune-stub")
    def run() -> dict:
        exp = tracking.ensure_experiment(client, spec.tracking.experiment, tmp_path)
        parent = tracking.start_parent_run(client, exp, run_name="stub", params={}, tags={})
        return tuning.tune(spec, dataset, None, tmp_path, uri, parent, "")

    broken.add(1)
    result = run()
    failed = [t for t in result["trials"] if t["status"] == "failed"]
    assert [t["trial"] for t in failed] == [1]
    assert failed[0]["error"] == "RuntimeError: out of memory" and failed[0]["eval_loss"] is None
    ok = [t for t in result["trials"] if t["status"] == "ok"]
    assert result["chosen_config"] == min(ok, key=lambda t: t["eval_loss"])["config"]
    broken.update({0, 2})
    with pytest.raises(Exception, match="every trial failed"):
        run()
